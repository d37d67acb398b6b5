#!/usr/bin/env bash
# pyunionfs demo: a small layered "image" (base <- pkg <- app, like a Docker image), mounted
# with an upper and work dir, then changed through the mount. Shows the merged view beside
# what landed in UPPER: the copied-up file, the 0/0 whiteouts, the opaque directory, and that
# the lower layers did not change. Finally the kernel's overlayfs mounts the same layers and
# upper and must show the same tree (same on-disk format).
#
#   scripts/demo.sh [--keep] [--kernel] [--no-kernel-check]
#     --keep             keep the temp dir (layers, upper, work) for a look afterwards
#     --kernel           use the kernel's overlayfs instead of pyunionfs for the main mount
#     --no-kernel-check  skip the final "kernel reads the same upper" check
#   env: PYUNIONFS (command, default .venv/bin/pyunionfs), DEMO_DIR (parent of the temp dir)
#
# Exits non-zero when something is not as expected. Always unmounts what it mounted, and
# stops only the pyunionfs process it started.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYUNIONFS=${PYUNIONFS:-$repo/.venv/bin/pyunionfs}
keep=0 use_kernel=0 kernel_check=1
for arg in "$@"; do
    case $arg in
    --keep) keep=1 ;;
    --kernel) use_kernel=1 ;;
    --no-kernel-check) kernel_check=0 ;;
    -h | --help)
        sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'
        exit 0
        ;;
    *)
        echo "demo: unknown argument: $arg" >&2
        exit 2
        ;;
    esac
done

if [[ -t 1 ]]; then
    B=$'\e[1m' G=$'\e[32m' R=$'\e[31m' D=$'\e[2m' N=$'\e[0m'
else
    B='' G='' R='' D='' N=''
fi
section() { printf '\n%s==> %s%s\n' "$B" "$*" "$N"; }
note() { printf '%s    %s%s\n' "$D" "$*" "$N"; }
show() { # print a command line, paths below the demo dir shortened to relative ones
    local line="$*"
    [[ -n ${base:-} ]] && line=${line//$base\//}
    printf '%s$ %s%s\n' "$G" "$line" "$N"
}
run() {
    show "$@"
    "$@"
}
runsh() { # runsh 'shell command'
    show "$1"
    sh -c "$1"
}
fail() {
    printf '%sdemo: FAILED: %s%s\n' "$R" "$*" "$N" >&2
    exit 1
}
ok() { printf '    %sok%s  %s\n' "$G" "$N" "$*"; }

[[ $(id -u) == 0 ]] || fail "run as root (whiteouts and trusted.overlay.* xattrs need it)"
[[ -c /dev/fuse || $use_kernel == 1 ]] || fail "/dev/fuse is missing"
command -v getfattr >/dev/null || fail "getfattr not found (apt-get install attr, or: make deps)"
if [[ $use_kernel == 0 ]]; then
    [[ -x $PYUNIONFS ]] || fail "$PYUNIONFS not found (run: make deps)"
fi

base=$(mktemp -d "${DEMO_DIR:-${TMPDIR:-/tmp}}/pyunionfs-demo.XXXXXX")
base=$(cd "$base" && pwd -P)
L=$base/layers U=$base/upper W=$base/work M=$base/merged
daemon_pid=''

is_mounted() { awk -v p="$1" '$2 == p { f = 1 } END { exit !f }' /proc/mounts; }
mounts_below() { awk -v p="$1/" 'index($2, p) == 1 { print $2 }' /proc/mounts; }

unmount() { # unmount $1 (ours), wait for our daemon to go
    local mnt=$1 i
    if is_mounted "$mnt"; then
        if [[ $(awk -v p="$mnt" '$2 == p { print $3 }' /proc/mounts) == fuse.* ]]; then
            "$PYUNIONFS" umount "$mnt" 2>/dev/null || fusermount3 -u "$mnt" 2>/dev/null ||
                fusermount3 -u -z "$mnt" || true
        else
            umount "$mnt" 2>/dev/null || umount -l "$mnt" || true
        fi
    fi
    if [[ -n $daemon_pid ]]; then
        for ((i = 0; i < 100; i++)); do
            kill -0 "$daemon_pid" 2>/dev/null || break
            sleep 0.1
        done
        if kill -0 "$daemon_pid" 2>/dev/null; then
            echo "demo: pyunionfs (pid $daemon_pid) did not exit after unmount; killing it" >&2
            kill -TERM "$daemon_pid" 2>/dev/null || true
            sleep 1
            kill -KILL "$daemon_pid" 2>/dev/null || true
        fi
        wait "$daemon_pid" 2>/dev/null || true
        daemon_pid=''
    fi
    ! is_mounted "$mnt"
}

cleanup() {
    local rc=$?
    set +e
    trap - EXIT INT TERM
    local mnt
    for mnt in "$base/merged" "$base/kmerged" "$base/pymerged"; do
        unmount "$mnt" >/dev/null 2>&1 || echo "demo: could not unmount $mnt" >&2
    done
    if [[ -n $(mounts_below "$base") ]]; then
        echo "demo: something is still mounted below $base; not deleting it" >&2
        rc=1
    elif [[ $keep == 1 ]]; then
        echo "demo: kept $base (layers/, upper/, work/)"
    else
        rm -rf "$base"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

tree_entries() { # "sortkey<TAB>indented entry" for everything below $1; marks whiteouts, opaque dirs
    local root=$1 path type target size name depth indent line
    (cd "$root" && find . -mindepth 1 -printf '%P\t%y\t%s\t%l\n') |
        while IFS=$'\t' read -r path type size target; do
            name=${path##*/} depth=${path//[!\/]/} indent=${depth//\//    }
            case $type in
            d)
                line="$name/"
                [[ $(getfattr --only-values -n trusted.overlay.opaque "$root/$path" 2>/dev/null) == y ]] &&
                    line+="  [opaque]"
                ;;
            l) line="$name -> $target" ;;
            f) line="$name  ($size bytes)" ;;
            c)
                line="$name  (char device)"
                [[ $(stat -c '%t:%T' "$root/$path") == 0:0 ]] && line="$name  [whiteout]"
                ;;
            *) line="$name  ($type)" ;;
            esac
            # sort key: "/" -> \001 so that a directory's children come right after it
            printf '%s\t%s%s\n' "${path//\//$'\001'}" "$indent" "$line"
        done | LC_ALL=C sort -t $'\t' -k1,1
}
tree() { # tree-like listing of $1 (find | sort, indented)
    tree_entries "$1" | cut -f2- | sed 's/^/    /'
}
side_by_side() { # side_by_side TITLE1 DIR1 TITLE2 DIR2: one row per path found in either tree
    printf '    %s%-40s%s %s%s%s\n' "$B" "$1" "$N" "$B" "$3" "$N"
    LC_ALL=C join -t $'\t' -a 1 -a 2 -e '' -o 0,1.2,2.2 <(tree_entries "$2") <(tree_entries "$4") |
        awk -F'\t' '{ printf "    %-40s %s\n", $2, $3 }' | sed 's/ *$//'
}
long_listing() { # ls -l of every object below $1
    (cd "$1" && find . -mindepth 1 -print0 | LC_ALL=C sort -z |
        xargs -0 -r ls -ld --time-style=+%H:%M) | sed 's/^/    /'
}
fingerprint() { # path, type, mode, owner, size/target, content hash of everything below $1
    (cd "$1" && find . -mindepth 1 \( -type d -printf '%p d %m %u:%g\n' \) -o \
        -printf '%p %y %m %u:%g %s %l\n' | LC_ALL=C sort &&
        find . -type f -print0 | LC_ALL=C sort -z | xargs -0 -r sha256sum)
}

# ---------------------------------------------------------------------------------------------
section "1. Build three layers (bottom to top: base, pkg, app) in $base/layers"
mkdir -p "$U" "$W" "$M"
mk() { # mk FILE [CONTENT]: create FILE with CONTENT (default: a line naming it)
    mkdir -p "$(dirname "$1")"
    printf '%s\n' "${2:-# ${1#"$L"/}}" >"$1"
}
mk "$L/base/etc/os-release" 'PRETTY_NAME="Demo Linux 1.0"
ID=demo
VERSION_ID=1.0'
mk "$L/base/etc/passwd" 'root:x:0:0:root:/root:/bin/sh
daemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin'
mk "$L/base/etc/motd" 'Welcome to Demo Linux!'
mk "$L/base/etc/issue" 'Demo Linux \n \l'
mk "$L/base/bin/sh" '#!/bin/true'
mk "$L/base/bin/ls" '#!/bin/true'
chmod 755 "$L/base/bin/sh" "$L/base/bin/ls"
ln -s sh "$L/base/bin/bash"
mk "$L/base/usr/share/doc/base-files/README" 'base-files: the base layer'
mk "$L/base/usr/share/doc/base-files/copyright" 'Copyright: public domain'

mk "$L/pkg/usr/bin/tool" '#!/bin/sh
echo tool 2.1'
chmod 755 "$L/pkg/usr/bin/tool"
mk "$L/pkg/etc/tool.conf" 'threads = 4
color = auto'
mk "$L/pkg/usr/share/doc/tool/README" 'tool: does things'
mk "$L/pkg/var/cache/tool/index.db" 'cached index'
mk "$L/pkg/var/cache/tool/pkgs.lst" 'tool 2.1'
mknod "$L/pkg/etc/issue" c 0 0 # this layer deleted base's /etc/issue (a whiteout in a lower)
chmod 000 "$L/pkg/etc/issue"

mk "$L/app/app/main.py" 'print("hello from the app layer")'
mk "$L/app/app/config.yml" 'listen: 0.0.0.0:8080
debug: false'
mk "$L/app/etc/motd" 'Welcome to the demo app!' # hides base's motd

tool_conf_before=$(cat "$L/pkg/etc/tool.conf")
lower_before=$(fingerprint "$L")
for layer in base pkg app; do
    echo "  ${B}$layer${N}"
    tree "$L/$layer"
done
note "pkg holds a whiteout for etc/issue (deleted in that layer); app overrides etc/motd"

# ---------------------------------------------------------------------------------------------
lowerdirs="$L/app:$L/pkg:$L/base"
if [[ $use_kernel == 1 ]]; then
    section "2. Mount app:pkg:base + upper + work with the kernel's overlayfs (--kernel)"
    run mount -t overlay overlay -o "lowerdir=$lowerdirs,upperdir=$U,workdir=$W" "$M"
else
    section "2. Mount app:pkg:base + upper + work with pyunionfs"
    show "pyunionfs mount -f $lowerdirs $U $W $M &"
    "$PYUNIONFS" mount -f "$lowerdirs" "$U" "$W" "$M" >"$base/pyunionfs.log" 2>&1 &
    daemon_pid=$!
    for ((i = 0; i < 300; i++)); do
        is_mounted "$M" && break
        kill -0 "$daemon_pid" 2>/dev/null || {
            wait "$daemon_pid" || true
            daemon_pid=''
            cat "$base/pyunionfs.log" >&2
            fail "pyunionfs exited before the mount was ready"
        }
        sleep 0.1
    done
    is_mounted "$M" || fail "pyunionfs did not mount $M within 30 s"
fi
grep -F " $M " /proc/mounts | sed "s|$base/||g; s/^/    /"
note "(paths are relative to $base)"

section "3. The merged view (find | sort, as a tree)"
tree "$M"
[[ $(cat "$M/etc/motd") == 'Welcome to the demo app!' ]] || fail "etc/motd should come from app"
[[ ! -e $M/etc/issue ]] || fail "etc/issue is whited out in pkg but visible"
ok "etc/motd comes from the top layer (app); etc/issue, deleted in pkg, is hidden"

# ---------------------------------------------------------------------------------------------
section "4. Change things through the mount"
runsh "echo 'verbose = true' >> $M/etc/tool.conf"
note "append to a file of the pkg layer: copy-up to upper"
run rm "$M/etc/passwd"
note "delete a file of the base layer: a whiteout in upper"
run rm -rf "$M/var/cache/tool"
note "delete a directory of the pkg layer: a whiteout in upper"
run rm -rf "$M/usr/share/doc"
run mkdir "$M/usr/share/doc"
runsh "echo 'all docs removed to save space' > $M/usr/share/doc/NOTICE"
note "delete a directory merged from two lowers and recreate it: an opaque directory in upper"
run mkdir -p "$M/home/demo"
runsh "echo 'new file' > $M/home/demo/notes.txt"
note "new files and directories go straight to upper"

section "5. The merged view now, next to what landed in UPPER"
side_by_side "merged/" "$M" "upper/" "$U"

section "6. UPPER in detail (ls -l)"
long_listing "$U"
echo
run getfattr --absolute-names -n trusted.overlay.opaque "$U/usr/share/doc"
note "c--------- 0, 0 = whiteout; trusted.overlay.opaque=y = opaque directory, as the kernel writes them"
echo
run cat "$M/etc/tool.conf"
run cat "$L/pkg/etc/tool.conf"
note "the lower file is unchanged: the change lives in the copy in upper/etc/tool.conf"

section "7. Checks"
[[ $(cat "$M/etc/tool.conf") == "$tool_conf_before"$'\n''verbose = true' ]] || fail "merged etc/tool.conf has the wrong content"
[[ -f $U/etc/tool.conf && ! -L $U/etc/tool.conf ]] || fail "etc/tool.conf was not copied up"
[[ $(cat "$U/etc/tool.conf") == "$(cat "$M/etc/tool.conf")" ]] || fail "upper etc/tool.conf differs from the merged view"
ok "etc/tool.conf copied up with the appended line"
[[ $(cat "$L/pkg/etc/tool.conf") == "$tool_conf_before" ]] || fail "the lower etc/tool.conf changed"
[[ $(fingerprint "$L") == "$lower_before" ]] || fail "a lower layer changed"
ok "lower layers unchanged (pkg/etc/tool.conf still has $(wc -l <"$L/pkg/etc/tool.conf") lines)"
is_whiteout() { [[ -c $1 && $(stat -c '%t:%T' "$1") == 0:0 ]]; }
is_whiteout "$U/etc/passwd" || fail "no 0/0 whiteout at upper/etc/passwd"
is_whiteout "$U/var/cache/tool" || fail "no 0/0 whiteout at upper/var/cache/tool"
[[ ! -e $M/etc/passwd && ! -e $M/var/cache/tool ]] || fail "deleted names still visible"
listing() { find "$1" -mindepth 1 -maxdepth 1 -printf '%f\n' | LC_ALL=C sort | tr '\n' ' '; }
[[ " $(listing "$M/etc")" != *" passwd "* && " $(listing "$M/var/cache")" != *" tool "* ]] ||
    fail "deleted names still listed"
ok "etc/passwd and var/cache/tool are 0/0 whiteouts in upper, gone from the merged view"
[[ $(getfattr --only-values -n trusted.overlay.opaque "$U/usr/share/doc" 2>/dev/null) == y ]] ||
    fail "upper/usr/share/doc is not marked opaque"
[[ $(listing "$M/usr/share/doc") == 'NOTICE ' ]] || fail "merged usr/share/doc should hold only NOTICE, has: $(listing "$M/usr/share/doc")"
[[ ! -e $M/usr/share/doc/tool/README ]] || fail "usr/share/doc/tool/README still reachable"
ok "usr/share/doc is opaque: only NOTICE is visible, the lower docs are hidden"
if getfattr -n trusted.overlay.opaque "$U/home/demo" >/dev/null 2>&1; then fail "a new dir over nothing must not be opaque"; fi
[[ -f $U/home/demo/notes.txt ]] || fail "new file missing from upper"
ok "home/demo/notes.txt created in upper; home/demo is a plain (not opaque) directory"

# ---------------------------------------------------------------------------------------------
section "8. Unmount"
if [[ $use_kernel == 1 ]]; then
    run umount "$M"
else
    show pyunionfs umount "$M"
    "$PYUNIONFS" umount "$M"
fi
for ((i = 0; i < 100; i++)); do
    is_mounted "$M" || break
    sleep 0.1
done
is_mounted "$M" && fail "$M is still mounted"
if [[ -n $daemon_pid ]]; then
    for ((i = 0; i < 100; i++)); do
        kill -0 "$daemon_pid" 2>/dev/null || break
        sleep 0.1
    done
    kill -0 "$daemon_pid" 2>/dev/null && fail "pyunionfs still running 10 s after unmount"
    wait "$daemon_pid" || fail "pyunionfs exited with status $?"
    daemon_pid=''
fi
if [[ $use_kernel == 1 ]]; then ok "unmounted"; else ok "unmounted, pyunionfs exited with status 0"; fi
merged_before=$(cd "$M" && find . -mindepth 1 | LC_ALL=C sort)
[[ -z $merged_before ]] || fail "$M is not empty after unmount"

if [[ $kernel_check == 1 && $use_kernel == 0 ]]; then
    section "9. The kernel's overlayfs reads the same upper"
    if ! grep -qw overlay /proc/filesystems && ! modprobe overlay 2>/dev/null; then
        note "kernel overlayfs not available here; skipped"
    else
        mkdir -p "$base/kmerged" "$base/pymerged"
        # reference: the view pyunionfs gave, remounted read-only from the same upper
        run mount -t overlay overlay -o "lowerdir=$lowerdirs,upperdir=$U,workdir=$W" "$base/kmerged"
        kview=$(fingerprint "$base/kmerged")
        run umount "$base/kmerged"
        show "pyunionfs mount -f $lowerdirs $U $W $base/pymerged &"
        "$PYUNIONFS" mount -f "$lowerdirs" "$U" "$W" "$base/pymerged" >>"$base/pyunionfs.log" 2>&1 &
        daemon_pid=$!
        for ((i = 0; i < 300; i++)); do
            is_mounted "$base/pymerged" && break
            kill -0 "$daemon_pid" 2>/dev/null || fail "pyunionfs remount failed (see $base/pyunionfs.log)"
            sleep 0.1
        done
        pview=$(fingerprint "$base/pymerged")
        unmount "$base/pymerged" || fail "could not unmount $base/pymerged"
        if [[ $kview != "$pview" ]]; then
            diff <(echo "$kview") <(echo "$pview") | sed 's/^/    /' || true
            fail "kernel overlayfs and pyunionfs show different trees (< kernel, > pyunionfs)"
        fi
        ok "kernel overlayfs and pyunionfs show the same files, types, modes, owners and contents"
    fi
fi

section "Done"
echo "    All checks passed."
