#!/usr/bin/env bash
# Install what pyunionfs needs to build, test, demo and benchmark. Idempotent and quiet:
# it only touches apt when a Debian package is missing, and only runs pip when the venv is
# missing, pyproject.toml changed since the last install, or an import fails.
#
#   scripts/install-deps.sh            # system packages + .venv with pip install -e '.[test]'
#   PYUNIONFS_NO_APT=1 scripts/...     # skip the system package step (e.g. not Debian)
#   VENV=/path/to/venv scripts/...     # another venv location (default: .venv in the repo)
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$here"
VENV=${VENV:-$here/.venv}
PYTHON=${PYTHON:-python3}
stamp="$VENV/.pyunionfs-deps-stamp"
log=$(mktemp "${TMPDIR:-/tmp}/pyunionfs-deps.XXXXXX")
trap 'rm -f "$log"' EXIT

die() {
    echo "install-deps: error: $*" >&2
    exit 1
}

show_log_and_die() {
    tail -n 30 "$log" >&2 || true
    die "$*"
}

# --- system packages ---------------------------------------------------------------------
# fuse3: fusermount3 and /etc/fuse.conf; libfuse3-dev + pkg-config + a C compiler + Python
# headers: building pyfuse3 (PyPI ships only an sdist); fuse-overlayfs: benchmark peer;
# attr: getfattr/setfattr for the demo and tests; make: the Makefile itself.
apt_packages() {
    local pkgs=(fuse3 libfuse3-dev pkg-config fuse-overlayfs attr make)
    command -v cc >/dev/null 2>&1 || command -v gcc >/dev/null 2>&1 || pkgs+=(gcc libc6-dev)
    command -v "$PYTHON" >/dev/null 2>&1 || pkgs+=(python3 python3-venv python3-dev)
    if command -v "$PYTHON" >/dev/null 2>&1; then
        # Debian's own python3 needs python3-venv for ensurepip and python3-dev for Python.h;
        # a pyenv/upstream build has both already.
        "$PYTHON" -c 'import ensurepip, venv' >/dev/null 2>&1 || pkgs+=(python3-venv)
        local inc
        inc=$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_paths()["include"])' 2>/dev/null || true)
        [[ -n $inc && -f $inc/Python.h ]] || pkgs+=(python3-dev)
    fi
    printf '%s\n' "${pkgs[@]}"
}

install_system_packages() {
    [[ ${PYUNIONFS_NO_APT:-0} == 1 ]] && return 0
    command -v dpkg-query >/dev/null 2>&1 || {
        echo "install-deps: not a Debian system; install fuse3, libfuse3 headers, pkg-config yourself" >&2
        return 0
    }
    local missing=() p status
    while read -r p; do
        status=$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null || true)
        [[ $status == "install ok installed" ]] || missing+=("$p")
    done < <(apt_packages)
    ((${#missing[@]} == 0)) && return 0

    local sudo=()
    if [[ $(id -u) != 0 ]]; then
        command -v sudo >/dev/null 2>&1 ||
            die "missing packages (${missing[*]}) and not root and no sudo: run 'apt-get install ${missing[*]}' as root"
        sudo=(sudo -n)
    fi
    echo "install-deps: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    "${sudo[@]}" apt-get update -qq >"$log" 2>&1 || show_log_and_die "apt-get update failed"
    "${sudo[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >>"$log" 2>&1 ||
        show_log_and_die "apt-get install ${missing[*]} failed"
}

# --- Python virtualenv ---------------------------------------------------------------------
venv_ok() {
    [[ -f $stamp && $stamp -nt pyproject.toml && -x $VENV/bin/pyunionfs ]] || return 1
    "$VENV/bin/python" -c 'import pyfuse3, trio, xattr, pytest, pytest_trio, pytest_timeout, hypothesis' \
        >/dev/null 2>&1 || return 1
    [[ -x $VENV/bin/ruff && -x $VENV/bin/mypy ]]
}

install_python_packages() {
    if [[ ! -x $VENV/bin/python ]]; then
        command -v "$PYTHON" >/dev/null 2>&1 || die "$PYTHON not found"
        "$PYTHON" -m venv "$VENV" >"$log" 2>&1 || show_log_and_die "python3 -m venv $VENV failed"
    fi
    venv_ok && return 0
    echo "install-deps: pip install -e '.[test]' into ${VENV#"$here"/}"
    # compat mode: a plain path entry in a .pth, not an import hook run at every start
    # (part of a mount's start-up).
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check \
        --config-settings editable_mode=compat -e '.[test]' >"$log" 2>&1 ||
        show_log_and_die "pip install -e '.[test]' failed (log above)"
    touch "$stamp"
}

install_system_packages
install_python_packages
