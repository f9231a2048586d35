# Typed into the guest shell by tests/test_virtiofs_boot.py, with the share
# mounted at /mnt/share by /init (pyvmm.share=share).  Few processes: each
# fork+exec costs ~0.14 s of emulated kernel time on PVM hosts.
cd /mnt/share || exit 1
echo "host-sum: $(pattern sum host.bin)"
pattern write guest.bin 1048576 5 && echo "guest-write: ok"
mkdir tree
i=0
while [ $i -lt 20 ]; do echo "file $i" > tree/f$i; i=$((i + 1)); done
mv tree/f0 tree/renamed
rm tree/f1
echo "listing: $(ls tree | sort | tr '\n' ' ')"
echo "fs-checks: done"
