"""Attributes (overlay-semantics §9, §11.1): st_ino/st_dev/nlink rules, times, statfs.

Raw inode numbers are never compared between the kernel and pyunionfs (different stacks); each side
is checked against itself and the boolean outcomes compared."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from overlay_harness import IMPL, Dir, Fifo, File, Hardlink, Symlink, ls_op, snapshot_merged


def _ino(m: Path, rel: str) -> int:
    return os.lstat(m / rel).st_ino


def test_st_ino_stable_across_copy_up(make_pair):
    pair = make_pair(lowers=[{"f": File("x"), "d/c": File(), "s": Symlink("f"), "p": Fifo()}])

    def op(m: Path) -> dict[str, bool]:
        rels = ("f", "d", "d/c", "s", "p")
        before = {r: _ino(m, r) for r in rels}
        os.chmod(m / "f", 0o600)  # file copy-up
        (m / "d/new").write_text("n")  # dir copy-up
        os.lchown(m / "s", 5, 5)  # symlink copy-up
        os.chmod(m / "p", 0o600)  # fifo copy-up
        with open(m / "d/c", "a") as f:  # write copy-up
            f.write("more")
        return {r: _ino(m, r) == before[r] for r in rels}

    assert pair.same(op) == {r: True for r in ("f", "d", "d/c", "s", "p")}
    pair.check_all()


def test_st_ino_stable_across_rename_of_lower_file(make_pair):
    pair = make_pair(lowers=[{"a": File("x"), "dir/b": File("y")}])

    def op(m: Path) -> tuple[bool, bool]:
        a, b = _ino(m, "a"), _ino(m, "dir/b")
        os.rename(m / "a", m / "a2")
        os.rename(m / "dir/b", m / "b2")
        return _ino(m, "a2") == a, _ino(m, "b2") == b

    assert pair.same(op) == (True, True)
    pair.check_all()


def test_st_dev_same_for_every_object(make_pair):
    pair = make_pair(upper={"u/f": File()},
                     lowers=[{"a": File(), "d/x": Symlink("a"), "p": Fifo()},
                             {"d/y": File(), "deep/er/z": File()}])

    def op(m: Path) -> int:
        devs = {os.lstat(m).st_dev}
        for dirpath, dirnames, filenames in os.walk(m):
            for n in dirnames + filenames:
                devs.add(os.lstat(os.path.join(dirpath, n)).st_dev)
        return len(devs)

    assert pair.same(op) == 1


def test_hard_link_shares_ino_and_nlink(make_pair):
    pair = make_pair(upper={"u": File("u")}, lowers=[{"l": File("l")}])

    def op(m: Path) -> list[tuple[bool, int, int]]:
        out = []
        for src in ("u", "l"):
            os.link(m / src, m / f"{src}-link")
            a, b = os.lstat(m / src), os.lstat(m / f"{src}-link")
            out.append((a.st_ino == b.st_ino, a.st_nlink, b.st_nlink))
        return out

    assert pair.same(op) == [(True, 2, 2), (True, 2, 2)]
    with open(pair.o.root / "l-link", "a") as f:
        f.write("!")
    assert (pair.o.root / "l").read_text() == "l!"  # one inode: a write via one name shows in both
    with open(pair.k.root / "l-link", "a") as f:
        f.write("!")
    pair.check_all()


def test_st_ino_unique_within_mount(make_pair):
    # lower files were made in different dirs of one fs; two different objects must never share an
    # inode number (tools such as du, tar and cp -a treat equal (st_dev, st_ino) as hard links)
    lowers = [{f"d/l{i}_{j}": File(str(j)) for j in range(30)} for i in range(3)]
    pair = make_pair(upper={f"d/u{j}": File() for j in range(30)}, lowers=lowers)

    def op(m: Path) -> tuple[int, int]:
        inos = [os.lstat(m / "d" / n).st_ino for n in os.listdir(m / "d")]
        return len(inos), len(set(inos))

    assert pair.same(op) == (120, 120)


def test_st_ino_unique_with_lowers_on_other_filesystems(make_stack, mounter, tmpfs):
    # Pitfall: lowers on different filesystems have overlapping inode numbers (two fresh tmpfs
    # instances). Every distinct object must still have a distinct (st_dev, st_ino), one st_dev.
    # (The kernel with xino=off uses per-layer pseudo st_devs for non-dirs, which a FUSE mount
    # cannot do, so only the uniqueness premise is checked on the kernel.)
    t1, t2 = tmpfs(), tmpfs()
    for t, tag in ((t1, "a"), (t2, "b")):
        for j in range(20):
            (t / f"{tag}{j}").write_text(tag)
        (t / "sub").mkdir()
        (t / "sub" / f"{tag}file").write_text(tag)
    results = {}
    for impl in ("kernel", IMPL):
        paths = make_stack(lowers=[{}, {}])
        paths.lowers[:] = [t1, t2]
        m = mounter(paths, impl)
        seen = {}
        for dirpath, dirnames, filenames in os.walk(m.root):
            for n in dirnames + filenames:
                st = os.lstat(os.path.join(dirpath, n))
                seen[os.path.relpath(os.path.join(dirpath, n), m.root)] = (st.st_dev, st.st_ino)
        m.stop()
        results[impl] = seen
    for impl, seen in results.items():
        assert len(seen) == 43, impl
        assert len(set(seen.values())) == len(seen), f"{impl}: two objects share (st_dev, st_ino)"
    if IMPL != "kernel":  # a FUSE mount has one st_dev for everything (pitfall 15.6)
        assert len({dev for dev, _ in results[IMPL].values()}) == 1


def test_st_ino_stable_within_mount_across_forget(make_stack, mounter):
    # overlayfs reports the real inode of the topmost object (the lower one after copy-up), so its
    # numbers even survive a remount.  Ours are our own (docs/differences.md, "st_ino"): they must
    # at least survive copy-up and the kernel forgetting every inode (drop_caches) within a mount.
    paths = make_stack(lowers=[{"f": File("x"), "d/g": File("y"), "s": Symlink("f")}],
                       upper={"u": File()})
    m = mounter(paths, IMPL)
    names = ("f", "d", "d/g", "s", "u")
    first = {r: os.lstat(m.root / r).st_ino for r in names}
    os.chmod(m.root / "f", 0o600)  # copy-up
    Path("/proc/sys/vm/drop_caches").write_text("2\n")  # the kernel sends FORGET for all of them
    (m.root / "zz-new").write_text("new")
    second = {r: os.lstat(m.root / r).st_ino for r in reversed(names)}
    m.stop()
    assert first == second


def test_merged_dir_nlink(make_pair):
    # merged dirs report st_nlink 1 (count unknown: `find` must not use the leaf optimisation);
    # pure upper and pure lower dirs report the real count
    pair = make_pair(upper={"m/s1": Dir(), "up/a": Dir(), "up/b": Dir()},
                     lowers=[{"m/s2": Dir(), "low/a": Dir(), "low/b": Dir(), "low/c": Dir()}])

    def op(m: Path) -> dict[str, int]:
        return {r: os.lstat(m / r).st_nlink for r in ("m", "up", "low", "low/a")}

    assert pair.same(op) == {"m": 1, "up": 4, "low": 5, "low/a": 2}


def test_find_sees_every_dir_in_merged_tree(make_pair):
    # what nlink-based leaf optimisation would break
    pair = make_pair(upper={"t/u1/x": File()},
                     lowers=[{"t/l1/y": File(), "t/l2/z": File()}, {"t/l3/w": File()}])

    def op(m: Path) -> list[str]:
        out = []
        for dirpath, dirnames, filenames in os.walk(m / "t"):
            out += [os.path.relpath(os.path.join(dirpath, n), m) for n in dirnames + filenames]
        return sorted(out)

    assert len(pair.same(op)) == 8


def test_explicit_times_round_trip(make_pair):
    pair = make_pair(upper={"u": File()}, lowers=[{"l": File(), "d": Dir(), "s": Symlink("l")}])

    def op(m: Path) -> list[tuple[int, int]]:
        out = []
        for rel in ("u", "l", "d"):
            os.utime(m / rel, ns=(1_234_567_890_123_456_789, 1_111_111_111_987_654_321))
            st = os.stat(m / rel)
            out.append((st.st_atime_ns, st.st_mtime_ns))
        os.utime(m / "s", ns=(5_000_000_000, 6_000_000_000), follow_symlinks=False)
        st = os.lstat(m / "s")
        out.append((st.st_atime_ns, st.st_mtime_ns))
        return out

    assert pair.same(op)[0] == (1_234_567_890_123_456_789, 1_111_111_111_987_654_321)
    pair.check_all(mtimes=True)


def test_write_updates_mtime_and_size(make_pair):
    pair = make_pair(lowers=[{"f": File("abc", mtime=1_000_000_000)}],
                     upper={"u": File("u", mtime=1_000_000_000)})

    def op(m: Path) -> list[tuple[bool, bool, int]]:
        out = []
        for rel in ("f", "u"):
            c0 = os.stat(m / rel).st_ctime_ns
            with open(m / rel, "ab") as f:
                f.write(b"12345")
            st = os.stat(m / rel)
            out.append((st.st_mtime > 1_000_000_000, st.st_ctime_ns >= c0, st.st_size))
        return out

    assert pair.same(op) == [(True, True, 8), (True, True, 6)]
    pair.check_all()


def test_create_in_lower_dir_updates_dir_mtime(make_pair):
    pair = make_pair(lowers=[{"d": Dir(mtime=1_000_000_000), "d/x": File()}])

    def op(m: Path) -> tuple[bool, bool]:
        (m / "d/new").write_text("n")
        after_create = os.stat(m / "d").st_mtime > 1_000_000_000
        os.utime(m / "d", (1_000_000_000, 1_000_000_000))
        os.unlink(m / "d/x")
        return after_create, os.stat(m / "d").st_mtime > 1_000_000_000

    assert pair.same(op) == (True, True)
    pair.check_all()


def test_chmod_ctime_and_mode_of_each_kind(make_pair):
    pair = make_pair(upper={"ud": Dir()}, lowers=[{"f": File(), "d": Dir(mode=0o700), "p": Fifo()}])

    def op(m: Path) -> list[str]:
        out = []
        for rel, mode in (("f", 0o4711), ("d", 0o1777), ("p", 0o600), ("ud", 0o2750)):
            os.chmod(m / rel, mode)
            out.append(oct(stat.S_IMODE(os.lstat(m / rel).st_mode)))
        return out

    assert pair.same(op) == ["0o4711", "0o1777", "0o600", "0o2750"]
    pair.check_all()


def test_statfs_comes_from_upper(make_pair):
    pair = make_pair(lowers=[{"f": File()}])

    def op(m: Path) -> tuple[bool, bool, bool]:
        a, b = os.statvfs(m), os.statvfs(m.parent / "upper")
        return (a.f_namemax == b.f_namemax, a.f_bsize == b.f_bsize,
                a.f_blocks * a.f_frsize == b.f_blocks * b.f_frsize)

    assert pair.same(op) == (True, True, True)
    assert pair.same(lambda m: os.statvfs(m).f_namemax) == 255


def test_snapshot_of_lower_hardlinks_after_partial_copy_up(make_pair):
    # rule 15.10: never a shared st_ino with different content
    pair = make_pair(lowers=[{"a": File("same"), "b": Hardlink("a"), "c": Hardlink("a")}])
    pair.same(lambda m: os.chmod(m / "b", 0o600), expect="ok")
    snap = pair.assert_same_tree()
    for group in snap.links:
        digests = {snap.nodes[p].digest for p in group}
        modes = {snap.nodes[p].mode for p in group}
        assert len(digests) == 1 and len(modes) == 1, f"hard-link group {group} is inconsistent"
    merged = snapshot_merged(pair.o.root)
    assert merged.nodes["b"].nlink == 1
    pair.check_all()


def test_lower_hardlink_copy_up_with_several_names_seen(make_pair):
    # The kernel without index keeps one inode per name of a lower hard link: a change through
    # one name copies up that name alone, whatever names were looked up before.  FUSE names only
    # the node on open/chmod, so each name is a node of its own (EntryAttributes.nodeid); ours
    # linked the copy into every name the kernel had seen, once.
    pair = make_pair(lowers=[{"a": File("same"), "sub/b": Hardlink("a"), "c": Hardlink("a"),
                              "d": File("d")}])

    def numbers(m: Path) -> tuple[object, ...]:
        st = {n: os.lstat(m / n) for n in ("a", "sub/b", "c")}
        return (st["a"].st_ino == st["sub/b"].st_ino == st["c"].st_ino,
                tuple(s.st_nlink for s in st.values()))

    assert pair.same(numbers) == (True, (3, 3, 3))  # every name known to the kernel
    pair.same(lambda m: os.chmod(m / "sub/b", 0o600), expect="ok")
    pair.same(lambda m: open(m / "sub/b", "a").write("+"), expect="ok")

    def after(m: Path) -> tuple[object, ...]:
        a, b, c = (os.lstat(m / n) for n in ("a", "sub/b", "c"))
        return (a.st_ino == c.st_ino, a.st_ino != b.st_ino, (a.st_nlink, b.st_nlink, c.st_nlink),
                b.st_mode & 0o777, a.st_mode & 0o777,
                [(m / n).read_text() for n in ("a", "sub/b", "c")])

    assert pair.same(after) == (True, True, (3, 1, 3), 0o600, 0o644, ["same", "same+", "same"])
    # the other names break away in turn, each its own copy
    pair.same(lambda m: os.utime(m / "c", ns=(10**9, 10**9)), expect="ok")
    pair.same(lambda m: open(m / "a", "w").write("new a"), expect="ok")
    pair.same(after)
    # a new link to one of them shares that copy, and the rest stay apart
    pair.same(lambda m: os.link(m / "a", m / "a2"), expect="ok")
    pair.same(lambda m: (os.lstat(m / "a2").st_ino == os.lstat(m / "a").st_ino,
                         os.lstat(m / "a").st_nlink, (m / "a2").read_text()))
    pair.check_all()


def test_rename_between_names_of_a_lower_hard_link(make_pair):
    # Two nodes for the two names, as the kernel's two overlay inodes: rename(a, b) removes a
    # (ours did nothing, the kernel's VFS seeing one inode on both sides, when they shared one).
    pair = make_pair(lowers=[{"a": File("same"), "b": Hardlink("a"), "c": Hardlink("a")}])
    pair.same(lambda m: [os.lstat(m / n).st_nlink for n in ("a", "b", "c")], expect="ok")
    pair.same(lambda m: os.rename(m / "a", m / "b"), expect="ok")
    assert pair.same(ls_op()) == ["b", "c"]
    pair.same(lambda m: ((m / "b").read_text(), os.lstat(m / "b").st_nlink,
                         os.lstat(m / "c").st_nlink), expect="ok")
    pair.check_all()
