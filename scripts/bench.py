#!/usr/bin/env python3
"""Benchmark pyunionfs against the kernel's overlayfs and fuse-overlayfs (issue 7).

Main layers, generated once (top first): a "change layer" the kernel wrote (a kernel overlay
mount over the two copies below with an empty upper, a few hundred changes: whiteouts, an opaque
directory, copied-up and chmod'ed files, new files), a copy of this Python's stdlib and a copy of
/usr/include (~16 000 entries), a 1 GiB file, a big/ directory of 30 000 entries over the three
layers. Every workload runs on a fresh mount (fresh upper/work); the filesystems are interleaved
per workload (round r: kernel, fuse-overlayfs, pyunionfs for workload w, then w+1, ...):

  mount_ready   time from starting the mount command until it shows in /proc/self/mountinfo and a
                stat inside succeeds (FUSE daemons in the foreground, -f)
  mount_bg      wall time of the daemonizing command (no -f) until it returns
  find_cold     find MERGED after drop_caches          find_warm   find again, same mount
  lsR_cold      ls -lR MERGED after drop_caches        stat_warm   os.walk + lstat, warmed up
  imports       a fresh python3 -I -S -B importing ~30 stdlib modules from MERGED
  readdir_big   os.scandir of the 30 000-entry merged directory
  read_cold     read the 1 GiB lower file (1 MiB reads) after drop_caches
  read_warm     read it again after an untimed read (the lower file prewarmed outside)
  write         write a new 1 GiB file (1 MiB writes) + fsync
  copyup_big    open the 1 GiB lower file O_APPEND, write 1 byte (a full copy-up)
  append_small  20 000 O_APPEND writes of 100 bytes through one fd
  append_8      200 000 O_APPEND writes of 8 bytes to a new file through one fd (issue 9). Each
                is two FUSE requests for pyunionfs, getxattr(security.capability) and write;
                one for fuse-overlayfs, which runs with the writeback cache (the getxattr)
  untar         tar xf of ~7 000 small files into MERGED/new
  rm_rf         rm -rf of the stdlib copy (~8 000 entries)
  chmod_R       chmod -R g+w of a lower tree of a few thousand entries (copy-up of each)
  mv_dir        mv MERGED/big MERGED/big-moved (the mv command) of a directory of 1 000 files of
                4 KiB that is in one lower only (its own layer: the only lower of this
                workload's mounts); issue 10. The kernel and pyunionfs run with
                -o redirect_dir=on (rename in place, trusted.overlay.redirect); fuse-overlayfs has
                no redirects: rename(2) is EXDEV and mv copies + deletes. Also reported: the bytes
                written to UPPER (st_blocks*512 of UPPER and all below, after the mv and a sync,
                minus before) and the entries under UPPER; MERGED/big-moved must list 1 000
                names and MERGED/big be gone
  chown_r       chown -R 1234:1234 MERGED/tree (the chown command) of a tree of 1 MiB files of
                random data, 16 per directory, 256 MiB in all (--chown-mib; 8 MiB with --quick),
                in a layer of its own built once per run (the only lower of these mounts); issue
                10. The kernel and pyunionfs run with -o metacopy=on (a copy of the metadata
                only; it implies redirect_dir=on); fuse-overlayfs has no metacopy and copies the
                data. Reported like mv_dir: the bytes written to UPPER and the entries under it.
                Every entry under MERGED/tree must show 1234:1234 afterwards, a sample of files
                the lower's size and sha256, and the lower must be unchanged
  chown_r_full  the same with -o metacopy=off for the kernel and pyunionfs (a full copy-up of
                every file, as fuse-overlayfs)

Then "layers": N = 1, 16, 128, 500 lowers sharing a common/ directory of the same 100 names:
mount_ready, ls -l common/ on a cold mount, lookup of 100 present and 50 missing names. And "rss":
the FUSE daemons' VmRSS after mount, after lstat of every entry of /usr, and after
drop_caches (the kernel forgets the inodes).

Tables: medians of N rounds, ratios py/fuse-overlayfs and py/kernel, a target per row (pass or
FAIL; a miss is not an error), the append workloads' operations per second, and the bytes and
entries in UPPER of mv_dir and chown_r[_full] (with the same ratios). A filesystem that is
unavailable shows n/a; a failure or timeout shows ERR/timeout and the script exits 1 (also if
pyunionfs was asked for but is unavailable).

  scripts/bench.py [--quick] [-n N] [--json FILE] [--fs kernel,fuse-overlayfs,pyunionfs]
                   [--workloads KEY,...|layers|rss] [--chown-mib N]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
# the mounts are unionfs.Overlay's: this checkout's, also when it is not installed
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))

from benchkit.runner import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
