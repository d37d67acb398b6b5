"""Errors shared by every layer of pyunionfs (stdlib only)."""

from __future__ import annotations

import errno
import os


class MountError(Exception):
    """A mount that can't go ahead; the message is one line for the user."""

    def __init__(self, message: str, code: int = errno.EINVAL) -> None:
        super().__init__(message)
        self.errno = code


def oserror(code: int, name: str | None = None) -> OSError:
    return OSError(code, os.strerror(code), name)
