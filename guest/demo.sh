#!/usr/bin/env bash
# `make demo`: boot the default guest with 2 vCPUs and a virtio-fs share of
# guest/build/demo-share served by Debian's virtiofsd over vhost-user; the
# guest runs /demo.sh (in the initramfs), which reads and writes the share.
# (DAX: the window exists in pyvmm/devices/virtio/dax.py; the share uses it
# once pyvmm-virtiofsd, which can do DAX, lands.)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
pyvmm=${PYVMM:-$here/../.venv/bin/pyvmm}
share=$here/build/demo-share
sock=$here/build/demo-virtiofsd.sock
mkdir -p "$share"
echo "Hello from the host, $(date -u)" > "$share/hello.txt"
rm -f "$share/from-guest.txt" "$sock"
/usr/lib/qemu/virtiofsd --socket-path="$sock" -o source="$share" -o cache=auto \
    -o sandbox=chroot 2> "$here/build/demo-virtiofsd.log" &
backend=$!
trap 'kill $backend 2>/dev/null || true' EXIT
for _ in $(seq 100); do [ -S "$sock" ] && break; sleep 0.05; done
"$pyvmm" run --cpus 2 --fs "tag=share,socket=$sock" --append "pyvmm.share=share pyvmm.run=/demo.sh"
echo "host: the guest wrote: $(cat "$share/from-guest.txt")"
