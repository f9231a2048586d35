# pyvmm demo, run by /init for `make demo` (pyvmm.run=/demo.sh).
# Guest kernel work is slow on PVM hosts (fork+exec ~0.14 s), so this stays short.
echo "demo: kernel $(uname -r), $(nproc) CPU(s)"
head -n 1 /proc/meminfo
for dir in /mnt/*; do
    [ -d "$dir" ] || continue
    echo "demo: share $dir:"
    ls "$dir" | head -n 10
    [ -f "$dir/hello.txt" ] && echo "demo: $dir/hello.txt says: $(cat "$dir/hello.txt")"
    echo "written by the guest ($(uname -r), $(nproc) CPUs)" > "$dir/from-guest.txt"
done
pattern write /tmp/demo.bin 1M 2024 && pattern check /tmp/demo.bin 1M 2024 && echo "demo: pattern ok"
mmapread /tmp/demo.bin
