#!/usr/bin/env bash
# Build the guest's busybox: static (musl when musl-gcc is there, else glibc), with
# only the applets guest/applets.sh lists and the options of guest/busybox.config
# (guest/busybox_config.py has the configuration steps), from Debian's source of the
# busybox Debian 12 ships (busybox_1.35.0.orig.tar.bz2, its sha256 pinned below).
# Every byte of initramfs costs guest boot time on PVM hosts (docs/pvm.md): this
# busybox is ~380 KB where Debian's busybox-static is 2 MB.
#
# The tarball is downloaded once into <cache> (guest/common.sh's default_cache), from
# the pool of the Debian archive apt uses (as apt-get download --print-uris names it),
# and checked against its sha256 at every use; put it there by hand on a machine
# without network.  The binary is cached in <cache>/busybox-KEY/busybox, KEY hashing the
# tarball's sha256, this script, guest/applets.sh, guest/busybox.config,
# guest/busybox_config.py and the compiler's version: a rebuild happens only when one
# changes.  The build is reproducible (no timestamp; the same binary wherever it is built).
#
# Usage: guest/build-busybox.sh OUTPUT_BUSYBOX
#        guest/build-busybox.sh --check       (exit 0 when a build could run, or it is cached)
#        guest/build-busybox.sh --print-key
# Exit status: 0, 1 (the download, its check or the build failed), 2 (bad arguments),
# 3 (missing tools).
# Environment: CC (default musl-gcc, else gcc), PYTHON (default python3), PYVMM_T0
# (guest/common.sh).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
. "$here/common.sh"
. "$here/applets.sh"
CC=${CC:-$(command -v musl-gcc || echo gcc)}
PYTHON=${PYTHON:-python3}
VERSION=1.35.0
TARBALL=busybox_$VERSION.orig.tar.bz2
POOL_PATH=pool/main/b/busybox/$TARBALL
SHA256=faeeb244c35a348a334f4a59e44626ee870fb07b6884d68c10ae8bc19f83a694

die() { echo "build-busybox: $*" >&2; exit 1; }

usage() { echo "usage: $0 OUTPUT_BUSYBOX | --check | --print-key" >&2; exit 2; }

parse_args() {  # one argument: OUTPUT, --check or --print-key
    [ $# = 1 ] || usage
    out=""
    case "$1" in
        --check) mode=check ;;
        --print-key) mode=print-key ;;
        -*) usage ;;
        *) mode=build; out=$1 ;;
    esac
}

need_build_tools() {
    local fetch=""
    [ -f "$cache/$TARBALL" ] || fetch=apt-get:apt
    need_tools make:make gcc:gcc "$(cc_tool)" /usr/include/stdio.h:libc6-dev \
        /usr/include/linux/fs.h:linux-libc-dev tar:tar bzip2:bzip2 readelf:binutils \
        "$PYTHON:python3" $fetch
}

compute_key() {
    {
        echo "$SHA256"
        (cd "$here" && sha256sum build-busybox.sh applets.sh busybox.config busybox_config.py malloc.c)
        "$CC" --version | head -n1
    } | sha256sum | cut -c1-16
}

# The Debian archive apt downloads busybox-static from: its pool has the source too.
archive_url() {
    apt-get download --print-uris busybox-static 2>/dev/null | sed -n "s|^'\(.*\)/pool/.*|\1|p" |
        head -n1
}

# The tarball in the cache, downloaded if it is not there; never used unverified.
fetch_source() {
    local tarball="$cache/$TARBALL" url
    if [ ! -f "$tarball" ]; then
        url=$(archive_url)
        [ -n "$url" ] || die "apt knows no Debian archive with busybox-static (apt-get update?)"
        url="$url/$POOL_PATH"
        progress "downloading $url"
        mkdir -p "$cache"
        "$PYTHON" -c 'import shutil, sys, urllib.request
with urllib.request.urlopen(sys.argv[1], timeout=30) as r, open(sys.argv[2], "wb") as f:
    shutil.copyfileobj(r, f)' "$url" "$tarball.$$" 2>/dev/null ||
            { rm -f "$tarball.$$"; die "could not download $url"; }
        mv -f "$tarball.$$" "$tarball"
    fi
    echo "$SHA256  $tarball" | sha256sum -c --quiet - >/dev/null 2>&1 ||
        { rm -f "$tarball"; die "$tarball: sha256 mismatch (removed; the next build downloads it again)"; }
}

# musl's headers lack linux/*.h and asm/*.h, which busybox includes: a private
# directory of links to the kernel headers of linux-libc-dev.
kernel_headers() {
    local dir="$work/include"
    mkdir -p "$dir"
    ln -s /usr/include/linux "$dir/linux"
    ln -s /usr/include/asm-generic "$dir/asm-generic"
    ln -s "/usr/include/$(gcc -print-multiarch)/asm" "$dir/asm"
    echo "$dir"
}

configure() {
    progress "configuring busybox $VERSION (allnoconfig + guest/applets.sh + guest/busybox.config)"
    local frag="$work/fragment" log="$work/configure.log" bb="$here/busybox_config.py"
    # shellcheck disable=SC2086 # the applet lists are words
    "$PYTHON" "$bb" fragment "$src" "$here/busybox.config" $required_applets $extra_applets > "$frag" ||
        die "guest/applets.sh names an applet busybox $VERSION does not have"
    { make -C "$src" -s allnoconfig &&
      "$PYTHON" "$bb" apply "$src/.config" "$frag" &&
      make -C "$src" -s oldconfig < <(yes "") &&
      "$PYTHON" "$bb" prune "$src/.config" "$frag" &&
      make -C "$src" -s oldconfig < <(yes ""); } > "$log" 2>&1 ||
        { tail -n 20 "$log" >&2; die "configuring busybox failed"; }
    "$PYTHON" "$bb" check "$src/.config" "$frag" || exit 1
}

compile() {
    local cc=$CC log="$work/make.log"
    if cc_is_musl; then cc="$CC -isystem $(kernel_headers)"; fi
    progress "compiling busybox with $(basename "$CC") (about 30 s on 2 cores)"
    make -C "$src" -s -j"$(nproc)" CC="$cc" HOSTCC=gcc busybox > "$log" 2>&1 ||
        { tail -n 20 "$log" >&2; die "make busybox failed"; }
    if LC_ALL=C readelf -l "$src/busybox" | grep -q INTERP; then
        die "the busybox built is not static"
    fi
}

# With musl: guest/malloc.c replaces musl's allocator (see there: for some sizes
# musl maps and unmaps memory at each malloc and free, a few ms each in a PVM
# guest).  It goes into libbb, busybox's own library, which the link searches
# before the C library.
add_malloc() {
    cc_is_musl || return 0
    cp "$here/malloc.c" "$src/libbb/pyvmm_malloc.c"
    echo "lib-y += pyvmm_malloc.o" >> "$src/libbb/Kbuild.src"
}

build() {
    # A directory of its own: two builds at once (parallel tests) do not meet.
    mkdir -p "$cache"
    work=$(mktemp -d "$cache/busybox-$key.build.XXXXXX")
    trap 'rm -rf "$work"' EXIT
    progress "building busybox $key in $work"
    fetch_source
    tar -xjf "$cache/$TARBALL" -C "$work"
    src="$work/busybox-$VERSION"
    [ -f "$src/Makefile" ] || die "$TARBALL has no busybox-$VERSION/Makefile"
    configure
    add_malloc
    compile
    mkdir -p "$cache/busybox-$key"
    cp "$src/.config" "$cache/busybox-$key/config.$$"
    mv -f "$cache/busybox-$key/config.$$" "$cache/busybox-$key/config"
    cp "$src/busybox" "$cached.$$"
    mv -f "$cached.$$" "$cached"
    rm -rf "$work"
}

main() {
    parse_args "$@"
    need_tools "$PYTHON:python3" "$(cc_tool)"
    cache=$(default_cache)
    key=$(compute_key)
    cached="$cache/busybox-$key/busybox"
    case "$mode" in
        print-key) echo "$key"; return 0 ;;
        check) [ -f "$cached" ] || need_build_tools; return 0 ;;
    esac
    if [ -f "$cached" ]; then
        progress "busybox $key is cached in $cache"
    else
        need_build_tools
        export KCONFIG_NOTIMESTAMP=1
        build
    fi
    mkdir -p "$(dirname "$out")"
    cmp -s "$cached" "$out" 2>/dev/null || { cp "$cached" "$out.$$" && mv -f "$out.$$" "$out"; }
    progress "busybox $key ($(stat -c %s "$out") bytes, $( (exec -a busybox "$out" --list) | grep -cvx busybox) applets) -> $out"
}

main "$@"
