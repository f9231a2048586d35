#!/usr/bin/env bash
# Build pyvmm's default guest kernel (a PVH ELF vmlinux) from a Linux 6.1
# source with guest/kernel.config and guest/patches/*.patch.
#
# The source is Debian's linux-source-6.1 (/usr/src/linux-source-6.1.tar.xz)
# unless --source names another Linux 6.1 tarball or tree (a tree is copied,
# never built in place).  The result is cached outside the clone, in
# <cache>/kernel-KEY/vmlinux with <cache> as guest/common.sh's default_cache
# ($PYVMM_CACHE, else /var/cache/pyvmm for root, else ~/.cache/pyvmm) and KEY
# from guest/kernel_key.py (the source's name and size, or a tree's version
# and file list, plus the config fragment and the patches): a rebuild happens
# only when one of them changes.
#
# Usage: guest/build-kernel.sh [--source DIR|TARBALL] OUTPUT_VMLINUX
#        guest/build-kernel.sh [--source DIR|TARBALL] --check
#            exit 0 when a build could run (or the kernel is cached already)
#        guest/build-kernel.sh [--source DIR|TARBALL] --print-key
# Exit status: 0, 1 (the build failed), 2 (bad --source), 3 (missing tools).
# Environment: PYTHON (default python3), PYVMM_T0 (guest/common.sh), PYVMM_TICK
# (seconds between the progress lines of the compile, default 30).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
. "$here/common.sh"
PYTHON=${PYTHON:-python3}
DEFAULT_SOURCE=/usr/src/linux-source-6.1.tar.xz
# Tools (or files) a kernel build needs, as TOOL:DEBIAN-PACKAGE.
build_tools="make:make gcc:gcc ld:binutils /usr/include/stdio.h:libc6-dev flex:flex
  bison:bison bc:bc patch:patch tar:tar xz:xz-utils strip:binutils
  /usr/include/gelf.h:libelf-dev"

die() { echo "build-kernel: $*" >&2; exit 1; }

usage() {
    echo "usage: $0 [--source DIR|TARBALL] OUTPUT_VMLINUX | --check | --print-key" >&2
    exit 2
}

parse_args() {
    source=$DEFAULT_SOURCE
    out=""
    mode=build
    while [ $# -gt 0 ]; do
        case "$1" in
            --source) [ $# -ge 2 ] || usage; source=$2; shift 2 ;;
            --source=*) source=${1#--source=}; shift ;;
            --check) mode=check; shift ;;
            --print-key) mode=print-key; shift ;;
            -*) usage ;;
            *) [ -z "$out" ] || usage; out=$1; shift ;;
        esac
    done
    if [ "$mode" = build ] && [ -z "$out" ]; then usage; fi
}

check_source() {
    need_tools "$PYTHON:python3"
    if [ "$source" = "$DEFAULT_SOURCE" ] && [ ! -e "$source" ]; then
        echo "guest: no kernel source $source: apt-get install --no-install-recommends" \
            "linux-source-6.1 (Debian 12), or give --source DIR|TARBALL (Linux 6.1)" >&2
        exit 3
    fi
    "$PYTHON" "$here/kernel_key.py" check "$source" >/dev/null || exit 2
}

compute_key() {
    local patches=("$here"/patches/*.patch)
    [ -e "${patches[0]}" ] || patches=()
    "$PYTHON" "$here/kernel_key.py" key "$source" "$here/kernel.config" "${patches[@]}" || exit 2
}

# Unpack or copy the source into $work; sets src to its top directory.
prepare_tree() {
    if [ -d "$source" ]; then
        progress "copying $source"
        mkdir -p "$work/src"
        tar -C "$source" --exclude=./.git -cf - . | tar -C "$work/src" -xf -
        src="$work/src"
        if [ -e "$src/.config" ]; then make -C "$src" -s mrproper; fi
        return 0
    fi
    progress "unpacking $source"
    mkdir -p "$work/unpack"
    tar -xf "$source" -C "$work/unpack"
    local tops=("$work"/unpack/*/Makefile)
    [ ${#tops[@]} = 1 ] && [ -f "${tops[0]}" ] ||
        { echo "guest: --source $source: not ONE top-level directory with a Makefile" >&2; exit 2; }
    src=$(dirname "${tops[0]}")
    "$PYTHON" "$here/kernel_key.py" check "$src" >/dev/null || exit 2
}

apply_patches() {
    local p n=0
    for p in "$here"/patches/*.patch; do
        [ -e "$p" ] || continue
        n=$((n + 1))
        patch -d "$src" -p1 --quiet --batch --forward < "$p" || die "$(basename "$p") does not apply to $source"
    done
    progress "applied $n patch(es) from guest/patches"
}

configure() {
    progress "configuring (tinyconfig + guest/kernel.config)"
    local log="$work/configure.log"
    { make -C "$src" -s ARCH=x86_64 tinyconfig &&
      "$src/scripts/kconfig/merge_config.sh" -m -O "$src" "$src/.config" "$here/kernel.config" &&
      make -C "$src" -s ARCH=x86_64 olddefconfig; } > "$log" 2>&1 ||
        { cat "$log" >&2; die "configuring the kernel failed"; }
    # Every option we ask for must have survived olddefconfig.
    local line opt missing=0
    while read -r line; do
        case "$line" in
            CONFIG_*=n) opt=${line%=n}; grep -q "^$opt=" "$src/.config" && { echo "guest: $opt still set" >&2; missing=1; } ;;
            CONFIG_*=*) grep -qx "$line" "$src/.config" || { echo "guest: $line did not stick" >&2; missing=1; } ;;
        esac
    done < "$here/kernel.config"
    [ "$missing" = 0 ] || exit 1
}

# How many objects the last kernel build in this cache made ("" if none did).
expected_objects() {
    local f
    f=$(ls -t "$cache"/kernel-*/objects 2>/dev/null | head -n1)
    [ -n "$f" ] && cat "$f" || true
}

# Prints a line every $PYVMM_TICK (30) s while the compiler runs: how many objects are built
# (of how many the last build here made, when one did).
ticker() {
    local sleeper="" of=""
    trap '[ -z "$sleeper" ] || kill "$sleeper" 2>/dev/null; exit 0' TERM
    [ -z "$1" ] || of=" of ~$1"
    while :; do
        sleep "${PYVMM_TICK:-30}" & sleeper=$!
        wait "$sleeper" || true
        progress "compiling the kernel: $(find "$src" -name '*.o' | wc -l)$of objects built"
    done
}

compile() {
    local jobs status=0
    jobs=$(nproc)
    progress "compiling the kernel (make -j$jobs vmlinux; 3.5 to 12 minutes on 2 cores)"
    ticker "$(expected_objects)" &
    ticker_pid=$!
    make -C "$src" -s ARCH=x86_64 -j"$jobs" vmlinux || status=$?
    kill "$ticker_pid" 2>/dev/null || true
    wait "$ticker_pid" 2>/dev/null || true
    ticker_pid=""
    [ "$status" = 0 ] || die "make vmlinux failed (status $status)"
}

build() {
    work="$cache/kernel-$key.build"
    rm -rf "$work"
    mkdir -p "$work"
    ticker_pid=""
    # A failed build leaves nothing half-made behind, and no ticker running.
    trap '[ -z "$ticker_pid" ] || kill "$ticker_pid" 2>/dev/null; rm -rf "$work"' EXIT
    progress "building kernel $key in $work"
    prepare_tree
    apply_patches
    configure
    compile
    progress "stripping vmlinux"
    mkdir -p "$cache/kernel-$key"
    cp "$src/.config" "$cache/kernel-$key/config"
    find "$src" -name '*.o' | wc -l > "$cache/kernel-$key/objects"
    cp "$src/vmlinux" "$cached.tmp"
    strip --strip-debug "$cached.tmp"
    mv "$cached.tmp" "$cached"
    rm -rf "$work"
}

main() {
    parse_args "$@"
    check_source
    cache=$(default_cache)
    key=$(compute_key)
    cached="$cache/kernel-$key/vmlinux"
    case "$mode" in
        print-key) echo "$key"; return 0 ;;
        check) [ -f "$cached" ] || need_tools $build_tools; return 0 ;;
    esac
    if [ -f "$cached" ]; then
        progress "kernel $key is cached in $cache"
    else
        need_tools $build_tools
        build
    fi
    mkdir -p "$(dirname "$out")"
    # cp then mv: a VMM starting meanwhile reads the old kernel or the new one, never half
    cmp -s "$cached" "$out" 2>/dev/null || { cp "$cached" "$out.tmp" && mv -f "$out.tmp" "$out"; }
    progress "kernel $key -> $out"
}

main "$@"
