#!/usr/bin/env bash
# Install what pyunionfs needs to build, test, demo and benchmark. Idempotent and quiet:
# it only touches apt when a Debian package is missing, and only runs pip when the venv is
# missing, pyproject.toml changed since the last install, or an import fails.
#
#   scripts/install-deps.sh            # system packages + .venv with pip install -e '.[test]'
#   PYUNIONFS_NO_APT=1 scripts/...     # skip the system package step (e.g. not Debian)
#   VENV=/path/to/venv scripts/...     # another venv location (default: .venv in the repo)
#   PYUNIONFS_STOCK_PYFUSE3=1 scripts/...  # keep PyPI's pyfuse3: see docs/differences.md
#
# pyfuse3 is built from its PyPI sdist with scripts/pyfuse3-unionfs.patch applied (a
# fallocate handler, which pyfuse3 3.5.0 lacks, FUSE_CAP_DONT_MASK for POSIX ACLs, setxattr's
# flags passed through, node ids apart from st_ino, kernel caches, eager request loop), as
# version 3.5.0+unionfs.6; skipped when
# the installed pyfuse3 already has that patch level (pyfuse3.UNIONFS_PATCH_LEVEL).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$here"
VENV=${VENV:-$here/.venv}
PYTHON=${PYTHON:-python3}
stamp="$VENV/.pyunionfs-deps-stamp"
log=$(mktemp "${TMPDIR:-/tmp}/pyunionfs-deps.XXXXXX")
build_tmp= # pyfuse3's build directory, while there is one
trap 'rm -f "$log"; [[ -z $build_tmp ]] || rm -rf "$build_tmp"' EXIT

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
# attr: getfattr/setfattr for the demo and tests; acl: getfacl/setfacl for the ACL tests; make: the Makefile itself; strace: tests
# that check which calls a copy-up makes (fsync before rename); fio: the stress suite's
# verified I/O; btrfs-progs: a real EDQUOT from a qgroup (tests/test_faults.py).
apt_packages() {
    local pkgs=(fuse3 libfuse3-dev pkg-config fuse-overlayfs attr acl make strace fio btrfs-progs)
    command -v cc >/dev/null 2>&1 || command -v gcc >/dev/null 2>&1 || pkgs+=(gcc libc6-dev)
    command -v git >/dev/null 2>&1 || pkgs+=(patch) # applies scripts/pyfuse3-unionfs.patch
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
    "$VENV/bin/python" -c 'import pyfuse3, trio, xattr, pytest, pytest_trio, pytest_timeout, xdist, hypothesis' \
        >/dev/null 2>&1 || return 1
    [[ -x $VENV/bin/ruff && -x $VENV/bin/mypy ]]
}

# --- pyfuse3 with fallocate, DONT_MASK, setxattr flags, node ids -------------------------------------------------
PYFUSE3_VERSION=3.5.0
PYFUSE3_SDIST_SHA256=88399a9494b88603230bba300f4ba9ad63fece5ed514ca3633d555a0c6a42b24
PYFUSE3_LOCAL=unionfs.6
PYFUSE3_PATCH_LEVEL=6 # pyfuse3.UNIONFS_PATCH_LEVEL of a copy built with today's patch
PYFUSE3_PATCH=scripts/pyfuse3-unionfs.patch

pyfuse3_is_patched() {
    "$VENV/bin/python" -c "import sys, pyfuse3
sys.exit(getattr(pyfuse3, 'UNIONFS_PATCH_LEVEL', 0) < $PYFUSE3_PATCH_LEVEL)" >/dev/null 2>&1
}

# The built wheel is kept in $PYFUSE3_CACHE under a key of the patch, the Python ABI and the
# libfuse version, so that a fresh clone (CI) installs it in seconds instead of building again.
PYFUSE3_CACHE=${XDG_CACHE_HOME:-${HOME:-/nonexistent}/.cache}/pyunionfs/pyfuse3

install_pyfuse3_wheel() {
    # replacing any pyfuse3 there, then what it needs (trio, in a new venv)
    local pip=("$VENV/bin/python" -m pip --disable-pip-version-check)
    { "${pip[@]}" install -q --no-deps --force-reinstall "$1" &&
        "${pip[@]}" install -q "$1"; } >"$log" 2>&1
}

build_pyfuse3_wheel() { # -> the wheel in $build_tmp/wheel
    local version=$1 src pip=("$VENV/bin/python" -m pip --disable-pip-version-check)
    local tmp=$build_tmp
    echo "pyfuse3==$PYFUSE3_VERSION --hash=sha256:$PYFUSE3_SDIST_SHA256" >"$tmp/req.txt"
    "${pip[@]}" download -q --no-deps --no-binary pyfuse3 --require-hashes -r "$tmp/req.txt" \
        -d "$tmp" >"$log" 2>&1 || show_log_and_die "downloading the pyfuse3 $PYFUSE3_VERSION sdist failed"
    mkdir "$tmp/src"
    tar --no-same-owner -xzf "$tmp/pyfuse3-$PYFUSE3_VERSION.tar.gz" -C "$tmp/src" >"$log" 2>&1 ||
        show_log_and_die "unpacking the pyfuse3 sdist failed"
    src=$tmp/src/pyfuse3-$PYFUSE3_VERSION
    if command -v git >/dev/null 2>&1; then
        # in a repository of its own, so that no enclosing one (a TMPDIR inside a checkout) is
        # patched; removed again, or setuptools_scm would take its version and files from it
        (cd "$src" && git init -q . && git apply "$here/$PYFUSE3_PATCH" && rm -rf .git) >"$log" 2>&1
    else
        command -v patch >/dev/null 2>&1 || die "git or patch is needed to apply $PYFUSE3_PATCH"
        (cd "$src" && patch -p1 --forward --batch <"$here/$PYFUSE3_PATCH") >"$log" 2>&1
    fi || show_log_and_die "$PYFUSE3_PATCH does not apply to pyfuse3 $PYFUSE3_VERSION"
    rm -f "$src/src/pyfuse3/__init__.c" # pre-generated without the handler: make Cython run
    SETUPTOOLS_SCM_PRETEND_VERSION_FOR_PYFUSE3=$version \
        "${pip[@]}" wheel -q --no-deps -w "$tmp/wheel" "$src" >"$log" 2>&1 ||
        show_log_and_die "building pyfuse3 $version failed: it needs a C compiler, the Python headers, libfuse3-dev and pkg-config; or set PYUNIONFS_STOCK_PYFUSE3=1 to use PyPI's pyfuse3, without fallocate and default-ACL umask handling"
}

install_patched_pyfuse3() {
    [[ ${PYUNIONFS_STOCK_PYFUSE3:-0} == 1 ]] && return 0
    pyfuse3_is_patched && return 0
    local version=$PYFUSE3_VERSION+$PYFUSE3_LOCAL key cached whl
    key=$({ echo "$version $PYFUSE3_SDIST_SHA256"
        sha256sum "$PYFUSE3_PATCH" | cut -c1-16
        "$VENV/bin/python" -c 'import sys, sysconfig; print(sys.implementation.cache_tag, sysconfig.get_platform())'
        pkg-config --modversion fuse3 2>/dev/null || true; } | sha256sum | cut -c1-16)
    cached=$PYFUSE3_CACHE/$key
    for whl in "$cached"/pyfuse3-*.whl; do
        [[ -f $whl ]] || continue
        echo "install-deps: pyfuse3 $version (with $PYFUSE3_PATCH) from $cached"
        install_pyfuse3_wheel "$whl" && pyfuse3_is_patched && return 0
        rm -rf "$cached" # not usable after all: build it again
    done
    echo "install-deps: building pyfuse3 $version (with $PYFUSE3_PATCH)"
    build_tmp=$(mktemp -d "${TMPDIR:-/tmp}/pyunionfs-pyfuse3.XXXXXX")
    build_pyfuse3_wheel "$version"
    whl=$(echo "$build_tmp"/wheel/pyfuse3-*.whl)
    install_pyfuse3_wheel "$whl" || show_log_and_die "installing the pyfuse3 $version wheel failed"
    pyfuse3_is_patched ||
        die "pyfuse3 $version is installed but lacks the handlers of $PYFUSE3_PATCH)"
    { mkdir -p "$cached" && cp "$whl" "$cached/"; } 2>/dev/null || true # a cache, if it can be
    rm -rf "$build_tmp"
    build_tmp=
}

install_python_packages() {
    if [[ ! -x $VENV/bin/python ]]; then
        command -v "$PYTHON" >/dev/null 2>&1 || die "$PYTHON not found"
        "$PYTHON" -m venv "$VENV" >"$log" 2>&1 || show_log_and_die "python3 -m venv $VENV failed"
    fi
    # before pip install -e, which then finds pyfuse3>=3.5,<4 satisfied and keeps it
    install_patched_pyfuse3
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
# The command's launcher: pip's imports re, and site's start-up reads every .pth file (6 ms
# of each command, a warm mount's fifth); this one runs with -S and puts the package's own
# directory on the path (command.py loads site for a cold start).  Rewritten after every pip
# install that replaced it.
launcher=$VENV/bin/pyunionfs
if [[ -x $launcher ]] && ! grep -q "pyunionfs launcher 2" "$launcher"; then
    printf '#!%s -S\n# pyunionfs launcher 2 (scripts/install-deps.sh)\nimport sys\nsys.path.insert(0, %s)\nfrom unionfs.command import main\nsys.exit(main())\n' \
        "$(cd "$VENV/bin" && pwd)/python" "'$here'" >"$launcher.tmp" && chmod 755 "$launcher.tmp" &&
        mv "$launcher.tmp" "$launcher"
fi
# Bytecode for the package, written even where PYTHONDONTWRITEBYTECODE is set (then nothing
# else writes it): compiling our modules at every start would cost a cold mount ~40 ms.
"$VENV/bin/python" -m compileall -q -j 0 unionfs >/dev/null 2>&1 || true
