"""The stress suite's profile: bounded inside `make test`, long under `make stress`.

`make stress` sets PYUNIONFS_STRESS=long and PYUNIONFS_STRESS_MINUTES (default 10): each
stress test then scales its tries, ops and seconds by ``budget()``.  Without it every test
runs its short form, so that the suite still guards against regressions in `make test`.
"""

from __future__ import annotations

import pytest
from views import LONG, MINUTES


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # Long runs outlast the per-test timeout of `make test`; their own limit is the budget.
    if LONG:
        for item in items:
            if "/stress/" in item.nodeid or item.nodeid.startswith("stress/"):
                item.add_marker(pytest.mark.timeout(max(600, MINUTES * 60)))
