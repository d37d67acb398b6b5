"""Logging set-up for the daemon: stderr in the foreground, a file or syslog behind."""

from __future__ import annotations

import faulthandler
import logging
import logging.handlers
import os
import signal
import sys
from typing import TextIO

_fault_file: TextIO | None = None


def setup(debug: bool, logfile: str | None, foreground: bool) -> None:
    global _fault_file
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    handler: logging.Handler
    if logfile:
        handler = logging.FileHandler(logfile)
        _fault_file = open(logfile, "a")  # noqa: SIM115 - lives as long as the daemon
    elif foreground:
        handler = logging.StreamHandler(sys.stderr)
        _fault_file = sys.stderr
    elif os.path.exists("/dev/log"):
        handler = logging.handlers.SysLogHandler("/dev/log")
    else:
        handler = logging.NullHandler()
    handler.setFormatter(logging.Formatter(
        "%(asctime)s pyunionfs[%(process)d] %(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    if not debug:
        logging.disable(logging.DEBUG)
    if _fault_file is not None:
        # kill -USR1 <pid> dumps every thread's stack: the way to see a hang.
        faulthandler.register(signal.SIGUSR1, file=_fault_file, all_threads=True)
