# Run by tests/test_boot.py through pyvmm.run=/pyvmm-tests/boot-checks.sh.
# Prints what the test checks, then exits with the status named by the
# command-line word pyvmm.test.status=N, which /init hands to the VMM.
status=0
for word in $(cat /proc/cmdline); do
    case "$word" in
        pyvmm.test.status=*) status=${word#*=} ;;
    esac
done
echo "check: cpus=$(nproc) epoch=$(date +%s)"
# Words the kernel parsed (guest/patches/0011): a built-in module parameter written
# with dashes (printk.always-kmsg-dump=1), a __setup() word (norandmaps: 0, else 2)
# and an early one (quiet: 4, else 7).
echo "check: params kmsg_dump=$(cat /sys/module/printk/parameters/always_kmsg_dump)" \
    "randmaps=$(cat /proc/sys/kernel/randomize_va_space)" \
    "loglevel=$(cut -f1 /proc/sys/kernel/printk)"
exit "$status"
