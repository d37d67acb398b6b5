"""Daemon lifecycle: checks, mount, fork with a readiness pipe, signals, unmount.

Forking happens before trio starts (trio can't survive a fork), and the parent
exits 0 only once the child's event loop is serving the mount.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import logging
import os
import signal
import socket
import stat
import sys
import tempfile
from collections.abc import Callable, Iterator

import pyfuse3
import trio

from unionfs import claim, client, export, index, mounttable, remount, stats
from unionfs import log as logsetup
from unionfs.attrs import OVERRIDE_XATTRS
from unionfs.config import MountConfig, check_supported, resolve_features, validate
from unionfs.errors import MountError
from unionfs.export import ExportLog
from unionfs.inodes import InodeTable
from unionfs.layers import LayerStack
from unionfs.lookup import root_resolution
from unionfs.ops import Operations
from unionfs.probe import cleanup_workdir, init_uuid, prepare_workdir, supports_acl
from unionfs.state import State
from unionfs.whiteout import USER, drop_shared_whiteout

log = logging.getLogger(__name__)
READY_TIMEOUT = 30.0
# Set by a warm server's worker (server.py): it serves the mount itself, with no fork (the
# fork and the copies of every page it then touches were 2-3 ms of a warm mount), and this is
# called once it serves: it answers the caller and lets go of the caller's stdio.
SERVE_HERE: Callable[[], None] | None = None


def fuse_options(cfg: MountConfig) -> set[str]:
    opts = {f"fsname={cfg.fsname}", "subtype=pyunionfs", "default_permissions"}
    if os.geteuid() == 0:
        # Other users must see the mount, with ordinary permission checks, and
        # set-id programs and device nodes in layers work as under the kernel's.
        opts |= {"allow_other", "suid", "dev"}
    if cfg.readonly:
        opts.add("ro")
    if cfg.noatime:
        opts.add("noatime")  # not for the kernel (FUSE inodes keep no atime): for /proc/mounts
    if cfg.debug_fuse:
        opts.add("debug")
    opts.update(o for o in cfg.fuse_options if not o.startswith("fsname="))
    return opts


FUSE_DEV = "/dev/fuse"
FUSE_RDEV = os.makedev(10, 229)


def check_fuse_device() -> None:
    """Can this process mount at all?  Asked before anything is created (WORK/work), and
    answered with what to do.  libfuse opens the device as the caller even when
    fusermount3 then does the mount, so the same open decides here."""
    try:
        st = os.stat(FUSE_DEV)
    except FileNotFoundError:
        raise MountError(f"no {FUSE_DEV}: load the FUSE module ('modprobe fuse'); in a "
                         "container, pass the device in ('--device /dev/fuse')",
                         errno.ENODEV) from None
    except OSError as e:
        raise MountError(f"cannot stat {FUSE_DEV}: {e.strerror}", e.errno or errno.EIO) from None
    if not stat.S_ISCHR(st.st_mode) or st.st_rdev != FUSE_RDEV:
        raise MountError(f"{FUSE_DEV} is not the FUSE device (a character device 10:229): "
                         "recreate it ('mknod -m 666 /dev/fuse c 10 229') or load the module "
                         "('modprobe fuse')", errno.ENODEV)
    try:
        os.close(os.open(FUSE_DEV, os.O_RDWR | os.O_CLOEXEC))
    except PermissionError:
        user = _user_name()
        raise MountError(f"{user} may not open {FUSE_DEV}: give it read-write access, e.g. "
                         f"'setfacl -m u:{user}:rw {FUSE_DEV}' or membership of the group that "
                         "owns it", errno.EACCES) from None
    except OSError as e:
        if e.errno in (errno.ENODEV, errno.ENXIO):
            raise MountError(f"{FUSE_DEV} has no driver behind it: load the FUSE module "
                             "('modprobe fuse')", e.errno) from None
        raise MountError(f"cannot open {FUSE_DEV}: {e.strerror}", e.errno or errno.EIO) from None


def _user_name() -> str:
    import pwd

    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return f"uid {os.geteuid()}"


@contextlib.contextmanager
def _stderr_captured() -> Iterator[list[str]]:
    """libfuse and fusermount3 write their own lines to fd 2: hold them, so that a failure
    is one line of ours (quoting theirs) and a success shows them as they came."""
    lines: list[str] = []
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield lines
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            lines.extend(tmp.read().decode(errors="replace").splitlines())


def prepare(cfg: MountConfig) -> State:
    validate(cfg)
    check_fuse_device()
    try:
        stack = LayerStack(cfg.lowers, cfg.upper, cfg.work)
    except OSError as e:
        raise MountError(f"cannot open layer '{e.filename}': {e.strerror}",
                         e.errno or errno.EIO) from None
    if stack.upper is not None and stack.work_path is not None:
        # before anything is written: prepare_workdir wipes WORK/work
        try:
            stack.claim_fds = claim.take([("upper", stack.upper.path, stack.upper.fd),
                                          ("work", stack.work_path, stack.workroot_fd)])
        except BaseException:
            stack.close()
            raise
    if cfg.upper is not None:
        why = stack.own_upper_mount(cfg.atime, cfg.nodiratime)
        if why is not None:
            # Only strictatime tells (relatime is the upper's default anyway); for an
            # ordinary user this is every mount.
            log.log(logging.INFO if cfg.atime == "strictatime" else logging.DEBUG,
                    "atime: no private upper mount (%s): strictatime and relatime are the "
                    "upper filesystem's own", why)
    try:
        prepare_workdir(stack, cfg.userxattr, cfg.whiteouts)
    except BaseException:
        stack.close()
        raise
    log.info("on-disk dialect: %s", stack.dialect.describe())
    try:
        features = resolve_features(cfg.features, stack.dialect.prefix == USER,
                                    cfg.upper is not None)
        check_supported(features)
    except MountError as e:
        cleanup_workdir(stack)
        stack.close()
        if stack.dialect.prefix == USER and not cfg.userxattr:
            raise MountError(f"{e} (an unprivileged mount keeps its marks in user.overlay.*,"
                             " as the kernel's userxattr does)", e.errno) from None
        raise
    stack.follow_redirects = features.follow
    log.info("features: %s", ",".join(features.words()))
    override = OVERRIDE_XATTRS.get(cfg.xattr_permissions)
    stack.list_noatime = cfg.nodiratime
    acl = cfg.acl and supports_acl(stack)
    if cfg.acl and not acl:
        log.info("no POSIX ACLs: the upper filesystem has none")
    if features.index and cfg.writeback and cfg.upper is not None \
            and hasattr(pyfuse3.EntryAttributes, "nodeid"):
        # Each name of an index entry is a node of its own: the size the kernel keeps for
        # one would not follow a write through another.  Before anything is written to
        # UPPER; also where index is on by nfs_export=on or the module's default.
        cleanup_workdir(stack)
        stack.close()
        raise MountError("writeback can't be combined with index=on (the names of a hard "
                         "link would show different sizes; index=off allows it)")
    init_uuid(stack, features.uuid)
    index_layer = None
    if features.index and not hasattr(pyfuse3.EntryAttributes, "nodeid"):
        # each name of an indexed file must be a node of its own (inodes.py)
        log.warning("index=on needs the patched pyfuse3 (scripts/install-deps.sh): "
                    "falling back to index=off")
        features = dataclasses.replace(features, index=False)
    if features.index and cfg.upper is not None:
        try:
            index_layer = index.prepare(stack, features.uuid != "off")
        except BaseException:
            cleanup_workdir(stack)
            stack.close()
            raise
        if index_layer is None:
            features = dataclasses.replace(features, index=False)
        else:
            try:
                done = index.cleanup(stack, index_layer, features.nfs_export)
            except BaseException:
                os.close(index_layer.fd)
                cleanup_workdir(stack)
                stack.close()
                raise
            log.info("index: %s", ", ".join(f"{n} {k}" for k, n in done.items()))
    export_log = None
    if features.nfs_export and not features.index:
        log.info("nfs_export=on needs index=on, which is off: falling back to nfs_export=off")
        features = dataclasses.replace(features, nfs_export=False)
    elif features.nfs_export:
        try:
            assert stack.work_path is not None
            export_log = ExportLog(stack.work_path, stack.workroot_fd)
        except OSError as e:  # sqlite's errors arrive as OSError (ExportLog)
            cleanup_workdir(stack)
            stack.close()
            raise MountError(f"cannot prepare '{stack.work_path}/{export.DB_NAME}': {e}") \
                from None
    inodes = InodeTable(root_resolution(stack), [layer.dev for layer in stack.layers])
    # Each name of a lower hard link its own node, as the kernel without index keeps them
    # and as a copy-up through one name needs with index (the names of an index entry
    # share its data); a stock pyfuse3 can't send a node id apart from the number
    # (docs/differences.md).
    inodes.split = hasattr(pyfuse3.EntryAttributes, "nodeid")
    return State(stack, inodes, owners=cfg.owners,
                 volatile=cfg.volatile, writeback=cfg.writeback, acl=acl,
                 noatime=cfg.noatime, atime=cfg.atime,
                 override_xattr=override,
                 timeout=cfg.timeout, features=features, index=index_layer, export=export_log)


def mount(cfg: MountConfig) -> int:
    try:
        logsetup.setup(cfg.debug, cfg.log, cfg.foreground)
    except OSError as e:
        raise MountError(f"cannot open log file '{cfg.log}': {e.strerror}",
                         e.errno or errno.EIO) from None
    client.mark("pyfuse3 imported")
    fs = prepare(cfg)
    client.mark("layers prepared")
    # Ours must not touch what we create: the caller's umask is applied already, by the
    # kernel, or by dirops where the kernel left it to us (DONT_MASK, for default ACLs).
    os.umask(0)
    ops = Operations(fs, debug=cfg.debug)
    merged = os.path.realpath(cfg.merged)  # before the mount: afterwards it would ask us
    failed: RuntimeError | None = None
    with _stderr_captured() as said:
        try:
            pyfuse3.init(ops, cfg.merged, fuse_options(cfg))
        except RuntimeError as e:
            failed = e
    if failed is not None:
        cleanup_workdir(fs.stack)
        theirs = [ln.strip() for ln in said if ln.strip()]
        why = theirs[-1] if theirs else f"{failed} ({_mount_hint()})"
        raise MountError(f"cannot mount on '{cfg.merged}': {why}")
    if said:
        print("\n".join(said), file=sys.stderr)
    client.mark("mounted")
    if cfg.foreground:
        return _served(fs, serve(None, fs, merged))
    if SERVE_HERE is not None:
        with contextlib.suppress(OSError):
            os.setsid()  # as the forked daemon does
        os._exit(_served(fs, serve(None, fs, merged)))
    read_end, write_end = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        os.close(write_end)
        return _wait_ready(read_end, cfg.merged)
    client.mark("forked")
    os.close(read_end)
    os.setsid()
    release_stdio()
    os._exit(_served(fs, serve(write_end, fs, merged)))


def release_stdio() -> None:
    """A daemon keeps none of its caller's stdin/stdout/stderr (a caller reading our output
    to its end would wait for us): /dev/null instead."""
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)


def _served(fs: State, rc: int) -> int:
    """After the unmount: leave WORK/work empty, as a clean unmount should; with
    nfs_export=on, where every node the kernel held was, for the handles that outlive us."""
    drop_shared_whiteout(fs.stack.work_fd)
    if fs.export is not None:
        for node in list(fs.inodes.inodes.values()):
            if node.parent is not None and not node.gone:
                fs.export.record(node.ino, node.parent.ino, node.name)
        fs.export.close()
    return rc


def _mount_hint() -> str:
    if os.geteuid() == 0:
        return "is /dev/fuse there and the mount point not in use?"
    if not os.access("/dev/fuse", os.R_OK | os.W_OK):
        return "this user may not open /dev/fuse"
    return "fusermount3 refused; see its message above"


def _wait_ready(read_end: int, merged: str) -> int:
    import select

    ready, _, _ = select.select([read_end], [], [], READY_TIMEOUT)
    data = os.read(read_end, 1) if ready else b""
    os.close(read_end)
    if data == b"1":
        return 0
    print(f"pyunionfs: error: the daemon for '{merged}' did not start (see its log)",
          file=sys.stderr)
    return 1


def serve(ready_fd: int | None, fs: State, merged: str) -> int:
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    rc = 0
    try:
        trio.run(_main, ready_fd, fs, merged)
    except BaseException as e:
        if _connection_ended(e):
            # The unmount ended the connection while a worker still read /dev/fuse: the
            # kernel may say ECONNABORTED there instead of ENODEV (which libfuse takes as
            # the end), seen when a task was still asleep in our loop (ops._give_back).
            log.info("the kernel ended the connection")
        else:
            log.exception("the filesystem loop failed")
            rc = 1
    finally:
        # Unmount even after a failure: a dead mount only gives ENOTCONN to everyone.  Not
        # once our mount has left this namespace (a SIGTERM while copies in other mount
        # namespaces kept us serving): the path may hold another mount by now.
        try:
            pyfuse3.close(unmount=not fs.unmounted_here)
        except Exception:
            log.exception("unmount failed")
            rc = 1
    return rc


def _connection_ended(e: BaseException) -> bool:
    """Only ECONNABORTED from reading /dev/fuse, in however many task groups."""
    subs = getattr(e, "exceptions", None)  # an ExceptionGroup (its backport before 3.11)
    if isinstance(subs, (list, tuple)):
        return bool(subs) and all(_connection_ended(sub) for sub in subs)
    return isinstance(e, ConnectionAbortedError)


async def _main(ready_fd: int | None, fs: State, merged: str) -> None:
    client.mark("trio started")
    async with trio.open_nursery() as nursery:
        # Started (not only scheduled) before the first request: the request loop may serve
        # a burst of requests before it lets another task run (eager_read).
        await nursery.start(_on_signals)
        nursery.start_soon(_follow_mount_flags, fs, merged)
        client.mark("signals")
        await nursery.start(_serve_stats, fs, merged)
        client.mark("serving")
        # logged before the caller hears of it: what it reads next in the log is there
        log.info("serving")
        log.debug("start-up: %s", client.timeline())
        if ready_fd is not None:
            os.write(ready_fd, b"1")
            os.close(ready_fd)
        elif SERVE_HERE is not None:
            SERVE_HERE()
        await pyfuse3.main()
        nursery.cancel_scope.cancel()


async def _serve_stats(fs: State, merged: str,
                       task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """``pyunionfs stats MERGED``: the counts on an abstract socket named after our mount's
    device (stats.py).  Optional: a name taken or no mount table entry only logs."""
    e = mounttable.entry(merged, resolve=False)  # resolved already; see mounttable
    if e is None:
        task_status.started()
        return
    fs.stats.mount = {"dev": e.dev, "id": e.mount_id, "point": e.point}
    fs.stats.gauges = lambda: {"nodes": len(fs.inodes.inodes),
                               "open_files": len(fs.handles.files)}
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    for name in mounttable.socket_names(e.dev):
        try:
            await sock.bind(name)
            break
        except OSError as err:
            log.debug("stats socket %r: %s", name, err)
    else:
        sock.close()
        task_status.started()
        return
    sock.listen(8)
    task_status.started()
    with sock:
        while True:
            try:
                conn, _ = await sock.accept()
            except OSError as err:
                # out of descriptors (EMFILE, ENFILE) or a peer gone before we took it: the
                # asker goes unanswered, the filesystem must not go down with it
                log.debug("stats: accept failed: %s", err.strerror)
                await trio.sleep(0.1)
                continue
            plain = socket.socket(fileno=conn.detach())
            plain.settimeout(1.0)  # a few KiB to a reader that waits for them
            stats.answer(plain, fs.stats)


async def _follow_mount_flags(fs: State, merged: str) -> None:
    """A remount may turn noatime or nodiratime on or off: follow our mount's flags.
    ``merged`` is already resolved: a stat of our own mount from here would wait for us."""
    done = False

    def changed(opts: set[str]) -> None:
        trio.from_thread.run_sync(_apply_mount_flags, fs, opts)

    words = [w for w, on in (("nodiratime", fs.stack.list_noatime and not fs.noatime),
                             ("strictatime", fs.atime == "strictatime")) if on]
    try:
        if await trio.to_thread.run_sync(remount.follow, merged, words,
                                         fs.stack.upper is None, changed,
                                         lambda: done, abandon_on_cancel=True):
            fs.unmounted_here = True
            log.info("unmounted; serving on only for copies of the mount in other mount "
                     "namespaces, if any")
    finally:
        done = True


def _apply_mount_flags(fs: State, opts: set[str]) -> None:
    fs.atime, nodiratime = remount.atime_policy(opts)
    fs.noatime = fs.atime == "noatime"
    fs.stack.list_noatime = fs.noatime or nodiratime
    try:
        fs.stack.set_atime(fs.atime, nodiratime)
    except OSError as e:
        log.warning("remount: the upper's atime policy stays as it was: %s", e.strerror)
    log.info("remounted: %s", ",".join(sorted(opts)))


async def _on_signals(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as sigs:
        task_status.started()
        async for sig in sigs:
            log.info("signal %d: unmounting", sig)
            pyfuse3.terminate()
            return
