"""Testing a Linux guest with pyvmm: one boot per session (per worker under -n)."""

import pytest

from pyvmm.testing import GuestError


def test_kernel_answers(pyvmm_session_guest):
    r = pyvmm_session_guest.run("uname -sm")
    assert r.returncode == 0
    assert r.stdout == "Linux x86_64\n"


def test_exit_status_and_streams(pyvmm_session_guest):
    r = pyvmm_session_guest.run("echo to-stdout; echo to-stderr >&2; exit 3")
    assert (r.returncode, r.stdout, r.stderr) == (3, "to-stdout\n", "to-stderr\n")


def test_shared_directory_with_dax(pyvmm_session_guest, shared_dir):
    g = pyvmm_session_guest
    assert " /mnt/work virtiofs " in g.run("cat /proc/mounts").stdout
    assert "dax=always" in g.run("grep /mnt/work /proc/mounts").stdout
    assert g.run("cat /mnt/work/input.txt").stdout == "hello from the host\n"
    g.run("echo written in the guest > /mnt/work/output.txt", check=True)
    assert (shared_dir / "output.txt").read_text() == "written in the guest\n"


def test_a_failing_command_is_reported(pyvmm_session_guest):
    with pytest.raises(GuestError) as failure:
        pyvmm_session_guest.run("ls /no/such/dir", check=True)
    message = str(failure.value)
    assert "exited with 1" in message
    assert "No such file or directory" in message   # ls's stderr is in the report


# A guest of its own per test, restored from a snapshot taken once per run
# (pyvmm_snapshot, with the same options and share): a fraction of a boot.
@pytest.mark.parametrize("run", [1, 2])
def test_fresh_guest_starts_clean(pyvmm_fresh_guest, shared_dir, run):
    g = pyvmm_fresh_guest
    assert g.run("test ! -e /tmp/left-by-another-test && touch /tmp/left-by-another-test").returncode == 0
    assert g.run("cat /mnt/work/input.txt").stdout == "hello from the host\n"
