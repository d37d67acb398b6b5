"""Fuzz targets for what parses untrusted bytes (issue 25, item 5).

Each module here is one target: ``one_input(data: bytes)`` runs one input and raises only
for a finding (an error other than the clean one-line kind the CLI reports, a write
outside the input's own directory, a broken invariant); ``seeds()`` gives the small valid
inputs the fuzzer starts from.  ``runner`` drives one target under atheris;
``scripts/fuzz.py`` runs them all; ``tests/test_fuzz_targets.py`` runs the seeds through
``one_input`` under plain pytest so that the targets can't rot.

Imports inside the package are relative: pytest imports it as ``fuzz`` (tests/ on the
path), the runner as ``tests.fuzz``.
"""

from __future__ import annotations

TARGETS = ("options", "layer_tar", "image", "redirect", "origin_xattr", "acl_xattr",
           "nlink_xattr", "xattr_names", "index_entry")
