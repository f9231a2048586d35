#!/usr/bin/env bash
# Build pyvmm's guest initramfs: an UNCOMPRESSED newc cpio archive (gzip would
# cost about a minute of emulated inflate on PVM hosts) with
#   /init                     guest/init.c + guest/agent.c, static (the guest contract,
#                             docs/guest-contract.md)
#   /bin/busybox + applets    from Debian's busybox-static
#   /bin/pattern, /bin/mmapread   guest/helpers/*.c, static test helpers
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
# (e.g. guest/build/initramfs.root/bin/pattern); they run on the host too.
# Environment: CC (default musl-gcc, else gcc), BUSYBOX (default /bin/busybox),
# PYTHON (default python3), PYVMM_T0 (see guest/common.sh).
# musl matters: a static glibc binary is ~690 KB, a musl one ~30 KB, and on PVM
# hosts the kernel unpacks the initramfs at ~0.5 MB/s (measured: 3.4 MB of
# extra initramfs cost 7.3 s of boot).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
. "$here/common.sh"
CC=${CC:-$(command -v musl-gcc || echo gcc)}
BUSYBOX=${BUSYBOX:-/bin/busybox}
PYTHON=${PYTHON:-python3}
CFLAGS_STATIC="-static -Os -s -Wall -Wextra -Werror"

# Applets the guest contract and the boot tests rely on: the build fails without them.
required_applets="sh ash cat ls echo dd reboot poweroff halt sync mkdir grep sed
  sha256sum md5sum stat head tail wc sleep nproc uname dmesg cttyhack setsid printf
  test [ true false rm mv cp find cmp mount umount"
# Conveniences for a person at the shell: linked when this busybox has them.
extra_applets="[[ awk basename blockdev chmod chown clear cut date devmem df diff
  dirname du env egrep expr fgrep free fsfreeze hexdump hostname id insmod kill
  killall less ln lsmod mknod mktemp more od pidof ps pwd readlink realpath reset
  rmdir rmmod seq sha1sum sha512sum sort stty sysctl tee time timeout top touch tr
  truncate tty uniq uptime usleep vi which xargs xxd yes"

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
    local cc_package=gcc
    case "$CC" in *musl-gcc) cc_package=musl-tools ;; esac
    need_tools "$CC:$cc_package" /usr/include/stdio.h:libc6-dev "$BUSYBOX:busybox-static" \
        readelf:binutils "$PYTHON:python3"
    # Debian's dynamic 'busybox' package also installs /bin/busybox: insist on static.
    if LC_ALL=C readelf -l "$BUSYBOX" 2>/dev/null | grep -q 'INTERP'; then
        echo "guest: $BUSYBOX is dynamically linked: apt-get install --no-install-recommends busybox-static" >&2
        exit 3
    fi
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
        (cd "$here" && sha256sum build-initramfs.sh mkcpio.py init.c agent.[ch] helpers/*.[ch])
        if [ -d "$here/rootfs" ]; then
            (cd "$here/rootfs" && find . -printf '%p %y %m %l\n' | LC_ALL=C sort &&
                find . -type f -print0 | LC_ALL=C sort -z | xargs -0r sha256sum)
        fi
        sha256sum "$BUSYBOX"
        "$CC" --version | head -n1
        echo "$CFLAGS_STATIC | $required_applets | $extra_applets"
        if [ -n "$modules" ]; then
            (cd "$modules" && sha256sum load-order $(module_names))
        fi
    } | sha256sum | cut -d' ' -f1
}

compile_static() {  # OUTPUT SOURCE...
    local out=$1
    shift
    "$CC" $CFLAGS_STATIC -I"$here/helpers" -o "$out" "$@"
}

build_binaries() {
    progress "compiling /init and $(ls "$here"/helpers/*.c | wc -l) helpers with $(basename "$CC")"
    rm -rf "$root"
    mkdir -p "$root/bin"
    compile_static "$root/init" "$here/init.c" "$here/agent.c"
    local src
    for src in "$here"/helpers/*.c; do
        compile_static "$root/bin/$(basename "$src" .c)" "$src"
    done
}

# The mkcpio.py entry list (see the format in its docstring).
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
        echo "slink /bin/$a busybox 0777 0 0"
    done
    for a in $extra_applets; do
        case "$have" in *" $a "*) echo "slink /bin/$a busybox 0777 0 0" ;; esac
    done
    for a in "$root"/bin/*; do
        echo "file /bin/$(basename "$a") $a 0755 0 0"
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
    local stamp="$out.inputs" key
    key=$(input_hash)
    if [ -f "$out" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$key" ]; then
        progress "initramfs up to date: $out"
        return 0
    fi
    build_binaries
    write_etc
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
