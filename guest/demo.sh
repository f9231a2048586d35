#!/usr/bin/env bash
# `make demo`: boot the default guest with 2 vCPUs and a virtio-fs share of
# guest/build/demo-share served by pyvmm-virtiofsd over vhost-user, with a
# 64 MiB DAX window (BAR 2, a KVM memory slot); the guest mounts it with
# -o dax and runs /demo.sh (in the initramfs): it reads a host file through
# an mmap that lands on the host's page cache, stores through another, and
# writes a file the host then shows.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
venv=$here/../.venv/bin
pyvmm=${PYVMM:-$venv/pyvmm}
share=$here/build/demo-share
sock=$here/build/demo-virtiofsd.sock
log=$here/build/demo-virtiofsd.log
mkdir -p "$share"
echo "Hello from the host, $(date -u)" > "$share/hello.txt"
"$here/build/initramfs.root/bin/pattern" write "$share/dax.bin" 8M 42
printf '%64s' '' > "$share/stored-by-guest.txt"
rm -f "$share/from-guest.txt" "$sock"
"$venv/pyvmm-virtiofsd" --socket-path "$sock" --shared-dir "$share" 2> "$log" &
backend=$!
trap 'kill $backend 2>/dev/null || true' EXIT
for _ in $(seq 200); do [ -S "$sock" ] && break; sleep 0.05; done
[ -S "$sock" ] || { echo "demo: pyvmm-virtiofsd did not start:"; cat "$log"; exit 1; }
"$pyvmm" run --cpus 2 --fs "tag=share,socket=$sock,dax=on,cache_size=64M" \
    --append "pyvmm.share=share pyvmm.dax=1 pyvmm.run=/demo.sh"
echo "host: the guest wrote: $(cat "$share/from-guest.txt")"
echo "host: pattern sum of dax.bin on the host: $("$here/build/initramfs.root/bin/pattern" sum "$share/dax.bin")"
echo "host: stored-by-guest.txt now says: $(tr -d '\0' < "$share/stored-by-guest.txt" | sed 's/ *$//')"
wait $backend || true
echo "host: pyvmm-virtiofsd: $(grep -o 'DAX: .*' "$log" || echo 'no DAX line in its log')"
