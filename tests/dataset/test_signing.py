"""Every ``gair_dataset`` module that logs goes through the redacting filter (signed URLs never reach a log)."""

import importlib
import logging
import re
from pathlib import Path

import gair_dataset.chips  # noqa: F401 - installs the filter, as any chip read does
from gair_dataset.signing import RedactingFilter

PACKAGE = Path(__file__).resolve().parents[2] / "gair_dataset"


def _logging_modules() -> list[str]:
    names = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if re.search(r"getLogger\(__name__\)", path.read_text()):
            names.append(".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts))
    return names


def test_every_module_logger_redacts_signed_urls(caplog):
    modules = _logging_modules()
    assert "gair_dataset.chips" in modules and len(modules) >= 8
    for name in modules:
        importlib.import_module(name)
        logger = logging.getLogger(name)
        assert any(isinstance(f, RedactingFilter) for f in logger.filters), f"{name} logs unredacted"
    logger = logging.getLogger("gair_dataset.samples")
    with caplog.at_level(logging.INFO, logger="gair_dataset.samples"):
        logger.info("reading %s", "https://acct.blob.core.windows.net/c/x.tif?st=1&se=2&sig=SECRET")
    assert "SECRET" not in caplog.text and "x.tif" in caplog.text
