"""The session guest of this suite gets a host directory, shared with DAX.

pyvmm's pytest plugin (installed with pyvmm) provides ``pyvmm_session_guest``;
overriding ``pyvmm_guest_options`` is how a suite configures it.
"""

import pytest

from pyvmm.testing import Share
from pyvmm.testing.plugin import guest_options


@pytest.fixture(scope="session")
def shared_dir(tmp_path_factory):
    """A host directory the guest sees at /mnt/work (with DAX)."""
    d = tmp_path_factory.mktemp("work")
    (d / "input.txt").write_text("hello from the host\n")
    return d


@pytest.fixture(scope="session")
def pyvmm_guest_options(request, shared_dir):
    return {**guest_options(request.config), "shares": {"work": Share(shared_dir, dax=True)}}
