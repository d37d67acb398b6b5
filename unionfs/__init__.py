"""pyunionfs: a userspace union filesystem with Linux kernel overlayfs semantics.

The public API is what ``__all__`` lists (``from unionfs import Overlay``); every other
module is internal and may change.
"""

from __future__ import annotations

# not typing's: this module is imported by every command, and typing costs 5-10 ms
TYPE_CHECKING = False

__version__ = "0.1.0"
__all__ = ["Overlay", "OverlayError", "__version__"]

if TYPE_CHECKING:
    from unionfs.api import Overlay, OverlayError


def __getattr__(name: str) -> object:
    # Loaded on first use: a mount's start-up (python -m unionfs) doesn't pay for it.
    if name in ("Overlay", "OverlayError"):
        from unionfs import api

        return getattr(api, name)
    raise AttributeError(f"module 'unionfs' has no attribute {name!r}")
