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
exit "$status"
