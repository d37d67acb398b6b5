"""Imports point only downward (docs/code-layout.md), checked on the AST."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "unionfs"

# Lower number = lower level; a module may import only modules at a lower level,
# or at its own level where listed in SAME_LEVEL_OK.
LEVELS = {
    "errors": 0, "config": 0, "idmap": 0, "acl": 0, "mounttable": 0, "client": 0,
    "sysio": 1, "stats": 1, "claim": 1,
    "layers": 2, "whiteout": 2, "probe": 2, "origin": 2,
    "lookup": 3, "inodes": 3, "handles": 3, "readdir": 3, "state": 3, "index": 3, "export": 3,
    "copyup": 4, "dirops": 4, "attrs": 4, "xattrs": 4,
    "ops": 5,
    "daemon": 6, "log": 6, "cli": 6, "remount": 6, "__main__": 8,
    "command": 7, "server": 7,  # the entry point and the warm server: above cli and daemon
    "__init__": 8,  # the public API's face: re-exports unionfs.api (lazily)
    "api": 6, "pytest_plugin": 7,
}
SAME_LEVEL_OK = {("probe", "layers"), ("probe", "whiteout"), ("inodes", "lookup"),
                 ("state", "handles"), ("state", "inodes"), ("readdir", "lookup"),
                 ("dirops", "copyup"), ("attrs", "copyup"), ("xattrs", "copyup"),
                 ("handles", "inodes"), ("handles", "readdir"), ("handles", "layers"),
                 ("inodes", "handles"), ("daemon", "log"), ("cli", "daemon"),
                 ("dirops", "probe"), ("config", "errors"),
                 ("xattrs", "attrs"), ("layers", "whiteout"), ("config", "idmap"),
                 ("idmap", "errors"), ("inodes", "readdir"),
                 ("daemon", "remount"), ("cli", "remount"), ("state", "export"),
                 ("client", "mounttable")}
PYFUSE3_OK = {"ops", "daemon"}


def _imports(path: Path) -> set[str]:
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            mod = node.module
            if mod == "unionfs":
                out.update(f"unionfs.{a.name}" for a in node.names)
            else:
                out.add(mod)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return out


def test_every_module_has_a_level() -> None:
    mods = {p.stem for p in PKG.glob("*.py")}
    assert mods <= set(LEVELS), f"give these modules a level: {mods - set(LEVELS)}"


def test_imports_point_downward() -> None:
    bad = []
    for path in PKG.glob("*.py"):
        me = path.stem
        for imp in _imports(path):
            if imp == "pyfuse3" and me not in PYFUSE3_OK:
                bad.append(f"{me} imports pyfuse3 (only {sorted(PYFUSE3_OK)} may)")
            if imp == "trio" and LEVELS[me] < 3:
                bad.append(f"{me} imports trio below level 3")
            if not imp.startswith("unionfs.") or imp == "unionfs":
                continue
            other = imp.split(".")[1]
            if other not in LEVELS:
                continue
            if LEVELS[other] > LEVELS[me] or (
                    LEVELS[other] == LEVELS[me] and other != me
                    and (me, other) not in SAME_LEVEL_OK):
                bad.append(f"{me} (level {LEVELS[me]}) imports {other} (level {LEVELS[other]})")
    assert not bad, "\n".join(bad)


# unionfs/oci (container images) is a second subsystem: it stands on the filesystem's on-disk
# rules (sysio, the whiteout dialect, probe's choice of it; lookup and readdir for the merged
# view of what an upper only points to) and nothing above them.
OCI_MAY_USE = {"errors", "sysio", "whiteout", "probe", "oci", "layers", "lookup", "readdir"}


# Within unionfs/oci, the same rule: imports point only downward.
OCI_LEVELS = {"errors": 0, "merged": 1, "layer": 2, "diff": 3, "image": 3, "cli": 4,
              "__init__": 5}


def test_oci_imports_point_downward() -> None:
    graph = _module_graph()
    oci = {m.rsplit(".", 1)[1]: m for m in graph if m.startswith("unionfs.oci.")}
    assert set(oci) == set(OCI_LEVELS), f"give these modules a level: {set(oci) ^ set(OCI_LEVELS)}"
    bad = [f"oci.{me} imports oci.{other}" for me, mod in oci.items() for dep in graph[mod]
           if dep.startswith("unionfs.oci.")
           for other in [dep.rsplit(".", 1)[1]] if OCI_LEVELS[other] >= OCI_LEVELS[me]]
    assert not bad, "\n".join(bad)


def test_oci_stays_beside_the_filesystem() -> None:
    bad = []
    for path in (PKG / "oci").glob("*.py"):
        for imp in _imports(path):
            if imp.split(".")[0] in ("pyfuse3", "trio"):
                bad.append(f"oci.{path.stem} imports {imp}")
            if imp.startswith("unionfs.") and imp.split(".")[1] not in OCI_MAY_USE:
                bad.append(f"oci.{path.stem} imports {imp}")
    assert not bad, "\n".join(bad)


def _module_graph() -> dict[str, set[str]]:
    """Every module of the package (dotted), and the package modules it imports: at the top,
    inside functions and for type checking alike."""
    root = PKG.parent
    mods = {".".join(p.relative_to(root).with_suffix("").parts): p for p in PKG.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        out: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                for alias in node.names:
                    sub = f"{node.module}.{alias.name}"
                    out.add(sub if sub in mods else node.module)
            elif isinstance(node, ast.Import):
                out.update(a.name for a in node.names)
        graph[name] = {m for m in out if m in mods and m != name
                       and not name.startswith(m + ".")}  # a package's own __init__
    return graph


def test_no_import_circles() -> None:
    """The module graph, unionfs/oci included, has no circle (issue 22): each pair of
    modules that need each other has one direction."""
    graph = _module_graph()
    assert "unionfs.oci.layer" in graph and "unionfs.inodes" in graph, sorted(graph)
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return path[path.index(n):] + [n]
            if n not in state and (found := visit(n)) is not None:
                return found
        path.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state:
            circle = visit(m)
            assert circle is None, "import circle: " + " -> ".join(circle)
