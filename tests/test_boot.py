"""Boot tests: the default guest (guest/build/) under KVM.

Guest boots take tens of seconds on PVM hosts, so each boot checks many
things at once: one interactive boot with 2 vCPUs and one in run mode.
"""

from __future__ import annotations

import re
import struct
import time

import pytest

from pyvmm.testing import VmmProcess

pytestmark = pytest.mark.boot

BOOT_TIMEOUT = 240  # seconds to `pyvmm-guest: ready`; PVM boots take 5-40 s
COMMAND_TIMEOUT = 180  # a typed command's output: seconds alone, minutes on a loaded 2-core host


def builtin_sysfs_params(vmlinux: str) -> set[str]:
    """"M/parameters/P" for each built-in parameter that has a mode, from the kernel's
    __param section (struct kernel_param, include/linux/moduleparam.h: name, mod, ops
    pointers, then u16 perm; 40 bytes on x86-64).  kernel/params.c: the module is the
    name up to its first dot, "kernel" for a name without one."""
    from elftools.elf.elffile import ELFFile

    found = set()
    with open(vmlinux, "rb") as f:
        elf = ELFFile(f)
        loaded = [(s["sh_addr"], s.data()) for s in elf.iter_sections()
                  if s["sh_addr"] and s["sh_type"] == "SHT_PROGBITS"]

        def string_at(addr: int) -> str:
            base, data = next((b, d) for b, d in loaded if b <= addr < b + len(d))
            return data[addr - base:data.index(b"\0", addr - base)].decode()

        params = elf.get_section_by_name("__param").data()
        for off in range(0, len(params), 40):
            name, _mod, _ops, perm = struct.unpack_from("<QQQH", params, off)
            if perm:
                module, dot, param = string_at(name).partition(".")
                found.add(f"{module}/parameters/{param}" if dot else f"kernel/parameters/{module}")
    return found


def test_interactive_boot_two_cpus_serial_input_and_reboot(guest_image):
    """ready -> typed commands run in the shell -> 2 CPUs -> right clock -> delay loop not
    calibrated -> all 512M of RAM online (on PVM: 256M at boot, the rest added by /init
    after ready) and free -> a clean kernel log -> every built-in module parameter in sysfs ->
    reboot -f exits 0."""
    g = VmmProcess.pyvmm_run("--kernel", guest_image["kernel"], "--initramfs", guest_image["initramfs"],
                     "--cpus", "2", "--memory", "512M")
    try:
        ready = g.wait_for("pyvmm-guest: ready", BOOT_TIMEOUT)
        print(f"[{guest_image['flavour']} KVM, default kernel] ready after {ready:.1f} s")
        # Typed while the shell starts: the UART keeps it until the driver listens.
        g.send("echo typed-$((6*7)) cpus=$(grep -c ^processor /proc/cpuinfo) epoch=$(date +%s)\n")
        m = g.wait_for_regex(r"typed-42 cpus=(\d+) epoch=(\d+)\r?\n", COMMAND_TIMEOUT)
        host_epoch = time.time()
        assert int(m.group(1)) == 2, "the guest does not see 2 CPUs"
        # The CMOS RTC sets the guest clock: it must agree with the host.
        assert abs(int(m.group(2)) - host_epoch) < 120, "guest clock is off"
        # No lpj= on the command line: kvmclock presets the delay loop (the boot CPU's
        # line; the others take the preset value without a line), none calibrates.
        # On PVM the initramfs's pages are kept (retain_initrd), not poisoned and freed.
        g.send("echo calib-$(dmesg | grep -c 'Calibrating delay loop (skipped) preset')-"
               "$(dmesg | grep Calibrating | grep -vc skipped)-$(grep -c lpj= /proc/cmdline)-"
               "$(dmesg | grep -c 'Freeing initrd memory')\n")
        m = g.wait_for_regex(r"calib-(\d+)-(\d+)-(\d+)-(\d+)\r?\n", COMMAND_TIMEOUT)
        assert m.groups()[:3] == (b"1", b"0", b"0"), "the guest calibrated its delay loop"
        assert int(m.group(4)) == (guest_image["flavour"] != "pvm"), "initrd kept on PVM only"
        # 4 memory blocks of 128 MiB: wait (at most 100 s) until they are all online
        g.send("n=0; i=0; until [ $n = 4 ] || [ $i = 200 ]; do sleep 0.5; i=$((i+1)); "
               "n=$(cat /sys/devices/system/memory/memory*/state | grep -c online); done; "
               "echo blocks-$n-kib-$(grep MemTotal /proc/meminfo | tr -s ' ' | cut -d' ' -f2)-"
               "$(grep -c mem=256M /proc/cmdline)\n")
        m = g.wait_for_regex(r"blocks-(\d+)-kib-(\d+)-(\d)\r?\n", COMMAND_TIMEOUT)
        assert int(m.group(1)) == 4 and int(m.group(2)) > 480 << 10, "the guest lacks RAM"
        assert int(m.group(3)) == (guest_image["flavour"] == "pvm"), "RAM beyond 256M deferred on PVM only"
        # Every page reached the allocator (guest/patches/0005 skips the checks of fresh pages)
        g.send("echo free-kib-$(grep MemFree /proc/meminfo | tr -s ' ' | cut -d' ' -f2)\n")
        assert int(g.wait_for_regex(r"free-kib-(\d+)\r?\n", COMMAND_TIMEOUT).group(1)) > 400 << 10
        # The kernel's log (guest/patches/0018, 0019): no complaint about a page's state and
        # no warning; a message longer than printk's stack buffer (the command line: formatted
        # twice) and a short one (formatted once, then copied) both stored whole.
        g.send(r"""read -r cmd < /proc/cmdline; dmesg > /tmp/log; """
               r"""echo log-$(grep -c -e BUG -e WARNING -e 'Bad page' /tmp/log)-"""
               r"""$(grep -c -F "] Kernel command line: $cmd" /tmp/log)-"""
               r"""$(grep -c -E '^\[[ .0-9]+\] Freeing unused kernel image \(initmem\) memory: [0-9]+K$' /tmp/log)-end"""
               "\n")
        m = g.wait_for_regex(r"log-(\d+)-(\d+)-(\d+)-end\r?\n", COMMAND_TIMEOUT)
        assert m.groups() == (b"0", b"1", b"1"), "kernel log: problems, command line, initmem lines"
        # /sys/module/*/parameters holds each built-in parameter with a mode (guest/patches/0007
        # makes each module's group once)
        g.send("echo params-$((1+1)): $(cd /sys/module && echo */parameters/*) :end\n")
        m = g.wait_for_regex(r"params-2: (.*) :end\r?\n", COMMAND_TIMEOUT)
        listed = set(m.group(1).decode().split())
        assert listed == builtin_sysfs_params(guest_image["kernel"])
        g.send("reboot -f\n")
        assert g.wait_exit(COMMAND_TIMEOUT) == 0
        assert "guest reset (i8042)" in g.stderr
    finally:
        g.kill()


def test_run_mode_exit_status_propagates(guest_image):
    """pyvmm.run=PATH runs the script; its status reaches the VMM through the debug-exit port.
    The kernel honoured a module parameter written with dashes (printk.always-kmsg-dump),
    a __setup() word (norandmaps) and an early one (quiet).
    --stats: the exit statistics on stderr add up."""
    g = VmmProcess.pyvmm_run("--kernel", guest_image["kernel"], "--initramfs", guest_image["initramfs"],
                     "--append", "pyvmm.run=/pyvmm-tests/boot-checks.sh pyvmm.test.status=42 "
                     "printk.always-kmsg-dump=1 norandmaps", "--stats")
    try:
        g.wait_for("pyvmm-guest: ready", BOOT_TIMEOUT)
        status = g.wait_exit(120)
        assert "check: cpus=1" in g.text
        assert "check: params kmsg_dump=Y randmaps=0 loglevel=4" in g.text
        assert "pyvmm-guest: exit 42" in g.text
        assert status == 42
        stats = [line.removeprefix("pyvmm: stats: ") for line in g.stderr.splitlines()
                 if line.startswith("pyvmm: stats: ")]
        print("\n".join(stats))
        total = int(re.match(r"(\d+) exits to pyvmm in ", stats[0]).group(1))
        by = {key: dict((k, int(n)) for k, n in re.findall(r"(\S+(?: \S+)?) (\d+)(?:,|$)", line[len(key):]))
              for line in stats for key in ("by reason: ", "by device and direction: ")
              if line.startswith(key)}   # "IO 759, MMIO 1" -> {"IO": 759, "MMIO": 1}
        reasons, devices = by["by reason: "], by["by device and direction: "]
        assert sum(reasons.values()) == total > 0
        assert reasons.get("IO", 0) + reasons.get("MMIO", 0) == sum(devices.values())
        assert devices["debug-exit out"] == 1   # the status, one byte
        assert devices["pci-config out"] > 0
        if guest_image["flavour"] == "pvm":
            assert re.search(r"PVM fix-ups .*int3 \d", "\n".join(stats))  # the kernel's int3 self-test
        assert "kvm_stat" in stats[-1]
        assert "exit statistics:" not in g.stderr   # --stats prints them once, not in the log too
    finally:
        g.kill()


def test_sigterm_stops_all_vcpus_and_the_profile_names_the_boot(guest_image, tmp_path):
    """SIGTERM while the guest runs: every vCPU thread stops and pyvmm exits 143.
    --profile: the report is still written, with both vCPUs' samples and the kernel's
    function names."""
    import signal

    report = tmp_path / "profile.txt"
    g = VmmProcess.pyvmm_run("--kernel", guest_image["kernel"], "--initramfs", guest_image["initramfs"],
                     "--cpus", "2", f"--profile={report}")
    try:
        g.wait_for("pyvmm-guest: ready", BOOT_TIMEOUT)
        g.proc.send_signal(signal.SIGTERM)
        assert g.wait_exit(30) == 143
        assert "SIGTERM received" in g.stderr
        assert "did not stop in time" not in g.stderr
    finally:
        g.kill()
    text = report.read_text()
    print(text[:3000])
    m = re.match(r"guest profile: (\d+) samples at 1000 Hz \(vcpu0 (\d+), vcpu1 (\d+)\): "
                 r"kernel ([\d.]+)%", text)
    assert m and int(m.group(2)) > 0 and int(m.group(3)) > 0, text[:200]
    own = text[text.index("self: where the vCPUs were"):]
    # the default kernel is an ELF vmlinux: its functions have names
    assert re.search(r"^\s+\d+\s+[\d.]+  [a-z_][a-z0-9_.]*$", own, re.M), own[:500]
    if guest_image["flavour"] == "pvm":   # vcpu0's boot is all emulated kernel code there
        assert float(m.group(4)) > 30
        assert "memmap_init_range" in text and "start_kernel" in text


def test_stock_bzimage_boots(kvm_host):
    """Debian's stock kernel (a bzImage) through the Linux boot protocol."""
    if kvm_host == "pvm":
        pytest.skip("needs hardware KVM: on PVM a bzImage spends minutes in its decompressor "
                    "and the stock kernel lacks the PVM syscall fix-up")
    from pyvmm.cli import default_guest_dir

    d = default_guest_dir()
    bz, initrd = d / "debian" / "bzImage", d / "initramfs-debian.cpio"
    if not bz.exists():
        pytest.fail(f"{bz} is missing: run `make guest KERNEL=debian`")
    g = VmmProcess.pyvmm_run("--kernel", str(bz), "--initramfs", str(initrd),
                     "--append", "pyvmm.run=/pyvmm-tests/boot-checks.sh pyvmm.test.status=7")
    try:
        g.wait_for("pyvmm-guest: ready", BOOT_TIMEOUT)
        assert g.wait_exit(120) == 7
    finally:
        g.kill()
