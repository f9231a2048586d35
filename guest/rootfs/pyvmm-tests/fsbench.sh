# Run by bench/fs.py (pyvmm.run=/pyvmm-tests/fsbench.sh) with a virtio-fs share
# mounted at /mnt/share by /init (pyvmm.share=share) that holds fsbench.bin.
# Prints `fsbench ...` lines:
#   fsbench exec centis=C                 `pattern sum` of an empty file: the
#                                         fork+exec cost inside the read timing
#   fsbench read hash=H bytes=N centis=C  `pattern sum` (1 MiB read() calls),
#                                         timed with /proc/uptime (10 ms steps)
#   fsbench mmap hash=H bytes=N mbps=M    /bin/mmapread, which times itself
# The guest page cache is dropped before each read, so both go through
# virtio-fs.  busybox date has no %N and each fork+exec costs ~0.14 s on PVM
# hosts: times come from the shell's own `read` of /proc/uptime.
f=/mnt/share/fsbench.bin
[ -f "$f" ] || { echo "fsbench: $f missing"; exit 1; }

# centis VAR: /proc/uptime's first field in centiseconds ("%lu.%02lu").
centis() {
    read -r up _ </proc/uptime
    eval "$1=\$(( ${up%.*} * 100 + 1${up#*.} - 100 ))"
}

: >/tmp/empty
centis t0
pattern sum /tmp/empty >/tmp/out || exit 1
centis t1
echo "fsbench exec centis=$((t1 - t0))"

echo 3 >/proc/sys/vm/drop_caches
centis t0
pattern sum "$f" >/tmp/out || exit 1
centis t1
read -r hash bytes </tmp/out
echo "fsbench read hash=$hash bytes=$bytes centis=$((t1 - t0))"

echo 3 >/proc/sys/vm/drop_caches
mmapread "$f" >/tmp/out || exit 1
read -r hash bytes mbps _ </tmp/out
echo "fsbench mmap hash=$hash bytes=$bytes mbps=$mbps"
