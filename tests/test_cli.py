"""The command line (pyvmm.cli), docs/cli.md.

Bad input: exit status 2 and exactly one line on stderr, "pyvmm: ...", never a
traceback.  Most cases run ``main([...])`` in this process (no /dev/kvm: they
fail before a VM is created); a few run ``python -m pyvmm`` to check the real
entry point, and those that get as far as creating the VM need KVM.
"""

from __future__ import annotations

import os
import random
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from pyvmm import cli, guest_build, kvm
from pyvmm.cli import UsageError, main, parse_size
from pyvmm.platform import host_memory_bytes

REPO = Path(__file__).resolve().parent.parent


def run_main(capsys, argv: list[str]) -> tuple[int, str, str]:
    rc = main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def assert_usage_error(rc: int, out: str, err: str, *words: str) -> None:
    assert rc == 2, (rc, err)
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert err.endswith("\n")
    assert lines[0].startswith("pyvmm: "), err
    for word in words:
        assert word in lines[0], (word, lines[0])
    assert out == ""


def run_pyvmm(*args: str, env: dict | None = None, cwd: str | None = None) -> subprocess.CompletedProcess:
    full_env = dict(os.environ)
    full_env["PYTHONPATH"] = str(REPO) + os.pathsep + full_env.get("PYTHONPATH", "")
    full_env.pop("PYVMM_LOG", None)
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "pyvmm", *args], capture_output=True, text=True,
                          env=full_env, cwd=cwd or str(REPO), timeout=60, stdin=subprocess.DEVNULL)


@pytest.fixture
def some_file(tmp_path) -> str:
    p = tmp_path / "kernel"
    p.write_bytes(b"not looked at before the VM exists")
    return str(p)


@pytest.fixture(autouse=True)
def no_default_guest(tmp_path, monkeypatch):
    """Never boot the real default guest by accident: point the default at an empty dir."""
    empty = tmp_path / "empty-guest-dir"
    empty.mkdir()
    monkeypatch.setenv("PYVMM_GUEST_DIR", str(empty))
    return empty


# --- parse_size ---------------------------------------------------------------------------
@pytest.mark.parametrize("text, value", [
    ("512M", 512 << 20), ("1G", 1 << 30), ("4096", 4096), ("64K", 64 << 10), ("2g", 2 << 30),
    ("1 G", 1 << 30), (" 256M ", 256 << 20), ("1T", 1 << 40), ("512m", 512 << 20), ("8k", 8192),
    ("1GiB", 1 << 30), ("512MB", 512 << 20), ("0", 0), ("007M", 7 << 20),
])
def test_parse_size(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", " ", "G", "12X", "-1", "1.5G", "0x1000", "1GG", "1 2G", "1P",
                                  "1e9", "+1G", "one"])
def test_parse_size_rejects(text):
    with pytest.raises(UsageError, match="bad size"):
        parse_size(text)


# --- bad input, in process -------------------------------------------------------------------
def test_missing_kernel(capsys, tmp_path):
    path = tmp_path / "no-such-vmlinux"
    assert_usage_error(*run_main(capsys, ["run", "--kernel", str(path)]), f"kernel {path} does not exist")


def test_kernel_is_a_directory(capsys, tmp_path):
    assert_usage_error(*run_main(capsys, ["run", "--kernel", str(tmp_path)]), "is a directory")


def test_missing_initramfs(capsys, some_file, tmp_path):
    path = tmp_path / "no-such.cpio"
    assert_usage_error(*run_main(capsys, ["run", "--kernel", some_file, "--initramfs", str(path)]),
                       f"initramfs {path} does not exist")


def test_initramfs_is_a_directory(capsys, some_file, tmp_path):
    assert_usage_error(*run_main(capsys, ["run", "--kernel", some_file, "--initramfs", str(tmp_path)]),
                       "is a directory")


@pytest.mark.parametrize("memory, words", [
    ("12X", "bad size '12X'"),
    ("-1", "bad size '-1'"),
    ("1.5G", "bad size"),
    ("", "bad size"),
    ("0", "--memory 0 is too small: at least 32M"),
    ("16M", "--memory 16M is too small"),
    ("4096", "too small"),
    (str((32 << 20) + 1), "is not a multiple of 4 KiB"),
])
def test_bad_memory(capsys, some_file, memory, words):
    assert_usage_error(*run_main(capsys, ["run", "--kernel", some_file, "--memory", memory]), words)


def test_memory_more_than_the_host_has(capsys, some_file):
    if host_memory_bytes() is None:
        pytest.skip("/proc/meminfo has no MemTotal here")
    assert_usage_error(*run_main(capsys, ["run", "--kernel", some_file, "--memory", "100T"]),
                       "--memory 100T is more than this host has")


@pytest.mark.parametrize("cpus, words", [
    ("0", "--cpus must be from 1 to 8, not 0"),
    ("9", "--cpus must be from 1 to 8, not 9"),
    ("-1", "not -1"),
    ("abc", "--cpus must be a number from 1 to 8, not 'abc'"),
    ("1.5", "not '1.5'"),
    ("", "not ''"),
])
def test_bad_cpus(capsys, some_file, cpus, words):
    assert_usage_error(*run_main(capsys, ["run", "--kernel", some_file, f"--cpus={cpus}"]), words)


@pytest.mark.parametrize("spec, words", [
    ("tcp:1234", "--serial must be stdio, file=PATH or null, not 'tcp:1234'"),
    ("pty", "not 'pty'"),
    ("file=", "--serial file= needs a path"),
    ("file=/nonexistent-dir/serial.log", "--serial: cannot open /nonexistent-dir/serial.log"),
])
def test_bad_serial(capsys, some_file, spec, words):
    assert_usage_error(*run_main(capsys, ["run", "--kernel", some_file, f"--serial={spec}"]), words)


@pytest.mark.parametrize("spec, words", [
    ("abc", "--gdb 'abc': expected a TCP port (1-65535) or unix:PATH"),
    ("0", "expected a TCP port"),
    ("65536", "expected a TCP port"),
    ("unix:", "--gdb unix:PATH needs a path"),
])
def test_bad_gdb(capsys, some_file, spec, words):
    assert_usage_error(*run_main(capsys, ["run", "--kernel", some_file, f"--gdb={spec}"]), words)


def test_gdb_and_snapshot_are_refused_together(capsys, some_file, tmp_path):
    assert_usage_error(*run_main(capsys, ["run", "--kernel", some_file, "--gdb", "1234",
                                          "--snapshot", str(tmp_path / "snap")]),
                       "--gdb and --snapshot cannot be combined")


@pytest.mark.parametrize("argv, words", [
    (["run", "--bogus"], "unrecognized arguments: --bogus"),
    (["--bogus"], "unrecognized arguments: --bogus"),
    (["run", "--kernel"], "--kernel"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
    (["--log-level", "loud", "info"], "invalid choice: 'loud'"),
    (["run", "--cmdline", "a", "--cpus"], "--cpus"),
])
def test_bad_arguments(capsys, argv, words):
    assert_usage_error(*run_main(capsys, argv), words)


@pytest.mark.parametrize("argv", [["run"], [], ["run", "--memory", "64M", "--cpus", "2"]])
def test_default_guest_missing(capsys, no_default_guest, argv):
    rc, out, err = run_main(capsys, argv)
    assert_usage_error(rc, out, err, "make guest", str(no_default_guest))


def test_checks_come_before_reading_the_kernel(capsys, tmp_path):
    # a bad --cpus is reported even when the kernel is missing too
    assert_usage_error(*run_main(capsys, ["run", "--kernel", str(tmp_path / "nope"), "--cpus", "0"]),
                       "--cpus")


def test_info_without_kvm(capsys, monkeypatch):
    def unavailable(path="/dev/kvm"):
        raise kvm.KvmUnavailable(f"{path} does not exist: this host has no KVM")

    monkeypatch.setattr(kvm, "Kvm", unavailable)
    rc, out, err = run_main(capsys, ["info"])
    assert rc == 1
    assert out.splitlines()[0].startswith("KVM flavour: ")
    assert "/dev/kvm: /dev/kvm does not exist" in out
    assert "Traceback" not in err


def test_guest_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("PYVMM_GUEST_DIR", str(tmp_path))
    assert cli.default_guest_dir() == tmp_path
    monkeypatch.delenv("PYVMM_GUEST_DIR")   # the rest of the lookup: tests/test_guest_build.py
    assert cli.default_guest_dir() in (REPO / "guest" / "build", guest_build.cache_dir() / "guest")


# --- the real entry point: python -m pyvmm -----------------------------------------------------
def assert_process_usage_error(p: subprocess.CompletedProcess, *words: str) -> None:
    assert_usage_error(p.returncode, p.stdout, p.stderr, *words)


def test_process_missing_kernel(tmp_path):
    p = run_pyvmm("run", "--kernel", str(tmp_path / "vmlinux"))
    assert_process_usage_error(p, "does not exist")


def test_process_bad_memory_and_unknown_option(tmp_path):
    assert_process_usage_error(run_pyvmm("run", "--memory", "12X"), "bad size '12X'")
    assert_process_usage_error(run_pyvmm("run", "--frobnicate"), "unrecognized arguments")


def test_process_default_guest_missing(tmp_path):
    p = run_pyvmm(env={"PYVMM_GUEST_DIR": str(tmp_path)})     # plain `pyvmm` means `pyvmm run`
    assert_process_usage_error(p, "make guest", str(tmp_path))


# --- needs /dev/kvm: these get as far as creating the VM ---------------------------------------
def test_process_info(kvm_host):
    p = run_pyvmm("info")
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("KVM flavour: ")
    assert "/dev/kvm: API version 12" in p.stdout
    assert "required capabilities: all present" in p.stdout
    assert "Traceback" not in p.stderr


def _elf_with_note(note: bytes) -> bytes:
    """ELF64 x86-64 ET_EXEC header + one PT_NOTE program header + ``note``."""
    ident = b"\x7fELF" + bytes([2, 1, 1, 0]) + bytes(8)
    ehdr = struct.pack("<16sHHIQQQIHHHHHH", ident, 2, 62, 1, 0, 64, 0, 0, 64, 56, 1, 64, 0, 0)
    phdr = struct.pack("<IIQQQQQQ", 4, 4, 120, 0, 0, len(note), len(note), 4)
    return ehdr + phdr + note


@pytest.mark.parametrize("image, words", [
    (random.Random(1234).randbytes(4096), "the kernel is neither an ELF vmlinux nor a bzImage"),
    (_elf_with_note(struct.pack("<III", 4, 4, 1) + b"Xen\0" + b"\x00\x00\x00\x01"), "no PVH entry note"),
], ids=["random_bytes", "elf_no_pvh_note"])
def test_process_not_a_kernel(kvm_host, tmp_path, image, words):
    kernel = tmp_path / "kernel"
    kernel.write_bytes(image)
    p = run_pyvmm("run", "--kernel", str(kernel), "--memory", "32M", "--serial", "null")
    assert_process_usage_error(p, words)


def test_process_elf_with_broken_note_name(kvm_host, tmp_path):
    kernel = tmp_path / "kernel"
    kernel.write_bytes(_elf_with_note(struct.pack("<III", 4, 4, 18) + b"XenX" + b"\x00\x00\x00\x01"))
    p = run_pyvmm("run", "--kernel", str(kernel), "--memory", "32M", "--serial", "null")
    assert_process_usage_error(p, "kernel")


def test_process_initramfs_does_not_fit(guest_image, tmp_path):
    initramfs = tmp_path / "big.cpio"
    initramfs.write_bytes(bytes(8 << 20))
    p = run_pyvmm("run", "--kernel", guest_image["kernel"], "--initramfs", str(initramfs),
                  "--memory", "32M", "--serial", "null")
    assert_process_usage_error(p, "the initramfs (8388608 bytes) does not fit in 32 MiB")


# --- run plans: --share, --exec, --agent, --timeout, the default initramfs ---------------------
def plan_for(tmp_path, *argv: str, flavour=None):
    kernel = tmp_path / "vmlinux"
    kernel.write_bytes(b"k")
    args = cli.build_parser().parse_args(["run", "--kernel", str(kernel), *argv])
    return cli.run_plan(args, flavour or detect_flavour_for_tests())


def detect_flavour_for_tests():
    from pyvmm.platform import Flavour

    return Flavour("hardware", "kvm_intel", "test")


def test_share_words_go_on_the_command_line_without_the_agent(tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    plan = plan_for(tmp_path, "--share", f"{d},dax=on,readonly=on,cache_size=64M")
    assert plan.config.cmdline.split()[-1] == "pyvmm.share=data:dax:ro"
    assert plan.config.agent_words is None and not plan.config.run_mode
    assert plan.shares[0].cache_size == 64 << 20 and plan.shares[0].path == str(d)


def test_exec_uses_the_agent_and_run_mode(tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    plan = plan_for(tmp_path, "--share", f"{d},tag=t1", "--exec", "uname -s")
    words = plan.config.cmdline.split()
    assert "pyvmm.agent=hvc0" in words and not any(w.startswith("pyvmm.share=") for w in words)
    assert plan.config.agent_words == "pyvmm.share=t1"
    assert plan.config.run_mode and plan.exec_command == "uname -s"
    assert plan.config.serial == "null"   # stdout is the command's


def test_pyvmm_run_word_is_run_mode(tmp_path):
    plan = plan_for(tmp_path, "--append", "pyvmm.run=/x.sh")
    assert plan.config.run_mode and plan.config.serial == "stdio"


def test_custom_kernel_gets_the_default_initramfs(tmp_path, no_default_guest):
    (no_default_guest / "initramfs.cpio").write_bytes(b"070701")
    assert plan_for(tmp_path).config.initramfs == b"070701"
    assert plan_for(tmp_path, "--initramfs", "none").config.initramfs is None



def pvm_plan_for(tmp_path, *argv: str):
    from pyvmm.platform import Flavour

    return plan_for(tmp_path, *argv, flavour=Flavour("pvm", "kvm_pvm", "test"))


@pytest.mark.parametrize("memory, words", [
    (256 << 20, []),
    (200 << 20, []),
    (1000 << 20, []),                     # not whole 128 MiB blocks: all RAM at boot
    (512 << 20, ["mem=256M", "memhp_default_state=online", "pyvmm.memory=0x10000000+0x10000000"]),
    (1 << 30, ["mem=256M", "memhp_default_state=online", "pyvmm.memory=0x10000000+0x30000000"]),
    # RAM beyond 3 GiB sits above the MMIO hole, at 4 GiB: two ranges
    (4 << 30, ["mem=256M", "memhp_default_state=online",
               "pyvmm.memory=0x10000000+0xb0000000,0x100000000+0x40000000"]),
])
def test_deferred_memory_words(memory, words):
    from pyvmm.cmdline import deferred_memory_words

    assert deferred_memory_words(memory) == words


def test_deferred_memory_only_on_pvm_with_the_default_command_line(tmp_path):
    deferred = "pyvmm.memory=0x10000000+0x10000000"
    assert deferred in pvm_plan_for(tmp_path, "--memory", "512M").config.cmdline.split()
    assert "mem=256M" in pvm_plan_for(tmp_path, "--memory", "512M", "--append", "x=1").config.cmdline
    assert "pyvmm.memory" not in plan_for(tmp_path, "--memory", "512M").config.cmdline   # hardware KVM
    assert "pyvmm.memory" not in pvm_plan_for(tmp_path, "--memory", "512M",
                                              "--memory-at-boot").config.cmdline
    assert "pyvmm.memory" not in pvm_plan_for(tmp_path, "--memory", "512M",
                                              "--cmdline", "console=ttyS0").config.cmdline
    assert "pyvmm.memory" not in pvm_plan_for(tmp_path).config.cmdline                    # 256M


def test_pvm_boot_savers_only_on_pvm(tmp_path):
    from pyvmm.cmdline import PVM_BOOT_CMDLINE

    assert {"percpu_alloc=page", "noreplace-smp", "retain_initrd"} <= set(PVM_BOOT_CMDLINE.split())
    assert set(PVM_BOOT_CMDLINE.split()) <= set(pvm_plan_for(tmp_path).config.cmdline.split())
    assert "percpu_alloc=page" not in plan_for(tmp_path).config.cmdline.split()     # hardware KVM
    assert "noreplace-smp" not in plan_for(tmp_path).config.cmdline.split()
    assert "retain_initrd" not in plan_for(tmp_path).config.cmdline.split()


@pytest.mark.parametrize("argv, words", [
    (["--share", "/no/such/dir"], "not a directory"),
    (["--share", "{d},tag=bad/tag"], "tag"),
    (["--share", "{d},dax=maybe"], "dax"),
    (["--share", "{d},colour=red"], "--share"),
    (["--share", "{d},cache_size=3M"], "power of two"),
    (["--share", "{d}", "--share", "{d}"], "different"),
    (["--exec", "true", "--append", "pyvmm.run=/x"], "give one"),
    (["--agent", "file=/x"], "socket=PATH"),
    (["--timeout", "0"], "--timeout"),
    (["--timeout", "soon"], "--timeout"),
    (["--trace", "syscalls"], "--trace 'syscalls': expected exits[=FILE][,FILTER]"),
    (["--trace", "exits,serial"], "unknown filter 'serial'"),
    (["--trace", "exits,port=0x3ff-0x3f8"], "--trace port='0x3ff-0x3f8'"),
    (["--serial", "null", "--trace", "exits=/no/such/dir/trace.log"], "--trace: cannot write /no/such/dir/trace.log"),
])
def test_bad_run_options(capsys, tmp_path, argv, words):
    d = tmp_path / "data"
    d.mkdir()
    kernel = tmp_path / "vmlinux"
    kernel.write_bytes(b"k")
    argv = [a.replace("{d}", str(d)) for a in argv]
    assert_usage_error(*run_main(capsys, ["run", "--kernel", str(kernel), *argv]), words)


def test_trace_and_stats_go_into_the_plan(tmp_path):
    from pyvmm.trace import TraceSpec

    config = plan_for(tmp_path, "--trace", "exits=/x.log,port=0x3f8-0x3ff", "--stats").config
    assert config.trace == TraceSpec(path="/x.log", kinds=frozenset({"io"}), ports=((0x3F8, 0x3FF),))
    assert config.stats
    config = plan_for(tmp_path).config
    assert config.trace is None and not config.stats


def test_profile_goes_into_the_plan_with_the_kernel_for_symbols(tmp_path):
    config = plan_for(tmp_path, "--profile").config
    assert config.profile == "-" and config.profile_symbols == str(tmp_path / "vmlinux")
    assert plan_for(tmp_path, "--profile=/tmp/p.txt").config.profile == "/tmp/p.txt"
    assert plan_for(tmp_path).config.profile is None


def test_restore_checks_trace_first(capsys, tmp_path):
    assert_usage_error(*run_main(capsys, ["restore", str(tmp_path), "--trace", "exits,bogus"]),
                       "unknown filter 'bogus'")


def test_help_has_the_exit_status_table(capsys):
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    out = capsys.readouterr().out
    from pyvmm.status import ExitStatus

    for status in ExitStatus:
        assert f"  {status.value} " in out or f"{status.value} SIG" in out, status


def test_readme_has_the_exit_status_table():
    from pyvmm.status import EXIT_STATUS_TABLE

    readme = (REPO / "README.md").read_text()
    assert EXIT_STATUS_TABLE in readme
