# Shell helpers shared by the guest build scripts (sourced, not run).
#
# progress MSG        prints "guest: [M:SS] MSG": the time since $PYVMM_T0 (seconds
#                     since the epoch; `pyvmm guest build` sets it for all its steps)
#                     or since the script started
# default_cache       $PYVMM_CACHE, else /var/cache/pyvmm for root, else
#                     ${XDG_CACHE_HOME:-$HOME/.cache}/pyvmm (as pyvmm.guest_build)
# need_tools T:P ...  checks that every tool T is on PATH (or, for a path, exists);
#                     when some are missing, prints ONE line naming the Debian
#                     packages P to install and exits with status 3
# cc_is_musl          true when $CC is musl-gcc (the scripts' default where it is installed)
# cc_tool             $CC:its Debian package (musl-tools for musl-gcc), for need_tools
#
# Exit statuses of the guest scripts: 0 done, 1 failed, 2 bad input (e.g. a
# --source that is not a Linux 6.1 tree), 3 missing tools or packages.

guest_t0=${PYVMM_T0:-$(date +%s)}

progress() {
    local elapsed=$(( $(date +%s) - guest_t0 ))
    printf 'guest: [%d:%02d] %s\n' $((elapsed / 60)) $((elapsed % 60)) "$*"
}

default_cache() {
    if [ -n "${PYVMM_CACHE:-}" ]; then
        echo "$PYVMM_CACHE"
    elif [ "$(id -u)" = 0 ]; then
        echo /var/cache/pyvmm
    else
        echo "${XDG_CACHE_HOME:-$HOME/.cache}/pyvmm"
    fi
}

need_tools() {
    local pair tool package tools="" packages=""
    for pair in "$@"; do
        tool=${pair%%:*}
        package=${pair#*:}
        case "$tool" in
            /*) [ -e "$tool" ] && continue ;;
            *) command -v "$tool" >/dev/null 2>&1 && continue ;;
        esac
        tools="$tools${tools:+, }$tool"
        case " $packages " in *" $package "*) ;; *) packages="$packages $package" ;; esac
    done
    [ -z "$tools" ] && return 0
    echo "guest: missing $tools: apt-get install --no-install-recommends$packages" >&2
    exit 3
}

cc_is_musl() {
    case "$CC" in *musl-gcc) return 0 ;; *) return 1 ;; esac
}

cc_tool() {
    if cc_is_musl; then echo "$CC:musl-tools"; else echo "$CC:gcc"; fi
}
