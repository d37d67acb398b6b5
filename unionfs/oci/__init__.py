"""Container images: layer tars in and out of overlay layer directories, image archives, a
shared layer store (docs/images.md).  A second subsystem beside the filesystem: it never
imports pyfuse3, and it writes whiteouts and opaque marks through the filesystem's own
``whiteout.Dialect``."""
