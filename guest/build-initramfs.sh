#!/usr/bin/env bash
# Build pyvmm's guest initramfs: an UNCOMPRESSED newc cpio archive (gzip would
# cost about a minute of emulated inflate on PVM hosts) with
#   /init                     guest/init.c + guest/agent.c, static (the guest contract,
#                             docs/guest-contract.md)
#   /bin/busybox              guest/build-busybox.sh's (only the applets of
#                             guest/applets.sh, ~380 KB), else Debian's busybox-static
#   /bin/sh, /bin/env         links to busybox: what is run by path (/init and the
#                             agent exec /bin/sh; scripts start with #!/bin/sh or
#                             #!/usr/bin/env sh).  The other applets need no link: the
#                             shell is standalone (see is_standalone); a busybox
#                             whose shell is not gets a link for every applet.
#   /bin/pyvmm-helpers        guest/helpers/*.c in one static program (guest/multicall.c),
#                             with /bin/pattern, /bin/mmapread, ... linked to it: the
#                             test helpers (with musl, it and /init link guest/malloc.c)
#   /dev/console (c 5 1), /proc, /sys, /dev, /mnt, /tmp
#   guest/rootfs/*            copied as they are (e.g. /demo.sh for `make demo`)
#   /lib/modules/*.ko + load-order   with --modules DIR (Debian stock kernel)
#
# Usage: guest/build-initramfs.sh OUT.cpio [--modules DIR]
#        guest/build-initramfs.sh --check     (exit 0 when the tools are there)
# Exit status: 0, 1 (the build failed), 2 (bad arguments), 3 (missing tools).
#
# Reproducible: guest/mkcpio.py sorts the entries and fixes owners and mtimes.
# Incremental: a hash of every input is kept in OUT.inputs; when it matches,
# nothing is built, and a rebuild whose archive equals OUT leaves OUT alone.
# The static binaries stay in OUT's directory under <OUT without .cpio>.root/
# (e.g. guest/build/initramfs.root/bin/pattern, a link); they run on the host too.
# Environment: CC (default musl-gcc, else gcc), BUSYBOX (default: build it with
# guest/build-busybox.sh into OUT's directory; when that fails, one warning line and
# Debian's /bin/busybox), PYTHON (default python3), PYVMM_T0 (see guest/common.sh).
# musl matters: a static glibc binary is ~690 KB, a musl one ~30 KB, and on PVM
# hosts the kernel unpacks the initramfs at ~0.5 MB/s (measured: 3.4 MB of
# extra initramfs cost 7.3 s of boot).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
. "$here/common.sh"
. "$here/applets.sh"
CC=${CC:-$(command -v musl-gcc || echo gcc)}
BUSYBOX=${BUSYBOX:-}
DEBIAN_BUSYBOX=/bin/busybox
PYTHON=${PYTHON:-python3}
HELPER_CFLAGS="-Os -Wall -Wextra -Werror"
CFLAGS_STATIC="-static -s $HELPER_CFLAGS"
# The applets that are run by path, so linked in /bin even with a standalone shell:
# sh (/init, the agent, #!/bin/sh) and env (#!/usr/bin/env, as /usr/bin is ../bin).
# Nothing else execs an applet by path: of the kernel's helpers, /sbin/poweroff
# (orderly power-off) needs ACPI or a power button, which pyvmm's machine has not,
# and there is no modprobe applet to link as /sbin/modprobe.
path_applets="sh env"

die() { echo "build-initramfs: $*" >&2; exit 1; }

usage() { echo "usage: $0 OUT.cpio [--modules DIR] | --check" >&2; exit 2; }

parse_args() {
    out=""
    modules=""
    check_only=""
    while [ $# -gt 0 ]; do
        case "$1" in
            --check) check_only=1; shift ;;
            --modules) [ $# -ge 2 ] || usage; modules=$2; shift 2 ;;
            --modules=*) modules=${1#--modules=}; shift ;;
            -*) usage ;;
            *) [ -z "$out" ] || usage; out=$1; shift ;;
        esac
    done
    [ -n "$out" ] || [ -n "$check_only" ] || usage
}

check_tools() {
    local busybox=${BUSYBOX:-$DEBIAN_BUSYBOX}   # BUSYBOX, else the fallback
    need_tools "$(cc_tool)" /usr/include/stdio.h:libc6-dev "$busybox:busybox-static" \
        readelf:binutils "$PYTHON:python3"
    # Debian's dynamic 'busybox' package also installs /bin/busybox: insist on static.
    if LC_ALL=C readelf -l "$busybox" 2>/dev/null | grep -q 'INTERP'; then
        echo "guest: $busybox is dynamically linked: apt-get install --no-install-recommends busybox-static" >&2
        exit 3
    fi
}

# BUSYBOX unset: guest/build-busybox.sh's small busybox (cached after the first
# build), or, when it cannot be built (no network for the source, a tool missing,
# a failed build), Debian's with one warning line naming the reason.
choose_busybox() {
    [ -z "$BUSYBOX" ] || return 0
    local small errors status=0
    small="$(cd "$(dirname "$out")" && pwd)/busybox"
    errors=$(mktemp)
    "$here/build-busybox.sh" "$small" 2>"$errors" || status=$?
    if [ "$status" = 0 ]; then
        BUSYBOX=$small
    else
        echo "guest: warning: no small busybox ($(tail -n1 "$errors")); using Debian's" \
            "$DEBIAN_BUSYBOX instead: a 2 MB bigger initramfs, a slower guest boot" >&2
        BUSYBOX=$DEBIAN_BUSYBOX
    fi
    rm -f "$errors"
}

# True when $BUSYBOX's shell runs applets without /bin links (FEATURE_SH_STANDALONE)
# and its applets that exec others find them inside busybox too (PREFER_APPLETS:
# env here; also xargs, find -exec, timeout): run with no PATH to search.
is_standalone() {
    local said
    said=$(cd / && env -i PATH=/nonexistent "$BUSYBOX" sh -c \
        'echo standalone | cat && env true' 2>/dev/null) || return 1
    [ "$said" = standalone ]
}

# Module files named by DIR/load-order, one per line ('#' comments allowed).
module_names() {
    grep -v '^[[:space:]]*\(#\|$\)' "$modules/load-order" || true
}

check_modules() {
    [ -z "$modules" ] && return 0
    [ -f "$modules/load-order" ] || die "$modules/load-order not found"
    local name
    for name in $(module_names); do
        case "$name" in */*) die "load-order: $name: plain file names only" ;; esac
        [ -f "$modules/$name" ] || die "$modules/$name (listed in load-order) not found"
    done
}

# Everything the archive depends on, hashed.
input_hash() {
    {
        (cd "$here" && sha256sum build-initramfs.sh mkcpio.py init.c agent.[ch] malloc.c multicall.c \
             helpers/*.[ch])
        if [ -d "$here/rootfs" ]; then
            (cd "$here/rootfs" && find . -printf '%p %y %m %l\n' | LC_ALL=C sort &&
                find . -type f -print0 | LC_ALL=C sort -z | xargs -0r sha256sum)
        fi
        sha256sum "$BUSYBOX"
        (cd "$here" && sha256sum applets.sh)
        "$CC" --version | head -n1
        echo "$CFLAGS_STATIC"
        if [ -n "$modules" ]; then
            (cd "$modules" && sha256sum load-order $(module_names))
        fi
    } | sha256sum | cut -d' ' -f1
}

compile_static() {  # OUTPUT SOURCE...
    local out=$1
    shift
    "$CC" $CFLAGS_STATIC -I"$here/helpers" -o "$out" "$@" $malloc_obj
}

# /bin/pyvmm-helpers: every guest/helpers/NAME.c compiled with its main() renamed
# NAME_main, linked with guest/multicall.c, which runs the helper its name says;
# /bin/NAME links to it.  One program instead of seven keeps one copy of the C
# library in the archive instead of seven (278 KB -> 59 KB).
# A helper's name is a C identifier (it becomes NAME_main), and multicall.c lists it
# as {"NAME", NAME_main}.
build_helpers() {
    local src name objdir="$root.helpers" objs=()
    rm -rf "$objdir"
    mkdir -p "$objdir"
    for src in "$here"/helpers/*.c; do
        name=$(basename "$src" .c)
        case "$name" in
            [!A-Za-z_]*|*[!A-Za-z0-9_]*)
                die "guest/helpers/$name.c: a helper's name must be a C identifier" ;;
        esac
        grep -q "{\"$name\", ${name}_main}" "$here/multicall.c" ||
            die "guest/multicall.c does not list the helper $name (guest/helpers/$name.c)"
        "$CC" $HELPER_CFLAGS -I"$here/helpers" -Dmain="${name}_main" -c -o "$objdir/$name.o" "$src"
        objs+=("$objdir/$name.o")
        ln -s pyvmm-helpers "$root/bin/$name"
    done
    compile_static "$root/bin/pyvmm-helpers" "$here/multicall.c" "${objs[@]}"
    rm -rf "$objdir"
}

# With musl: guest/malloc.c replaces musl's allocator in every program (see there).
compile_malloc() {
    malloc_obj=""
    if cc_is_musl; then
        malloc_obj="$root.malloc.o"
        "$CC" $HELPER_CFLAGS -fno-builtin -c -o "$malloc_obj" "$here/malloc.c"
    fi
}

build_binaries() {
    progress "compiling /init and $(ls "$here"/helpers/*.c | wc -l) helpers with $(basename "$CC")"
    rm -rf "$root"
    mkdir -p "$root/bin"
    compile_malloc
    compile_static "$root/init" "$here/init.c" "$here/agent.c"
    build_helpers
}

# The mkcpio.py entry list (see the format in its docstring); $links: the applets to
# link in /bin (those this busybox has).
write_list() {
    local have a name
    have=" $("$BUSYBOX" --list | tr '\n' ' ') "
    echo "# pyvmm initramfs"
    for d in bin dev proc sys mnt lib etc usr; do echo "dir /$d 0755 0 0"; done
    echo "dir /tmp 1777 0 0"
    echo "nod /dev/console 0600 0 0 c 5 1"
    echo "slink /sbin bin 0777 0 0"
    echo "slink /usr/bin ../bin 0777 0 0"
    echo "slink /usr/sbin ../bin 0777 0 0"
    echo "file /etc/passwd $root/etc/passwd 0644 0 0"
    echo "file /etc/group $root/etc/group 0644 0 0"
    echo "file /init $root/init 0755 0 0"
    echo "file /bin/busybox $BUSYBOX 0755 0 0"
    for a in $required_applets; do
        case "$have" in *" $a "*) ;; *) die "busybox lacks the applet '$a'" ;; esac
    done
    for a in $links; do
        case "$have" in *" $a "*) echo "slink /bin/$a busybox 0777 0 0" ;; esac
    done
    for a in "$root"/bin/*; do
        if [ -L "$a" ]; then
            echo "slink /bin/$(basename "$a") $(readlink "$a") 0777 0 0"
        else
            echo "file /bin/$(basename "$a") $a 0755 0 0"
        fi
    done
    overlay_list
    if [ -n "$modules" ]; then
        echo "dir /lib/modules 0755 0 0"
        echo "file /lib/modules/load-order $modules/load-order 0644 0 0"
        for name in $(module_names); do
            echo "file /lib/modules/$name $modules/$name 0644 0 0"
        done
    fi
}

# guest/rootfs/: files (0755 if executable, else 0644) and symlinks; their
# directories are added by mkcpio.py (0755), so rootfs/bin/x joins /bin.
overlay_list() {
    [ -d "$here/rootfs" ] || return 0
    local kind path mode
    (cd "$here/rootfs" && find . -mindepth 1 -printf '%y %P\n' | LC_ALL=C sort -k2) |
        while read -r kind path; do
            case "$path" in *[[:space:]]*) die "rootfs/$path: no spaces in names, please" ;; esac
            case "$kind" in
                d) ;;
                f) if [ -x "$here/rootfs/$path" ]; then mode=0755; else mode=0644; fi
                   echo "file /$path $here/rootfs/$path $mode 0 0" ;;
                l) echo "slink /$path $(readlink "$here/rootfs/$path") 0777 0 0" ;;
                *) die "rootfs/$path: unsupported file type" ;;
            esac
        done
}

write_etc() {
    mkdir -p "$root/etc"
    echo "root:x:0:0:root:/:/bin/sh" > "$root/etc/passwd"
    echo "root:x:0:" > "$root/etc/group"
}

main() {
    parse_args "$@"
    check_tools
    [ -z "$check_only" ] || return 0
    check_modules
    if [ -n "$modules" ]; then modules=$(cd "$modules" && pwd); fi
    mkdir -p "$(dirname "$out")"
    root="$(cd "$(dirname "$out")" && pwd)/$(basename "${out%.cpio}").root"
    choose_busybox
    local stamp="$out.inputs" key
    key=$(input_hash)
    if [ -f "$out" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$key" ]; then
        progress "initramfs up to date: $out"
        return 0
    fi
    build_binaries
    write_etc
    if is_standalone; then
        links=$path_applets
    else
        links="$required_applets $extra_applets"
        progress "$BUSYBOX's shell is not standalone: linking every applet in /bin"
    fi
    write_list > "$root.list"
    progress "writing the archive"
    "$PYTHON" "$here/mkcpio.py" --mtime 0 "$root.list" "$out.new"
    if cmp -s "$out.new" "$out"; then
        rm -f "$out.new"
        progress "initramfs unchanged: $out"
    else
        mv -f "$out.new" "$out"
        progress "initramfs $(stat -c %s "$out") bytes -> $out"
    fi
    echo "$key" > "$stamp"
}

main "$@"
