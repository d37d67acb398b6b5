"""nfs_export=on: file handles that outlive the daemon's memory and the mount.

A FUSE file handle is only what the kernel got from us: a node id and a generation.  When it
no longer holds the inode, it opens a handle by asking us for "." in that node id (and for
".." to connect a directory to the root).  So with nfs_export=on both must be enough to find
the object again, in this mount or a later one over the same layers:

- node ids are the numbers the objects show, computed from the real objects with device
  ordinals in layer order (inodes.InodeTable), so a remount gives every object its number
  again, a copy-up keeps its origin's;
- each node the kernel forgets (and each one it still holds at unmount) leaves its parent's
  node id and its name in ``WORK/pyunionfs-export.sqlite``.  Finding a node again walks
  those records up to one we hold, then looks the names up downwards, and takes the result
  only if it shows the same number.  A directory moved later keeps its number, so the names
  below it still lead there; the record of a moved object is rewritten when it is forgotten
  again;
- the generation tells a reused number from its first owner: an object made in upper shows
  its own real inode number, which its filesystem hands out again after a removal, so its
  generation is a digest of its real file handle (which holds the real generation); lower
  objects never go away (layers are immutable), generation 0; the few numbers we count out
  ourselves (inodes.TOP_INO) differ from mount to mount, so they carry a generation of the
  mount's own.

Kernel overlayfs puts the real handles into its own and keeps an index entry per object;
FUSE gives us no room for that.  What this can't find: a number counted out by an earlier
mount, an object removed since, and a file whose names are all gone and that nobody holds
open (all ESTALE, as in the kernel).
"""

from __future__ import annotations

import logging
import os
import zlib
from typing import TYPE_CHECKING

from unionfs import sysio

if TYPE_CHECKING:
    import sqlite3

log = logging.getLogger(__name__)

DB_NAME = "pyunionfs-export.sqlite"
FLUSH_AT = 4096  # forgotten nodes kept in memory before they are written


class ExportLog:
    """Where forgotten nodes were: node id -> (parent node id, name)."""

    def __init__(self, work_path: str, workroot_fd: int) -> None:
        # sqlite wants a path, and follows each symlink in it (so not /proc/self/fd/N, which
        # leads to our private clone of WORK's mount): WORK's own, checked to be the
        # directory we hold.  Made here, at mount, so that a failure is the mount's; opened
        # again by the daemon (a connection must not cross its fork).
        work = os.path.realpath(work_path)
        a, b = os.stat(work), os.fstat(workroot_fd)
        if (a.st_dev, a.st_ino) != (b.st_dev, b.st_ino):
            raise OSError(f"{work_path} changed while it was opened")
        self.path = os.path.join(work, DB_NAME)
        self._db: sqlite3.Connection | None = None
        try:
            self._conn().close()
        except Exception as e:  # sqlite3.Error, imported lazily: the mount's OSError
            raise OSError(f"the export database: {e}") from None
        self._db = None
        self._pending: dict[int, tuple[int, str]] = {}
        # The generation of numbers counted out in this mount only (see the docstring).
        self.counted_gen = int.from_bytes(os.urandom(4), "little") | 1

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            import sqlite3  # only with nfs_export=on: 7 ms of every mount's start-up otherwise

            self._db = sqlite3.connect(self.path, isolation_level=None,
                                       check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute("CREATE TABLE IF NOT EXISTS nodes (id INTEGER PRIMARY KEY, "
                             "parent INTEGER NOT NULL, name TEXT NOT NULL)")
        return self._db

    def record(self, ino: int, parent: int, name: str) -> None:
        self._pending[ino] = (parent, name)
        if len(self._pending) >= FLUSH_AT:
            self.flush()

    def where(self, ino: int) -> tuple[int, str] | None:
        import sqlite3

        hit = self._pending.get(ino)
        if hit is not None:
            return hit
        try:
            row = self._conn().execute("SELECT parent, name FROM nodes WHERE id = ?",
                                       (ino,)).fetchone()
        except sqlite3.Error as e:  # damaged: its handles are stale, the mount goes on
            log.warning("nfs_export: %s unreadable: %s", self.path, e)
            return None
        if row is None:
            return None
        name = str(row[1])
        # a file of WORK, so not beyond damage: only a plain name is looked up
        if name in ("", ".", "..") or "/" in name or "\0" in name:
            return None
        return int(row[0]), name

    def flush(self) -> None:
        if not self._pending:
            return
        import sqlite3

        rows = [(i, p, n) for i, (p, n) in self._pending.items()]
        self._pending.clear()
        try:
            self._conn().executemany("INSERT OR REPLACE INTO nodes VALUES (?, ?, ?)", rows)
        except sqlite3.Error as e:  # a full disk: those handles will be ESTALE
            log.warning("nfs_export: %d forgotten nodes not recorded: %s", len(rows), e)

    def close(self) -> None:
        self.flush()
        if self._db is not None:
            self._db.close()
            self._db = None


def generation(dirfd: int, name: str) -> int:
    """The generation of an object made in upper: a digest of its real file handle, which
    changes when its filesystem gives the inode number to a new object."""
    try:
        kind, handle = sysio.name_to_handle(dirfd, name)
    except OSError:
        return 0
    return zlib.crc32(handle, kind) or 1
