#!/usr/bin/env bash
# Build pyvmm's default guest kernel (a PVH ELF vmlinux) from Debian's
# linux-source-6.1 with guest/kernel.config and guest/patches/*.patch.
#
# The result is cached outside the clone, under $PYVMM_CACHE (default
# /var/cache/pyvmm), keyed by a hash of the source tarball name, the config
# fragment and the patches: a rebuild happens only when one of them changes.
# Usage: guest/build-kernel.sh OUTPUT_VMLINUX
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=$1
cache=${PYVMM_CACHE:-/var/cache/pyvmm}
tarball=$(ls /usr/src/linux-source-6.1.tar.xz)
key=$( (basename "$tarball"; stat -c %s "$tarball"; cat "$here/kernel.config" "$here"/patches/*.patch) | sha256sum | cut -c1-16)
cached="$cache/kernel-$key/vmlinux"
if [ ! -f "$cached" ]; then
    work="$cache/kernel-$key.build"
    rm -rf "$work"
    mkdir -p "$work"
    trap 'rm -rf "$work"' EXIT   # a failed build leaves nothing half-made behind
    echo "guest: building kernel $key in $work (a few minutes on 2 cores)"
    tar -xf "$tarball" -C "$work"
    src="$work/linux-source-6.1"
    for p in "$here"/patches/*.patch; do
        patch -d "$src" -p1 --quiet < "$p"
    done
    make -C "$src" -s ARCH=x86_64 tinyconfig
    "$src/scripts/kconfig/merge_config.sh" -m -O "$src" "$src/.config" "$here/kernel.config" > "$work/merge.log"
    make -C "$src" -s ARCH=x86_64 olddefconfig
    # Every option we ask for must have survived olddefconfig.
    missing=0
    while read -r line; do
        case "$line" in
            CONFIG_*=n) opt=${line%=n}; grep -q "^$opt=" "$src/.config" && { echo "guest: $opt still set" >&2; missing=1; } ;;
            CONFIG_*=*) grep -qx "$line" "$src/.config" || { echo "guest: $line did not stick" >&2; missing=1; } ;;
        esac
    done < "$here/kernel.config"
    [ "$missing" = 0 ] || exit 1
    make -C "$src" -s ARCH=x86_64 -j"$(nproc)" vmlinux
    mkdir -p "$cache/kernel-$key"
    cp "$src/.config" "$cache/kernel-$key/config"
    cp "$src/vmlinux" "$cached.tmp"
    strip --strip-debug "$cached.tmp"
    mv "$cached.tmp" "$cached"
    rm -rf "$work"
fi
mkdir -p "$(dirname "$out")"
cmp -s "$cached" "$out" 2>/dev/null || cp "$cached" "$out"
echo "guest: kernel $key -> $out"
