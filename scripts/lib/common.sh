# shellcheck shell=bash
# Shared helpers for husk's scripts: paths, logging, and installing Debian packages on demand.
# Sourced, never executed.

set -euo pipefail

HUSK_REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
HUSK_HOME=${HUSK_HOME:-$HOME/.local/share/husk}
export HUSK_REPO HUSK_HOME

log() { printf '[husk %s] %s\n' "$(basename "$0")" "$*" >&2; }
die() { printf '[husk %s] error: %s\n' "$(basename "$0")" "$*" >&2; exit 1; }

# need_cmd CMD PACKAGE: make sure CMD exists, installing Debian PACKAGE when we are root.
need_cmd() {
    local cmd=$1 pkg=$2
    if command -v "$cmd" >/dev/null 2>&1 || [ -x "$cmd" ]; then return 0; fi
    apt_install "$pkg"
    command -v "$cmd" >/dev/null 2>&1 || [ -x "$cmd" ] || die "$cmd still missing after installing $pkg"
}

# apt_install PKG...: install Debian packages that are not installed yet (root only).
apt_install() {
    local missing=() p
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    if [ "$(id -u)" -ne 0 ]; then
        die "missing Debian packages: ${missing[*]} (install them: sudo apt-get install ${missing[*]})"
    fi
    log "installing Debian packages: ${missing[*]}"
    if [ ! -f "$HUSK_HOME/.apt-updated" ] || [ -n "$(find "$HUSK_HOME/.apt-updated" -mmin +720 2>/dev/null)" ]; then
        apt-get update -qq >&2 || die "apt-get update failed"
        mkdir -p "$HUSK_HOME" && touch "$HUSK_HOME/.apt-updated"
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2 \
        || die "apt-get install ${missing[*]} failed"
    # An install can remove a requested package that was already there: a fresh machine had
    # qemu-utils from backports, and bookworm's qemu-system-x86 took it away. Install what is
    # missing now once more, in versions that fit what is installed.
    missing=()
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    log "installing Debian packages removed by the previous install: ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2 \
        || die "apt-get install ${missing[*]} failed"
}

# has_hw_kvm: true when /dev/kvm is a hardware-assisted KVM (VT-x or AMD-V), not PVM.
has_hw_kvm() {
    [ -c /dev/kvm ] && grep -qw -E 'vmx|svm' /proc/cpuinfo && [ ! -d /sys/module/kvm_pvm ]
}

# sha256 of the named files' contents, as one short key.
content_key() { cat "$@" | sha256sum | cut -c1-16; }
