"""The command's entry point (``pyunionfs``, ``python -m unionfs``): the warm mount server
first where it saves anything, ``umount`` without the cold path's imports, everything else
(and the fallback) in cli.py."""

from __future__ import annotations

import os
import sys

from unionfs import client

TYPE_CHECKING = False  # not typing's: it costs an interpreter start a third more
if TYPE_CHECKING:
    from typing import NoReturn


def _cold_words(opts: str) -> bool:
    """-o words a cold start must handle: a remount, libfuse's debug output."""
    return any(w in ("remount", "debug") for w in opts.split(","))


def _warm_candidate(argv: list[str]) -> bool:
    """A mount that daemonizes: the only command where the server saves anything.  In the
    foreground, debugging to the terminal or asking for help the command needs the terminal
    as it is."""
    if not argv or argv[0] in ("umount", "stats", "layer", "diff", "image"):
        return False
    rest = argv[1:] if argv[0] == "mount" else argv
    value = debug = logged = False
    for a in rest:
        if value:
            value = False
            if _cold_words(a):
                return False
        elif a in ("-o", "--log"):
            value, logged = True, logged or a == "--log"
        elif a.startswith("-o"):
            if _cold_words(a[2:]):
                return False
        elif a.startswith("--log="):
            logged = True
        elif a in ("-d", "--debug"):
            debug = True
        elif a.startswith("-") and a != "--":
            return False  # -f, --foreground, --debug-fuse, -h, --help, --version, -fd ...
    return logged or not debug


def _quick_exit(rc: int) -> NoReturn:
    """Done: without the interpreter's teardown (a tenth of a warm mount's time)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)


def main(argv: list[str] | None = None) -> int:
    client.mark("command")
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "umount" and len(argv) in (2, 3) \
            and all(a in ("-z", "--lazy") for a in argv[1:-1]) and not argv[-1].startswith("-"):
        _quick_exit(client.umount(argv[-1], len(argv) == 3))
    absent = False
    if client.enabled() and _warm_candidate(argv):
        try:
            rc, _ = client.request(argv, os.environ)
            _quick_exit(rc)
        except (FileNotFoundError, ConnectionRefusedError):
            absent = True  # none yet, or a stale socket: start one for the next mount
        except (OSError, client.Refused, client.Unsafe):
            pass  # not for us: a cold start, as if there were no server
        except RuntimeError as e:
            print(f"pyunionfs: error: {e}", file=sys.stderr)
            return 1
    if sys.flags.no_site:  # our launcher's -S: the cold path needs site-packages
        import site

        site.main()
    from unionfs.cli import main as cold_main

    client.mark("cli imported")
    rc = cold_main(argv)
    if absent and rc == 0:
        client.spawn_server(os.environ)
    return rc
