# pyvmm demo, run by /init for `make demo` (pyvmm.run=/demo.sh) with the share
# of guest/build/demo-share mounted at /mnt/share with -o dax (pyvmm.dax=1).
# Guest kernel work is slow on PVM hosts (fork+exec ~0.14 s), so this stays short.
echo "demo: kernel $(uname -r), $(nproc) CPU(s)"
for dir in /mnt/*; do
    [ -d "$dir" ] || continue
    echo "demo: $(grep " $dir " /proc/mounts)"
    echo "demo: share $dir holds: $(ls "$dir" | head -n 10 | tr '\n' ' ')"
    [ -f "$dir/hello.txt" ] && echo "demo: $dir/hello.txt says: $(cat "$dir/hello.txt")"
    echo "written by the guest ($(uname -r), $(nproc) CPUs)" > "$dir/from-guest.txt"
    if [ -f "$dir/dax.bin" ]; then
        # mmap of a DAX file: the loads hit the host's page cache through the window
        echo "demo: mmap of dax.bin through the DAX window: $(mmapread "$dir/dax.bin")"
        echo "demo: read() of dax.bin: $(pattern sum "$dir/dax.bin")"
        daxtool store "$dir/stored-by-guest.txt" 0 "stored through a DAX mapping" >/dev/null &&
            echo "demo: stored into stored-by-guest.txt through its DAX mapping (msync)"
    fi
done
