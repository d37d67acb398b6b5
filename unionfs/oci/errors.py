"""The one exception of the image code, below every module of it."""

from __future__ import annotations


class LayerError(Exception):
    """A layer that can't be applied or exported, in one line naming the problem."""
