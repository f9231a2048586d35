# Run by tests/test_virtio_boot.py (pyvmm.run=/pyvmm-tests/virtio-checks.sh) with
# --disk (vda, read-write, pre-filled by the host with pattern seed 1),
# --disk readonly=on (vdb), --rng and --console socket=PATH.
echo "pci:"
for d in /sys/bus/pci/devices/*; do
    echo "pci-dev ${d##*/} $(cat $d/vendor) $(cat $d/device) $(cat $d/class)"
done
echo "vda-check: $(pattern check /dev/vda 8M 1 && echo ok)"
pattern write /dev/vda 8M 2 && sync && echo "vda-write: ok"
if dd if=/dev/zero of=/dev/vdb bs=4096 count=1 oflag=direct 2>/dev/null; then
    echo "vdb-write: accepted"
else
    echo "vdb-write: refused"
fi
echo "vdb-read: $(pattern sum /dev/vdb)"
echo "rng: $(cat /sys/class/misc/hw_random/rng_current) $(head -c 4096 /dev/hwrng | wc -c)"
# Device reset and re-initialisation: unbind the rng's virtio-pci driver (the
# driver resets the device) and bind it again (a fresh negotiation).
for d in /sys/bus/pci/devices/*; do
    [ "$(cat $d/device)" = 0x1044 ] && rng=${d##*/}
done
echo "$rng" > /sys/bus/pci/drivers/virtio-pci/unbind
echo "$rng" > /sys/bus/pci/drivers/virtio-pci/bind
echo "rng-rebound: $(cat /sys/class/misc/hw_random/rng_current) $(head -c 4096 /dev/hwrng | wc -c)"
exec 3<>/dev/hvc0
echo "hvc-ready" >&3
read -r line <&3
echo "hvc-got: $line"
echo "done"
