"""What a user installing the package gets: a wheel with every module, the typed marker and
the pytest plugin's entry point; ``--help`` with every verb; a man page generated from the same
argparse definitions, installed by ``make install``."""

from __future__ import annotations

import configparser
import os
import subprocess
import sys
import zipfile
from pathlib import Path

from overlay_harness import PYTHON, REPO

VERBS = ["mount", "umount", "layer", "diff", "image"]


def test_help_lists_every_verb():
    out = subprocess.run([PYTHON, "-m", "unionfs", "--help"], capture_output=True, text=True,
                         timeout=60, cwd=REPO).stdout
    for verb in VERBS:
        assert f"    {verb}" in out, (verb, out)
    for verb, words in (("layer", ("apply", "export")), ("image", ("mount", "commit"))):
        r = subprocess.run([PYTHON, "-m", "unionfs", verb, "--help"], capture_output=True,
                           text=True, timeout=60, cwd=REPO)
        assert r.returncode == 0 and all(w in r.stdout for w in words), r.stdout


def test_wheel_holds_the_package(tmp_path):
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps",
                        "-q", "-w", str(tmp_path), str(REPO)], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    (wheel,) = tmp_path.glob("pyunionfs-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        eps = next(n for n in names if n.endswith("entry_points.txt"))
        cfg = configparser.ConfigParser()
        cfg.read_string(z.read(eps).decode())
    modules = {f"unionfs/{p.relative_to(REPO / 'unionfs')}"
               for p in (REPO / "unionfs").rglob("*.py") if "__pycache__" not in p.parts}
    assert modules <= names, sorted(modules - names)
    assert "unionfs/py.typed" in names
    assert cfg["console_scripts"]["pyunionfs"] == "unionfs.command:main"
    assert cfg["pytest11"]["unionfs"] == "unionfs.pytest_plugin"


def test_make_install_puts_the_man_page_and_the_command(tmp_path):
    dest = tmp_path / "stage"
    r = subprocess.run(["make", "-s", "install", f"DESTDIR={dest}", "PREFIX=/usr"], cwd=REPO,
                       capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, PYUNIONFS_NO_APT="1"))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    page = dest / "usr/share/man/man1/pyunionfs.1"
    text = page.read_text()
    for heading in ("pyunionfs mount", "pyunionfs layer apply", "pyunionfs layer export",
                    "pyunionfs image mount", "pyunionfs image commit", "pyunionfs diff"):
        assert f".SS\n{heading}" in text, heading
    link = dest / "usr/bin/pyunionfs"
    assert os.readlink(link) == str(REPO / ".venv/bin/pyunionfs")
    rendered = subprocess.run(["man", "-l", str(page)], capture_output=True, text=True,
                              timeout=60, env=dict(os.environ, MANWIDTH="80"))
    if rendered.returncode == 0:  # man-db present
        assert "layer apply" in rendered.stdout
    assert Path(REPO / "build/man/pyunionfs.1").exists()


def test_every_option_is_in_the_reference_and_the_man_page(tmp_path):
    """docs/options.md is the one text of the option reference: the man page's OPTIONS section
    is built from its table, and every -o word the code takes has a row there."""
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import manpage
    finally:
        sys.path.pop(0)
    from unionfs.config import ATIME_WORDS, OUR_FLAGS, OUR_KEYS

    rows = manpage.option_rows((REPO / "docs/options.md").read_text())
    names = " ".join(opt for opt, _ in rows)
    words = [k for k in OUR_KEYS + OUR_FLAGS if k not in ("lowerdir", "upperdir", "workdir")]
    words += [w for w, flag in ATIME_WORDS.items() if flag is not None and flag[1]]
    missing = [w for w in words if w not in names]
    assert not missing, f"options without a row in docs/options.md: {missing}"
    page = manpage.render()
    for opt, _ in rows:
        assert manpage._esc(manpage._plain(opt)) in page, opt
