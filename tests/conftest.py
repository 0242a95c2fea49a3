"""Shared fixtures: the real data in ../shared/data (skipped with a reason when absent)."""

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = (REPO / ".." / "shared" / "data").resolve()


def shared_path(*parts: str) -> Path:
    """A path under ../shared/data, or skip the test when it is not there."""
    p = SHARED_DATA.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"real fixture not available: {p} (../shared/data is absent on this machine)")
    return p


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real public data staged next to the repository (``../shared/data``; skips when absent)."""
    return shared_path()
