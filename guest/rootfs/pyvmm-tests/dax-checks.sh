# Typed into the guest shell by tests/test_virtiofsd_boot.py: a share served by
# pyvmm-virtiofsd, mounted with -o dax at /mnt/share (pyvmm.share=share
# pyvmm.dax=1) over a 16 MiB DAX window.  Few processes: each fork+exec costs
# ~0.14 s of emulated kernel time on PVM hosts.
cd /mnt/share || exit 1
echo "mount: $(grep ' /mnt/share ' /proc/mounts)"
echo "host-sum: $(pattern sum host.bin)"
pattern write guest.bin 1048576 5 && echo "guest-write: ok"

# A file twice the window: the guest recycles window ranges.  Neither read()
# nor mmap of a DAX file goes through the guest page cache.
cached() { while read -r k v _; do [ "$k" = Cached: ] && echo "$v"; done </proc/meminfo; }
echo 3 >/proc/sys/vm/drop_caches
c0=$(cached)
echo "big-read: $(pattern sum big.bin)"
echo "big-mmap: $(mmapread big.bin)"
c1=$(cached)
echo "cache-growth-kb: $((c1 - c0))"

# guest store through a shared mapping, msync'ed: the host reads it
daxtool store store.txt 100 guest-stored-this
# write(2) from a DAX mapping into a new file: its buffer is in the DAX window
daxtool copy host.bin copy.bin && echo "copy-sum: $(pattern sum copy.bin)"

# 200 files: created, moved to another directory (renames), half deleted
mkdir tree moved
i=0
while [ $i -lt 200 ]; do echo "file $i" >tree/f$i; i=$((i + 1)); done
mv tree/* moved/
rm moved/f? moved/f??
echo "moved-count: $(ls moved | wc -l) tree-count: $(ls tree | wc -l)"

# escapes: the guest resolves every path and symlink itself, inside the share
echo "escape-abs: $(cat abs-link 2>&1)"
echo "escape-up: $(cat up-link/secret.txt 2>&1)"
echo "escape-dotdot: $(cat /mnt/share/../secret.txt 2>&1)"
ln -s ../../../secret.txt guest-link
echo "escape-guest-link: $(cat guest-link 2>&1)"
echo "dax-checks: done"
