# Run by bench/blk.py (pyvmm.run=/pyvmm-tests/blkbench.sh) with one virtio-blk
# disk, /dev/vda, whose contents it overwrites.  Prints one `blkbench ...` line
# per test (guest/helpers/blkbench.c): sequential write, sequential read
# (O_DIRECT, BS-byte requests over SIZE bytes), then 4 KiB random reads
# (O_DIRECT, COUNT requests or SECS seconds, whichever comes first).
# Command-line words (defaults in brackets): pyvmm.blkbench.size= [64M],
# .bs= [1M], .count= [100000], .secs= [3].
# Guest kernel work is slow on PVM hosts (fork+exec ~140 ms): the parameters
# are read with the shell's own `read`, and only blkbench itself is run.
size=64M bs=1M count=100000 secs=3
read -r cmdline </proc/cmdline
for word in $cmdline; do
    case "$word" in
        pyvmm.blkbench.size=*) size=${word#*=} ;;
        pyvmm.blkbench.bs=*) bs=${word#*=} ;;
        pyvmm.blkbench.count=*) count=${word#*=} ;;
        pyvmm.blkbench.secs=*) secs=${word#*=} ;;
    esac
done
blkbench seqwrite /dev/vda "$size" "$bs" || exit 1
blkbench seqread /dev/vda "$size" "$bs" || exit 1
blkbench randread /dev/vda "$size" 4096 "$count" "$secs" || exit 1
