"""POSIX ACLs through the mount, compared with kernel overlayfs (issue 9, item 1).

The kernel treats a filesystem's ACLs as its own only when it declares them (FUSE_POSIX_ACL):
then it checks permissions against them, leaves the umask to a directory's default ACL, and
expects the filesystem to store ``system.posix_acl_*`` and keep the mode in step.  Each case runs
``setfacl``/``getfacl`` (Debian's ``acl``) on kernel overlayfs and on pyunionfs over identical
layers, as root and as a second user, and compares the listings and the modes.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
from overlay_harness import IMPL, Dir, File

pytestmark = pytest.mark.skipif(shutil.which("setfacl") is None or shutil.which("getfacl") is None,
                                reason="setfacl/getfacl missing: install Debian's 'acl' package "
                                       "(make deps does)")

USER, GROUP = 1000, 1000
OTHER_USER = 1001


def _sh(root: Path, script: str, may_fail: bool = False) -> str:
    """Run ``script`` in ``root``; its output, or (``may_fail``) the failing command's
    message.  A failure nobody expected is an error, not an outcome to compare."""
    r = subprocess.run(["sh", "-ec", script], cwd=root, capture_output=True, text=True,
                       timeout=30)
    if r.returncode != 0 and not may_fail:
        raise RuntimeError(f"{script!r} failed in {root}: {r.stderr.strip()}")
    if r.returncode != 0:
        # setfacl's message names the path, which differs between the sides: keep the reason
        msg = (r.stderr.strip().splitlines() or ["?"])[-1]
        return f"rc={r.returncode}: {msg.rsplit(': ', 1)[-1]}"
    return r.stdout


def _facl(*names: str) -> str:
    """getfacl (numeric ids, no '# file' line) and the mode of each name."""
    lines = []
    for n in names:
        lines.append(f"getfacl --omit-header -n -- '{n}' | sed 's|^|{n}: |'")
        lines.append(f"stat -c '{n}: %A %u:%g' -- '{n}'")
    return "\n".join(lines)


def _as_shell(script: str, may_fail: bool = False):  # noqa: ANN202 - an Op for Pair.same
    def op(root: Path) -> str:
        return _sh(root, script, may_fail)

    op.__name__ = script.split("\n")[0][:60]
    return op


def _default_acl_layer(root: Path) -> None:
    """The upper or lower layer: a directory with a default ACL, the user's own, and files."""
    d = root / "d"
    d.mkdir()
    os.chown(d, USER, GROUP)
    subprocess.run(["setfacl", "-m", "d:u::rwx,d:g::rwx,d:o::r-x,d:u:1001:rw-", str(d)],
                   check=True)
    sg = root / "sg"
    sg.mkdir()
    os.chown(sg, USER, GROUP)
    os.chmod(sg, 0o2775)
    subprocess.run(["setfacl", "-m", "d:u::rwx,d:g::rwx,d:o::r-x", str(sg)], check=True)
    f = root / "f"
    f.write_text("data")
    os.chown(f, USER, GROUP)
    os.chmod(f, 0o640)
    g = root / "granted"
    g.write_text("secret")
    os.chmod(g, 0o600)
    subprocess.run(["setfacl", "-m", "u:1000:r--", str(g)], check=True)
    for p in (d, sg, f, g, root):
        os.utime(p, ns=(1_600_000_000 * 10**9,) * 2, follow_symlinks=False)


def _stack(where: str) -> tuple[list, object]:
    if where == "lower":
        return [_default_acl_layer], {}
    return [{"other": File("x")}], _default_acl_layer


WHERE = pytest.mark.parametrize("where", ["lower", "upper"])


@WHERE
@pytest.mark.parametrize("umask", [0o022, 0o722, 0o077, 0])
def test_create_in_default_acl_dir_skips_umask(make_pair, where: str, umask: int) -> None:
    lowers, upper = _stack(where)
    pair = make_pair(lowers=lowers, upper=upper)
    script = ("touch d/file && mkdir d/sub && mknod d/fifo p && mkdir sg/sub && touch sg/file\n"
              + _facl("d/file", "d/sub", "d/fifo", "sg/sub", "sg/file"))
    pair.same_as(USER, GROUP, _as_shell(script), umask=umask, expect="ok")
    pair.same(_as_shell(_facl("d", "sg")), expect="ok")
    if IMPL != "kernel":
        pair.assert_same_upper()


@WHERE
@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_create_without_default_acl_applies_umask(make_pair, where: str, umask: int) -> None:
    lowers, upper = _stack(where)
    pair = make_pair(lowers=lowers, upper=upper)
    script = "mkdir -p plain && touch plain/x && mkdir plain/y\n" + _facl("plain/x", "plain/y")
    pair.same(_as_shell("mkdir -m 0777 plain"), expect="ok")
    pair.same_as(USER, GROUP, _as_shell(script), umask=umask, expect="ok")


@WHERE
def test_setfacl_by_owner_updates_mode(make_pair, where: str) -> None:
    lowers, upper = _stack(where)
    pair = make_pair(lowers=lowers, upper=upper)
    script = ("setfacl -m u::rwx,g::rwx,o::rwx f\n" + _facl("f")
              + "\nsetfacl -m u:1001:r-x f\n" + _facl("f")
              + "\nchmod 0600 f\n" + _facl("f")
              + "\nsetfacl -b f\n" + _facl("f"))
    pair.same_as(USER, GROUP, _as_shell(script), expect="ok")
    pair.assert_same_tree()
    if IMPL != "kernel":
        pair.assert_same_upper()


@WHERE
def test_setfacl_by_non_owner_is_eperm(make_pair, where: str) -> None:
    lowers, upper = _stack(where)
    pair = make_pair(lowers=lowers, upper=upper)
    assert pair.same_as(OTHER_USER, OTHER_USER, _as_shell("setfacl -m u:1001:rwx f", True)) \
        == "rc=1: Operation not permitted"
    pair.same(_as_shell(_facl("f")), expect="ok")


@WHERE
def test_acl_grants_access(make_pair, where: str) -> None:
    """An ACL entry lets user 1000 read root's 0600 file; 1001 still may not."""
    lowers, upper = _stack(where)
    pair = make_pair(lowers=lowers, upper=upper)
    pair.same_as(USER, GROUP, lambda r: (r / "granted").read_text(), expect="ok")
    pair.same_as(OTHER_USER, OTHER_USER, lambda r: (r / "granted").read_text(), expect="EACCES")
    # the default ACL of d gives 1001 rw- on new files there, masked by the mode
    pair.same_as(USER, GROUP, _as_shell("echo hi > d/new && chmod 0660 d/new"), expect="ok")
    pair.same_as(OTHER_USER, OTHER_USER, lambda r: (r / "d" / "new").read_text(), expect="ok")
    pair.same_as(USER, GROUP, _as_shell("setfacl -m m::--- d/new"), expect="ok")
    pair.same_as(OTHER_USER, OTHER_USER, lambda r: (r / "d" / "new").read_text(), expect="EACCES")


@WHERE
def test_acl_survives_copy_up(make_pair, where: str) -> None:
    lowers, upper = _stack(where)
    pair = make_pair(lowers=lowers, upper=upper)
    # a write, a chmod (which rewrites the mask) and a chown, each copying up a lower object
    pair.same(_as_shell("echo more >> granted && chmod 0640 d && chown 1001 sg\n"
                        + _facl("granted", "d", "sg")), expect="ok")
    pair.assert_same_tree()
    if IMPL != "kernel":
        pair.assert_same_upper()


@WHERE
def test_setfacl_outside_group_drops_setgid(make_pair, where: str) -> None:
    """The owner, not in the file's group, sets an ACL on a set-gid file: the bit goes, as
    posix_acl_update_mode does for a caller without CAP_FSETID."""
    def prepare(root: Path) -> None:
        (root / "s").write_text("x")
        os.chown(root / "s", USER, 0)
        os.chmod(root / "s", 0o2775)

    lowers, upper = _stack(where)
    pair = make_pair(lowers=lowers, upper=upper)
    pair.same(prepare, expect="ok")
    pair.same_as(USER, GROUP, _as_shell("setfacl -m u:1001:rwx s\n" + _facl("s")), expect="ok")
    pair.same(_as_shell("chmod 2775 s && setfacl -m u:1001:r-x s\n" + _facl("s")), expect="ok")


def test_mkdir_over_whiteout_inherits_default_acl(make_pair) -> None:
    """A new name over a whiteout is made in WORK and renamed into place: it must still get
    the parent's default ACL, as the kernel's ovl_create_over_whiteout sets it."""
    lower = {"d/gone": Dir(), "d/gonefile": File("x"), "keep": File("y")}

    def upper(root: Path) -> None:
        d = root / "d"
        d.mkdir()
        os.chown(d, USER, GROUP)
        subprocess.run(["setfacl", "-m", "d:u::rwx,d:g::r-x,d:o::---,d:u:1001:rwx", str(d)],
                       check=True)
        os.mknod(d / "gone", stat.S_IFCHR, os.makedev(0, 0))
        os.mknod(d / "gonefile", stat.S_IFCHR, os.makedev(0, 0))

    pair = make_pair(lowers=[lower], upper=upper)
    pair.same_as(USER, GROUP, _as_shell("mkdir d/gone && touch d/gonefile\n"
                                        + _facl("d/gone", "d/gonefile")), umask=0o077,
                 expect="ok")
    if IMPL != "kernel":
        pair.assert_same_upper()
