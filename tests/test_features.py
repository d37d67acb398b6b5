"""The kernel's feature options (redirect_dir, index, metacopy, xino, nfs_export, uuid): the same
defaults as this host's overlay module, the same refusals with the same words (overlay-semantics
§1.5), checked by mounting the kernel's overlay with each option set beside ours."""

from __future__ import annotations

import ctypes
import os
import subprocess

import pytest
from overlay_harness import (
    PRIVATE_PREFIX,
    PYTHON,
    REPO,
    USERNS,
    File,
    StackSpec,
    build_stack,
    is_mounted,
    mount_stack,
    run_cmd,
)

from unionfs.config import BUILTIN_DEFAULTS, Features, module_defaults, resolve_features

# Option sets the kernel refuses or resolves in a way worth pinning; userxattr stands for the
# rootless dialect (user.overlay.*), which the kernel's userxattr option selects.
CASES = [
    "", "redirect_dir=on", "redirect_dir=follow", "redirect_dir=nofollow", "redirect_dir=off",
    "index=on", "metacopy=on", "metacopy=on,redirect_dir=off", "metacopy=on,redirect_dir=follow",
    "metacopy=on,redirect_dir=nofollow", "metacopy=on,redirect_dir=on", "nfs_export=on",
    "nfs_export=on,index=off", "nfs_export=on,metacopy=on", "xino=on", "xino=auto", "xino=off",
    "userxattr", "userxattr,redirect_dir=on", "userxattr,redirect_dir=follow",
    "userxattr,redirect_dir=off", "userxattr,redirect_dir=nofollow", "userxattr,metacopy=on",
    "userxattr,metacopy=off", "userxattr,index=on", "redirect_dir=bogus", "index=yes",
    "uuid=null", "uuid=off", "index=on,redirect_dir=on", "index=on,uuid=off",
]


_libc = ctypes.CDLL(None, use_errno=True)
_SYS_FSOPEN, _SYS_FSCONFIG = 430, 431  # asm-generic numbering
_FSCONFIG_SET_FLAG, _FSCONFIG_SET_STRING, _FSCONFIG_CMD_CREATE = 0, 1, 6


def _kernel_outcome(paths, options: str, userxattr: bool = False) -> str:
    """'ok', or the kernel's words for the refusal: made with fsopen/fsconfig, whose context
    log holds the messages of this one mount (dmesg would mix in other tests' mounts, and a
    user namespace can't read it)."""
    words = [f"lowerdir={':'.join(map(str, paths.lowers))}", f"upperdir={paths.upper}",
             f"workdir={paths.work}", *(["userxattr"] if userxattr else []),
             *(w for w in options.split(",") if w)]
    fd = _libc.syscall(_SYS_FSOPEN, b"overlay", 1)  # FSOPEN_CLOEXEC
    assert fd >= 0, os.strerror(ctypes.get_errno())
    try:
        ok = True
        for w in words:
            key, eq, value = w.partition("=")
            if eq:
                rc = _libc.syscall(_SYS_FSCONFIG, fd, _FSCONFIG_SET_STRING, key.encode(),
                                   value.encode(), 0)
            else:
                rc = _libc.syscall(_SYS_FSCONFIG, fd, _FSCONFIG_SET_FLAG, key.encode(), None, 0)
            if rc != 0:
                ok = False
                break
        if ok and _libc.syscall(_SYS_FSCONFIG, fd, _FSCONFIG_CMD_CREATE, None, None, 0) == 0:
            return "ok"
        said = []
        while True:
            try:
                msg = os.read(fd, 4096)
            except OSError:  # ENODATA: no more messages
                break
            said.append(msg.decode(errors="replace").strip())
        # "e overlayfs: ..." (or "e overlay: ..."), the last error of this mount
        errors = [m[2:] for m in said if m.startswith("e ")]
        return "refused: " + (errors[-1] if errors else "")
    finally:
        os.close(fd)


def _ours(paths, options: str) -> tuple[int, str]:
    """Exit status and output of our mount command (as a daemon: it exits 0 once mounted,
    and its log goes to syslog, so the output is only what the user is told)."""
    args = [PYTHON, "-m", "unionfs", "mount"]
    if options:
        args += ["-o", options]
    args += [":".join(map(str, paths.lowers)), str(paths.upper), str(paths.work), str(paths.merged)]
    try:
        r = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=30,
                           stdin=subprocess.DEVNULL)
        return r.returncode, r.stdout + r.stderr
    finally:
        if is_mounted(paths.merged):
            run_cmd(["fusermount3", "-u", str(paths.merged)])


def _compare(k: str, rc: int, out: str, options: str) -> None:
    if k == "ok" and rc != 0 and "not supported yet" in out:
        assert len(out.strip().splitlines()) == 1, out
        pytest.xfail(out.strip())  # refused in one line, rather than accepted and ignored
    if k == "ok":
        assert rc == 0, f"kernel mounts with {options!r}, ours refused: {out}"
        return
    assert rc != 0, f"kernel refused {options!r} ({k}), ours mounted"
    lines = [ln for ln in out.strip().splitlines() if ln]
    assert len(lines) == 1 and "Traceback" not in out, out
    words = k.split("overlayfs: ", 1)[-1].split("overlay: ", 1)[-1]
    if words == "refused: ":
        assert "conflicting options" in lines[0] or "bad value" in lines[0], out
    elif words.startswith("Bad value for"):  # fs_parser's wording: ours names the values too
        assert f"bad value for {words.split(' for ', 1)[1]}" in lines[0], (k, out)
    else:
        assert words in lines[0], (k, out)


SPEC = StackSpec(lowers=[{"a": File("a")}, {"b": File("b")}], upper={})


@pytest.mark.skipif(USERNS, reason="compares root mounts; the userns suite runs the next test")
@pytest.mark.parametrize("options", CASES)
def test_option_sets_accepted_and_refused_like_kernel(tmp_path, options):
    k = _kernel_outcome(build_stack(SPEC, tmp_path / "k"), options)
    rc, out = _ours(build_stack(SPEC, tmp_path / "o"), options)
    _compare(k, rc, out, options)


@pytest.mark.skipif(not USERNS, reason="runs in the userns suite (test_rootless)")
@pytest.mark.parametrize("options", ["", "redirect_dir=on", "redirect_dir=follow",
                                     "redirect_dir=off", "redirect_dir=nofollow", "metacopy=on",
                                     "metacopy=off", "xino=on", "index=on"])
def test_rootless_dialect_resolves_like_kernel_userxattr(tmp_path, options):
    # Root of a user namespace gets the user.overlay.* dialect by itself, as the kernel's
    # userxattr: the same options are refused, with the kernel's words.
    k = _kernel_outcome(build_stack(SPEC, tmp_path / "k"), options, userxattr=True)
    rc, out = _ours(build_stack(SPEC, tmp_path / "o"), options)
    _compare(k, rc, out, options)


def test_defaults_follow_this_hosts_module():
    # With no options we do what `mount -t overlay` does here: the module's parameters decide.
    d = module_defaults()
    f = resolve_features({}, userxattr=False, upper=True)
    assert f.redirect == ("on" if d["redirect_dir"] else
                          "follow" if d["redirect_always_follow"] else "nofollow")
    assert (f.index, f.metacopy, f.xino) == (d["index"], d["metacopy"],
                                             "auto" if d["xino_auto"] else "off")
    assert module_defaults("/nonexistent") == BUILTIN_DEFAULTS


@pytest.mark.parametrize("params,given,userxattr,want", [
    ({"redirect_dir": True}, {}, False, Features(redirect="on")),
    ({"redirect_always_follow": False}, {}, False, Features(redirect="nofollow")),
    ({"redirect_always_follow": False}, {"redirect_dir": "off"}, False,
     Features(redirect="nofollow")),
    ({"metacopy": True}, {}, False, Features(redirect="on", metacopy=True)),
    # an explicit redirect_dir turns a module-default metacopy off instead of conflicting
    ({"metacopy": True}, {"redirect_dir": "follow"}, False, Features(redirect="follow")),
    ({"redirect_dir": True, "metacopy": True}, {}, True, Features(redirect="nofollow")),
    ({"nfs_export": True}, {}, False, Features(index=True, nfs_export=True)),
    ({"nfs_export": True}, {"index": "off"}, False, Features()),
    ({"index": True}, {"nfs_export": "on", "metacopy": "on"}, False, None),
    ({"xino_auto": True}, {}, False, Features(xino="auto")),
])
def test_module_parameters_resolve_like_kernel(params, given, userxattr, want):
    # The kernel's resolution of module defaults against explicit options, for parameter values
    # this host doesn't have (the differential test above covers the host's own).
    defaults = dict(BUILTIN_DEFAULTS, **params)
    if want is None:
        with pytest.raises(Exception, match="conflicting options: nfs_export=on,metacopy=on"):
            resolve_features(given, userxattr, upper=True, defaults=defaults)
        return
    assert resolve_features(given, userxattr, upper=True, defaults=defaults) == want


@pytest.mark.parametrize("options", ["", "uuid=on", "uuid=off", "uuid=null"])
@pytest.mark.parametrize("old", [False, True], ids=["new", "old"])
def test_upper_root_uuid_like_kernel(tmp_path, options, old):
    # The overlay's own uuid (overlay.uuid on the upper root): made at the first mount of a new
    # overlay with uuid=auto (an upper whose root is impure already stays without), always
    # with uuid=on, never with off/null (the kernel's ovl_init_uuid_xattr).
    upper = {"d/x": File("x")}
    spec = StackSpec(lowers=[{"a": File("a")}], upper=upper)
    got = {}
    for impl in ("kernel", "pyunionfs"):
        paths = build_stack(spec, tmp_path / impl)
        if old:
            os.setxattr(paths.upper, PRIVATE_PREFIX + "impure", b"y")
        mount_stack(paths, impl, options=options).stop()
        try:
            got[impl] = len(os.getxattr(paths.upper, PRIVATE_PREFIX + "uuid"))
        except OSError:
            got[impl] = None
    assert got["pyunionfs"] == got["kernel"], got
