"""Owner translation (fuse-overlayfs's options, as containers-storage passes them):
uidmapping/gidmapping, squash_to_*, xattr_permissions. No kernel counterpart: the expected
values follow from the option's definition (docs/options.md)."""

from __future__ import annotations

import errno
import os
import stat

import pytest
from overlay_harness import IMPL, Dir, File, PyUnionMount, run_as

pytestmark = pytest.mark.skipif(IMPL == "kernel", reason="fuse-overlayfs options, not the kernel's")

LAYERS = [{"root-owned": File("r"), "user-owned": File("u", uid=1000, gid=1000),
           "far": File("f", uid=70000, gid=70000), "dir": Dir(mode=0o777)}]


def _owner(p: os.PathLike[str] | str) -> tuple[int, int]:
    st = os.lstat(p)
    return st.st_uid, st.st_gid


def test_uid_gid_mapping_both_ways(make_stack) -> None:
    paths = make_stack(LAYERS)
    # the leading colon is what containers-storage sends
    opts = "uidmapping=:0:100000:65536,gidmapping=0:200000:65536"
    with PyUnionMount(paths, options=opts):
        m = paths.merged
        assert _owner(m) == (100000, 200000)
        assert _owner(m / "root-owned") == (100000, 200000)
        assert _owner(m / "user-owned") == (101000, 201000)
        assert _owner(m / "far") == (65534, 65534)  # outside every range: overflow

        def create(root):  # the container's root, as the host sees it
            (root / "dir/new").write_text("n")
            return _owner(root / "dir/new")

        assert run_as(100000, 200000, create, m) == ("ok", (100000, 200000))
        os.chown(m / "root-owned", 101000, 201000)
        assert _owner(m / "root-owned") == (101000, 201000)
        with pytest.raises(OSError) as e:
            os.chown(m / "user-owned", 5, -1)  # no on-disk id shows as 5
        assert e.value.errno == errno.EINVAL
    assert paths.upper is not None
    assert _owner(paths.upper / "dir/new") == (0, 0)
    assert _owner(paths.upper / "root-owned") == (1000, 1000)


def test_squash_to_root_and_to_ids(make_stack) -> None:
    paths = make_stack(LAYERS)
    with PyUnionMount(paths, options="squash_to_root"):
        assert {_owner(paths.merged / n) for n in ("root-owned", "user-owned", "far")} == {(0, 0)}
        os.chown(paths.merged / "user-owned", 5, 5)  # accepted, changes nothing shown
        assert _owner(paths.merged / "user-owned") == (0, 0)
    paths = make_stack(LAYERS)
    with PyUnionMount(paths, options="squash_to_root,squash_to_uid=7,squash_to_gid=8"):
        assert _owner(paths.merged / "far") == (7, 8)  # uid/gid win over squash_to_root


def test_xattr_permissions_keep_owner_and_mode_in_an_xattr(make_stack) -> None:
    paths = make_stack(LAYERS)
    key = "user.containers.override_stat"
    with PyUnionMount(paths, options="xattr_permissions=2"):
        m = paths.merged
        os.chmod(m / "root-owned", 0o640)
        os.chown(m / "root-owned", 5, 6)
        st = os.lstat(m / "root-owned")
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (5, 6, 0o640)
        assert key not in os.listxattr(m / "root-owned")
        fd = os.open(m / "dir/created", os.O_CREAT | os.O_WRONLY, 0o600)
        os.close(fd)
        assert stat.S_IMODE(os.lstat(m / "dir/created").st_mode) == 0o600
    assert paths.upper is not None
    real = os.lstat(paths.upper / "root-owned")
    assert (real.st_uid, real.st_gid, stat.S_IMODE(real.st_mode)) == (0, 0, 0o644)
    assert os.getxattr(paths.upper / "root-owned", key) == b"5:6:640"
    assert os.getxattr(paths.upper / "dir/created", key) == b"0:0:600"


@pytest.mark.parametrize("opt, msg", [
    ("uidmapping=0:1", "uidmapping=0:1: expected DISK:SHOWN:LEN triples"),
    ("gidmapping=a:b:c", "gidmapping=a:b:c: ids must be numbers"),
    ("squash_to_uid=x", "squash_to_uid=x: expected a number"),
    ("xattr_permissions=3", "xattr_permissions=3: expected 0, 1 or 2"),
    ("whiteouts=aufs", "whiteouts=aufs: expected one of kernel, oci"),
])
def test_bad_option_values_are_one_line_errors(make_stack, opt: str, msg: str) -> None:
    import subprocess

    from overlay_harness import CMD_TIMEOUT, PYTHON, REPO
    paths = make_stack(LAYERS)
    args = [PYTHON, "-m", "unionfs", "-o", f"lowerdir={paths.lowers[0]},upperdir={paths.upper},"
            f"workdir={paths.work},{opt}", str(paths.merged)]
    r = subprocess.run(args, capture_output=True, text=True, timeout=CMD_TIMEOUT, cwd=str(REPO),
                       env=dict(os.environ, PYTHONPATH=str(REPO)), stdin=subprocess.DEVNULL)
    assert r.returncode == 1
    assert r.stderr == f"pyunionfs: error: {msg}\n"
    assert paths.work is not None and os.listdir(paths.work) == []


def test_override_xattr_is_not_writable_through_the_mount(make_stack) -> None:
    """Otherwise any user could make a file of theirs show as setuid root."""
    paths = make_stack(LAYERS)
    with PyUnionMount(paths, options="xattr_permissions=2"):
        f = paths.merged / "dir/mine"
        f.write_text("x")
        for name in ("user.containers.override_stat", "security.fuseoverlayfs.override_stat"):
            with pytest.raises(OSError) as e:
                os.setxattr(f, name, b"0:0:4755")
            assert e.value.errno == errno.EPERM, name
            with pytest.raises(OSError) as e:
                os.getxattr(f, name)
            assert e.value.errno == errno.ENODATA, name
            with pytest.raises(OSError) as e:
                os.removexattr(f, name)
            assert e.value.errno == errno.EPERM, name
        assert stat.S_IMODE(os.lstat(f).st_mode) & stat.S_ISUID == 0


def test_mapping_with_xattr_permissions_shows_the_creator(make_stack) -> None:
    """containers-storage passes both with force_mask: the override holds on-disk ids."""
    paths = make_stack(LAYERS)
    opts = "uidmapping=100:0:10,gidmapping=100:0:10,xattr_permissions=2"
    with PyUnionMount(paths, options=opts):
        (paths.merged / "new").write_text("n")
        os.mkdir(paths.merged / "nd")
        assert _owner(paths.merged / "new") == (0, 0)
        assert _owner(paths.merged / "nd") == (0, 0)
    assert paths.upper is not None
    assert os.getxattr(paths.upper / "new", "user.containers.override_stat").startswith(
        b"100:100:")


def test_option_words_parse_like_fuse_overlayfs() -> None:
    from unionfs.config import parse_options
    o = parse_options(['lowerdir=/l,,volatile,context="system_u:object_r:t:s0:c1,c2",'
                       "userxattr=1,squash_to_root=0,upperdir=/u"], strict=False)
    assert o.ours == {"lowerdir": "/l", "volatile": "", "userxattr": "", "upperdir": "/u"}
    assert o.unknown == []
    # a quote inside a path is a character, not the start of a quoted value
    o = parse_options(['lowerdir=/a"b,upperdir=/u,workdir=/w'], strict=False)
    assert o.ours == {"lowerdir": '/a"b', "upperdir": "/u", "workdir": "/w"}
