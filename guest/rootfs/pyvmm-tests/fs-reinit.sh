# Typed into the guest shell by tests/test_virtiofsd_boot.py after dax-checks.sh:
# unmount the share, unbind and rebind the virtio-fs PCI function (device
# reset, then a new driver initialisation: rings, memory table, FUSE_INIT and
# DAX window again), mount it again with -o dax and read through it.
cd /
umount /mnt/share || echo "reinit: umount failed"
fsdev=
for d in /sys/bus/pci/devices/*; do
    read -r id <"$d/device"
    [ "$id" = 0x105a ] && fsdev=${d##*/}
done
echo "reinit: virtio-fs at $fsdev"
echo "$fsdev" >/sys/bus/pci/drivers/virtio-pci/unbind && echo "reinit: unbound"
echo "$fsdev" >/sys/bus/pci/drivers/virtio-pci/bind && echo "reinit: bound"
mount -t virtiofs share /mnt/share -o dax && echo "reinit: mounted"
echo "reinit-sum: $(pattern sum /mnt/share/host.bin)"
echo "reinit-mmap: $(mmapread /mnt/share/big.bin)"
echo "fs-reinit: done"
