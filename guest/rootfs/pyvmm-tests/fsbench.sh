# Run by bench/fs.py (pyvmm.run=/pyvmm-tests/fsbench.sh) with a virtio-fs share
# mounted at /mnt/share by /init (pyvmm.share=share, and -o dax with
# pyvmm.dax=1).  The host put three 64 MiB files there:
#   fsbench.bin  the file to read (`pattern write ... 7`; its hash is known)
#   write.bin    preallocated, overwritten here by write()  (seed 8)
#   mmapw.bin    preallocated, overwritten here through a mapping (seed 9)
# and checks them with `pattern check` after the guest is gone.
#
# Prints one line per phase, key=value words from a helper that times itself,
# plus the guest page cache (Cached: in /proc/meminfo, kB) around it:
#   fsbench mount <the /mnt/share line of /proc/mounts>
#   fsbench read hash=H bytes=N seconds=S mbps=M cached_before_kb=A cached_after_kb=B
#   fsbench read_warm ...       the same again, without dropping the cache:
#                               guest page cache, or (DAX) the window already
#                               mapped; a new process, so new page tables
#   fsbench mmap_read hash=H bytes=N mbps=M again_mbps=M2 ...   (M2: the
#                               second pass over the same mapping)
#   fsbench mmap_read_warm ...
#   fsbench write ...  fsbench mmap_write ...
#   fsbench meta files=N create_s=... ops_per_s=R cached_before_kb=A cached_after_kb=B
#   fsbench NAME failed status=N        (and the script goes on with the next)
# The page cache is written back and dropped before every phase but the warm
# ones, so each starts cold in the guest (the host's page cache stays warm).  Each fork+exec
# costs ~0.14 s of emulated kernel on PVM hosts: the helpers time themselves,
# and nothing here runs a process per file.
cd /mnt/share || exit 1
SIZE=64M
status=0

# cached VAR: Cached: from /proc/meminfo in kB, read by the shell itself.
cached() {
    while read -r key value _; do
        [ "$key" = Cached: ] && { eval "$1=$value"; return; }
    done </proc/meminfo
}

# mmap_read FILE: two passes over one mapping (the second has no page faults
# left), mmapread's "HASH BYTES MBPS MB/s MBPS2 MB/s" as key=value words.
mmap_read() {
    mmapread "$1" 2 >/tmp/mmapread.out || return 1
    read -r hash bytes mbps _ again _ </tmp/mmapread.out
    echo "hash=$hash bytes=$bytes mbps=$mbps again_mbps=$again"
}

# measure NAME COMMAND...: COMMAND's words and the guest page cache around it.
measure() {
    name=$1
    shift
    cached before
    if "$@" >/tmp/phase.out; then
        cached after
        read -r words </tmp/phase.out
        echo "fsbench $name $words cached_before_kb=$before cached_after_kb=$after"
    else
        echo "fsbench $name failed status=$?"
        status=1
    fi
}

# phase NAME COMMAND...: measure, starting from a written-back, dropped cache.
phase() {
    sync
    echo 3 >/proc/sys/vm/drop_caches
    measure "$@"
}

echo "fsbench mount $(grep ' /mnt/share ' /proc/mounts)"
phase read rwbench read fsbench.bin
measure read_warm rwbench read fsbench.bin
phase mmap_read mmap_read fsbench.bin
measure mmap_read_warm mmap_read fsbench.bin
phase write rwbench write write.bin $SIZE 8
phase mmap_write mmapwrite mmapw.bin $SIZE 9
mkdir -p meta && phase meta metabench meta 1000
sync
exit $status
