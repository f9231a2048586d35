#!/usr/bin/env bash
# Fetch Debian 12's stock kernel for `make guest KERNEL=debian` (hardware-KVM hosts).
#
# Downloads the linux-image-*-amd64 package that the metapackage
# linux-image-amd64 currently depends on (never installs it), unpacks it in a
# temporary directory, and writes
#   OUTDIR/bzImage            boot/vmlinuz-KVER
#   OUTDIR/config             boot/config-KVER (for reference)
#   OUTDIR/kernel-release     KVER
#   OUTDIR/modules/*.ko       virtio-pci, virtio-blk, virtio-console, virtio-rng,
#                             fuse, virtiofs and their dependencies, decompressed
#   OUTDIR/modules/load-order the order /init loads them in
# for `guest/build-initramfs.sh OUT.cpio --modules OUTDIR/modules`.
# The .deb is cached in <cache>/debian-kernel/ (<cache>: default_cache in
# guest/common.sh: $PYVMM_CACHE, else /var/cache/pyvmm for root, else
# ~/.cache/pyvmm).
# Unchanged outputs are not rewritten (make sees no change); OUTDIR/.source
# names the .deb they came from, and nothing is unpacked while it is current.
#
# Usage: guest/fetch-debian-kernel.sh OUTDIR
# Needs: apt-get, dpkg-deb, depmod (kmod), python3; root for apt-get update.
# Exit status: 0, 1 (failed), 2 (bad arguments), 3 (missing tools).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
. "$here/common.sh"
PYTHON=${PYTHON:-python3}
cache=$(default_cache)/debian-kernel
meta=linux-image-amd64
wanted_modules="virtio_pci virtio_blk virtio_console virtio_rng fuse virtiofs"

die() { echo "fetch-debian-kernel: $*" >&2; exit 1; }

# The versioned image package the metapackage depends on, e.g. linux-image-6.1.0-56-amd64.
resolve_package() {
    apt-cache depends "$meta" 2>/dev/null |
        awk '$1 == "Depends:" && $2 ~ /^linux-image-[0-9].*-amd64$/ { print $2; exit }'
}

# "FILENAME SHA256" of the package's .deb, as apt would download it.
package_file() {
    apt-get download --print-uris "$1" |
        awk '{ h = $4; sub(/^SHA256:/, "", h); print $2, h; exit }'
}

# Path of the cached .deb for package $1, downloading it if needed.
fetch_deb() {
    local pkg=$1 info file sum tmp
    info=$(package_file "$pkg")
    [ -n "$info" ] || die "apt-get download --print-uris $pkg printed nothing"
    read -r file sum <<< "$info"
    mkdir -p "$cache"
    if [ -f "$cache/$file" ] && echo "$sum  $cache/$file" | sha256sum -c --status; then
        echo "$cache/$file"
        return 0
    fi
    tmp=$(mktemp -d)
    # apt downloads as user _apt: let it write there (no "unsandboxed" warning).
    if id _apt >/dev/null 2>&1; then chown _apt "$tmp"; else chmod 777 "$tmp"; fi
    progress "downloading $file" >&2
    (cd "$tmp" && apt-get download -q "$pkg" >&2)
    echo "$sum  $tmp/$file" | sha256sum -c --status || die "$file: checksum mismatch"
    rm -f "$cache"/linux-image-*.deb  # older kernels: ~70 MB each
    mv "$tmp/$file" "$cache/$file"
    rm -rf "$tmp"
    echo "$cache/$file"
}

copy_if_changed() {  # SRC DST
    cmp -s "$1" "$2" 2>/dev/null || cp "$1" "$2"
}

main() {
    [ $# -eq 1 ] || { echo "usage: $0 OUTDIR" >&2; exit 2; }
    local outdir=$1 pkg deb kver
    need_tools apt-get:apt apt-cache:apt dpkg-deb:dpkg depmod:kmod sha256sum:coreutils \
        "$PYTHON:python3"
    progress "resolving $meta"
    pkg=$(resolve_package)
    if [ -z "$pkg" ]; then
        echo "fetch-debian-kernel: no candidate for $meta, running apt-get update" >&2
        apt-get update -qq
        pkg=$(resolve_package)
    fi
    [ -n "$pkg" ] || die "cannot resolve $meta with apt-cache (is this Debian 12?)"
    deb=$(fetch_deb "$pkg")
    local stamp="$outdir/.source"
    if [ "$(cat "$stamp" 2>/dev/null)" = "$(basename "$deb") $wanted_modules" ] &&
        [ -f "$outdir/bzImage" ] && [ -f "$outdir/modules/load-order" ]; then
        progress "Debian kernel up to date in $outdir ($(cat "$outdir/kernel-release"))"
        return 0
    fi
    work=$(mktemp -d)  # global: the EXIT trap runs after main returns
    trap 'rm -rf "$work"' EXIT
    progress "unpacking $(basename "$deb")"
    dpkg-deb -x "$deb" "$work/root"
    kver=$(ls "$work/root/lib/modules")
    [ -f "$work/root/boot/vmlinuz-$kver" ] || die "no boot/vmlinuz-$kver in $deb"
    # Debian ships modules.order and modules.builtin but no modules.dep: make it.
    depmod -b "$work/root" "$kver"
    mkdir -p "$outdir/modules"
    "$PYTHON" "$here/modules_order.py" "$work/root/lib/modules/$kver" "$outdir/modules" \
        $wanted_modules
    copy_if_changed "$work/root/boot/vmlinuz-$kver" "$outdir/bzImage"
    copy_if_changed "$work/root/boot/config-$kver" "$outdir/config"
    echo "$kver" > "$work/kernel-release"
    copy_if_changed "$work/kernel-release" "$outdir/kernel-release"
    echo "$(basename "$deb") $wanted_modules" > "$stamp"
    progress "Debian kernel $kver ($pkg) -> $outdir/bzImage, $outdir/modules"
}

main "$@"
