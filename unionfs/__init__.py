"""pyunionfs: a userspace union filesystem with Linux kernel overlayfs semantics."""

__version__ = "0.1.0"
