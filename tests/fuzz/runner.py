"""One target under atheris: ``python -m tests.fuzz.runner TARGET CORPUS [libFuzzer flags]``
(scripts/fuzz.py runs this per target and reads libFuzzer's statistics).

The seeds are written into the corpus directory first; the code under test is imported
inside atheris's instrumentation (pyunionfs and the stdlib parsers it hands bytes to),
so coverage guides the search into them."""

from __future__ import annotations

import hashlib
import importlib
import os
import sys

# the stdlib modules our parsers hand untrusted bytes to, instrumented with ours
INSTRUMENTED = ["unionfs", "tarfile", "gzip", "json", "re"]


def write_seeds(target: str, corpus: str, seeds: list[bytes]) -> None:
    os.makedirs(corpus, exist_ok=True)
    for seed in seeds:
        path = os.path.join(corpus, "seed-" + hashlib.sha1(seed).hexdigest()[:16])
        if not os.path.exists(path):
            with open(path, "wb") as f:
                f.write(seed)


def main(argv: list[str]) -> None:
    atheris = importlib.import_module("atheris")  # untyped; absent where not installed
    target, corpus, flags = argv[1], argv[2], argv[3:]
    package = __package__ or "tests.fuzz"
    with atheris.instrument_imports(include=INSTRUMENTED):
        module = importlib.import_module(f"{package}.{target}")
    write_seeds(target, corpus, module.seeds())
    atheris.Setup([argv[0], *flags, corpus], module.one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
