"""Shared fixtures: the real data in ../shared/data (skipped with a reason when absent)."""

import shutil
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


# Disk: a full run writes ~9 GB of regions, shards and checkpoints (module fixtures share them between tests).
# Passing tests' own tmp_path folders go at once (tmp_path_retention_policy = "failed" in pyproject.toml); what a
# module made with tmp_path_factory goes when the module ends with no failure, so the suite's peak stays near its
# largest module. A module with a failure keeps everything for inspection.
_module_start: dict[Path, tuple[int, set[str]]] = {}


def _basetemp(item: pytest.Item) -> Path | None:
    factory = getattr(item.config, "_tmp_path_factory", None)
    if factory is None or getattr(factory, "_given_basetemp", None) is not None:
        return None  # --basetemp given: the user asked to keep that folder as it is
    return factory.getbasetemp()


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """Note, at a module's first test, what the temporary base folder already holds."""
    if item.path not in _module_start:
        base = _basetemp(item)
        _module_start[item.path] = (item.session.testsfailed, {p.name for p in base.iterdir()} if base else set())


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> object:
    """After a module's last test (its fixtures finalised), delete the folders it made if nothing failed."""
    result = yield
    if nextitem is not None and nextitem.path == item.path:
        return result
    failed_before, existing = _module_start.pop(item.path, (0, set()))
    base = _basetemp(item)
    if base is not None and item.session.testsfailed == failed_before:
        for p in base.iterdir():
            if p.name not in existing:
                shutil.rmtree(p, ignore_errors=True)
    return result
