#!/usr/bin/env python3
"""Write pyunionfs(1), generated from the command line's own argparse definitions (so that
the man page can't drift from ``--help``) and from the option table of docs/options.md (so that
the man page and the option reference are one text).

    scripts/manpage.py OUT.1
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from unionfs import __version__  # noqa: E402

OPTIONS_MD = Path(__file__).resolve().parent.parent / "docs" / "options.md"
from unionfs.cli import PROG, build_parser  # noqa: E402


def _esc(text: str) -> str:
    text = text.replace("\\", "\\e").replace("-", "\\-")
    return "\n".join(("\\&" + line) if line.startswith((".", "'")) else line
                     for line in text.splitlines())


def _options(p: argparse.ArgumentParser) -> list[str]:
    out = []
    for a in p._actions:
        if isinstance(a, (argparse._HelpAction, argparse._SubParsersAction)) or \
                a.help == argparse.SUPPRESS:
            continue
        if a.option_strings:
            flags = ", ".join(f"\\fB{_esc(o)}\\fR" for o in a.option_strings)
            if a.metavar or (a.nargs != 0 and not isinstance(a, argparse._StoreTrueAction)):
                flags += f" \\fI{_esc(str(a.metavar or a.dest.upper()))}\\fR"
        else:
            flags = f"\\fI{_esc(str(a.metavar or a.dest))}\\fR"
        out += [".TP", flags, _esc(a.help or "")]
    return out


def _commands(p: argparse.ArgumentParser, prefix: str) -> list[str]:
    out: list[str] = []
    for a in p._actions:
        if not isinstance(a, argparse._SubParsersAction):
            continue
        for name, sub in a.choices.items():
            full = f"{prefix} {name}"
            nested = any(isinstance(x, argparse._SubParsersAction) for x in sub._actions)
            if not nested:
                usage = sub.format_usage().replace("usage: ", "").strip()
                out += [".SS", _esc(full), ".nf", _esc(usage), ".fi", ".PP",
                        _esc(sub.description or "")]
                out += _options(sub)
            out += _commands(sub, full)
    return out


def option_rows(md: str) -> list[tuple[str, str]]:
    """(option, meaning) of each row of the first table in docs/options.md."""
    rows = []
    for line in md.splitlines():
        if not line.startswith("| ") or line.startswith("|---"):
            if rows:
                break
            continue
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip().strip("|"))]
        if len(cells) == 2 and cells[0] != "argument / option":
            rows.append((cells[0].replace("\\|", "|"), cells[1].replace("\\|", "|")))
    return rows


def _plain(md: str) -> str:
    """Markdown inline markup as man page text: code and emphasis marks and link targets go."""
    md = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", md)
    return md.replace("**", "").replace("`", "")


def render() -> str:
    p = build_parser()
    date = time.strftime("%Y-%m-%d", time.gmtime())
    lines = [f'.TH PYUNIONFS 1 "{date}" "{PROG} {__version__}" "User Commands"',
             ".SH NAME", f"{PROG} \\- {_esc(p.description or '')}",
             ".SH SYNOPSIS", ".nf"]
    for a in p._actions:
        if isinstance(a, argparse._SubParsersAction):
            for name in a.choices:
                lines.append(f"\\fB{PROG} {name}\\fR ...")
    lines += [f"\\fB{PROG}\\fR \\-o lowerdir=...[,upperdir=...,workdir=...] MOUNTPOINT", ".fi",
              ".SH DESCRIPTION",
              _esc("Mount an ordered list of read-only lower directories (leftmost on top) with "
                   "one writable upper directory, as Linux kernel overlayfs does, byte for byte "
                   "on disk; turn container image layer tars into overlay layers and back. The "
                   "second synopsis form is the one podman and buildah use as a mount_program, "
                   "and mount(8) as a FUSE helper."),
              ".SH COMMANDS"]
    lines += _commands(p, PROG)
    lines += [".SH OPTIONS", _esc("The arguments and -o words of the mount forms (docs/options.md).")]
    for opt, meaning in option_rows(OPTIONS_MD.read_text()):
        lines += [".TP", f"\\fB{_esc(_plain(opt))}\\fR", _esc(_plain(meaning))]
    lines += [".SH FILES", ".TP", "\\fI$XDG_DATA_HOME/pyunionfs\\fR",
              "The layer store of the image commands (default ~/.local/share/pyunionfs).",
              ".SH SEE ALSO", "\\fBmount\\fR(8), \\fBfusermount3\\fR(1), \\fBpodman\\fR(1)"]
    return "\n".join(lines) + "\n"


def main() -> int:
    if len(sys.argv) != 2:
        print(__doc__.strip().splitlines()[-1], file=sys.stderr)
        return 2
    out = Path(sys.argv[1])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render())
    return 0


if __name__ == "__main__":
    sys.exit(main())
