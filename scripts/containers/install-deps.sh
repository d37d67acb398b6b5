#!/usr/bin/env bash
# System packages for `make test-containers` / `make bench-podman`: podman and buildah with the
# runc runtime, busybox-static (the base image is built from /bin/busybox), uidmap
# (newuidmap/newgidmap for the rootless tests), acl (setfacl/getfacl: the rootless tests grant
# the test user /dev/fuse for their duration), fuse-overlayfs (reference mount_program),
# skopeo and umoci (independent readers and writers of image archives, for the image tests).
# Idempotent: apt is only called when a package is missing; `apt-get update` only then.
#
#   scripts/containers/install-deps.sh
#   PYUNIONFS_NO_APT=1 scripts/containers/install-deps.sh     # check only, install nothing
set -euo pipefail

pkgs=(podman buildah runc conmon golang-github-containers-common busybox-static uidmap acl
    fuse-overlayfs fuse3 skopeo umoci)

die() {
    echo "containers/install-deps: error: $*" >&2
    exit 1
}

command -v dpkg-query >/dev/null 2>&1 || die "not a Debian system; install: ${pkgs[*]}"

missing=()
for p in "${pkgs[@]}"; do
    status=$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null || true)
    [[ $status == "install ok installed" ]] || missing+=("$p")
done
((${#missing[@]} == 0)) && exit 0

[[ ${PYUNIONFS_NO_APT:-0} == 1 ]] && die "missing packages: ${missing[*]} (PYUNIONFS_NO_APT=1)"

sudo=()
if [[ $(id -u) != 0 ]]; then
    command -v sudo >/dev/null 2>&1 ||
        die "missing packages (${missing[*]}), not root and no sudo: run 'apt-get install ${missing[*]}' as root"
    sudo=(sudo -n)
fi

log=$(mktemp "${TMPDIR:-/tmp}/pyunionfs-containers-deps.XXXXXX")
trap 'rm -f "$log"' EXIT
echo "containers/install-deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
# Only update the package lists when apt doesn't know a candidate for one of them.
if ! "${sudo[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >"$log" 2>&1; then
    "${sudo[@]}" apt-get update -qq >>"$log" 2>&1 || { tail -n 30 "$log" >&2; die "apt-get update failed"; }
    "${sudo[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >>"$log" 2>&1 ||
        { tail -n 30 "$log" >&2; die "apt-get install ${missing[*]} failed"; }
fi
