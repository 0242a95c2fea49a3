"""The Dagster UI of `make dev`, in a real browser, over a materialized sample region.

The sample region is built up to ``shards`` by ``dg launch`` into a temporary data root (SQLite instance as
`make demo` writes it), `make dev` serves it on a free port of 127.0.0.1, and headless Chromium checks what a
user sees: the asset graph, the figures in the metadata of ``shards`` and ``pairs`` (read back from the files
they describe), the preview image and the plots, and the checks of ``shards``. Screenshots: test-artifacts/ui/.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("make") is None or shutil.which("setsid") is None,
                       reason="needs make and setsid (util-linux)"),
]

REPO = Path(__file__).resolve().parents[2]
REGION = "sample-pontoise"
WAIT_S = 180  # the first page waits for the code location to load (seconds on two busy cores)
IN_PROCESS = '{"execution": {"config": {"in_process": {}}}}'


@pytest.fixture(scope="module")
def ui(tmp_path_factory, dev_server):
    """``make dev`` over a data root holding the sample region built up to ``shards``."""
    root = tmp_path_factory.mktemp("ui_data")
    env = {k: v for k, v in os.environ.items() if k != "GAIR_REGIONS"} | {
        "GAIR_DATA_ROOT": str(root), "DAGSTER_HOME": str(root / "dagster_home")}
    bindir = Path(sys.executable).parent
    # The instance `make demo` / `make dev` use (SQLite under the data root), then the region's main job.
    subprocess.run([sys.executable, "-c", "from pathlib import Path; from pipelines.demo import prepare_dagster_home; "
                    f"prepare_dagster_home(Path({str(root)!r}))"], cwd=REPO, env=env, check=True, timeout=120)
    proc = subprocess.run([str(bindir / "dg"), "launch", "--job", "build_dataset", "--partition", REGION,
                           "--config-json", IN_PROCESS], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    server = dev_server(root)
    server.start()
    yield {"url": server.url, "root": root}
    out = server.stop()
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.fixture(scope="module")
def page(chromium, ui):
    """The browser on the UI, with Dagster's one-time "join the community" dialog marked as seen."""
    chromium.get(ui["url"] + "/server_info")
    chromium.execute_script("window.localStorage.setItem('communityNux', '\"1\"')")
    return chromium


def _open(page, url: str, ready_xpath: str, artifacts: Path):
    """Load ``url`` and wait for ``ready_xpath`` to show (a screenshot of the page when it never does)."""
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    page.get(url)
    try:
        return WebDriverWait(page, WAIT_S).until(ec.visibility_of_element_located(("xpath", ready_xpath)))
    except TimeoutException:
        page.save_screenshot(str(artifacts / "failed_page.png"))
        raise


def _metadata_value(page, key: str) -> str:
    """The value cell of one row of an asset's metadata table, as shown."""
    cell = page.find_element("xpath", f"//tr[td[1][normalize-space()='{key}']]/td[last()]")
    assert cell.is_displayed(), key
    return " ".join(cell.text.split())


def _shown_markdown_images(page, key: str) -> list[dict]:
    """Open a markdown metadata entry ([Show Markdown]) and return its rendered images (natural size, shown)."""
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    link = page.find_element("xpath", f"//tr[td[1][normalize-space()='{key}']]//a[normalize-space()='[Show Markdown]']")
    page.execute_script("arguments[0].scrollIntoView({block: 'center'})", link)
    link.click()
    WebDriverWait(page, 30).until(ec.visibility_of_element_located(
        ("css selector", ".bp5-dialog img[src^='data:image/png;base64,']")))
    WebDriverWait(page, 30).until(lambda p: p.execute_script(
        "return [...document.querySelectorAll(\".bp5-dialog img[src^='data:image/png;base64,']\")]"
        ".every(i => i.complete);"))
    imgs = page.find_elements("css selector", ".bp5-dialog img[src^='data:image/png;base64,']")
    # Decoded (complete, non-zero natural size) and laid out on the page (a non-zero box), not just present.
    return [page.execute_script(
        "const i = arguments[0], r = i.getBoundingClientRect();"
        "return {complete: i.complete, natural: [i.naturalWidth, i.naturalHeight], box: [r.width, r.height]};",
        img) | {"displayed": img.is_displayed()} for img in imgs]


def _close_dialog(page) -> None:
    from selenium.webdriver.support.ui import WebDriverWait

    button = page.find_element("xpath", "//div[contains(@class, 'bp5-dialog')]//button[normalize-space()='Close']")
    page.execute_script("arguments[0].scrollIntoView({block: 'center'})", button)
    button.click()
    WebDriverWait(page, 10).until(lambda p: not p.find_elements("css selector", ".bp5-dialog"))


def _assert_images_visible(images: list[dict]) -> None:
    assert images
    for img in images:
        assert img["displayed"] and img["complete"], img
        assert min(img["natural"]) > 50 and min(img["box"]) > 50, img


def test_asset_graph_shows_the_region_assets(page, ui, artifacts):
    url = ui["url"] + "/assets/shards?view=lineage&lineageScope=upstream&lineageDepth=4"
    _open(page, url, "//*[normalize-space()='stac_items']", artifacts)
    for name in ("stac_items", "tile_grid", "sv_points", "pairs", "shards"):
        nodes = page.find_elements("xpath", f"//*[normalize-space()='{name}' and not(*)]")
        assert any(n.is_displayed() for n in nodes), f"asset node {name} not shown"
    page.save_screenshot(str(artifacts / "asset_graph.png"))
    print(f"screenshots: {artifacts}")


def test_shards_metadata_counts_and_preview(page, ui, artifacts):
    manifest = pd.read_parquet(ui["root"] / "shards" / REGION / "manifest.parquet")
    n_shards = len(list((ui["root"] / "shards" / REGION).glob("*.tar")))
    _open(page, ui["url"] + "/assets/shards", "//tr[td[1][normalize-space()='num_samples']]", artifacts)
    assert _metadata_value(page, "num_samples") == str(len(manifest))
    assert _metadata_value(page, "num_shards") == str(n_shards)
    assert _metadata_value(page, "num_rejected") == "0"
    page.save_screenshot(str(artifacts / "shards_overview.png"))
    images = _shown_markdown_images(page, "preview")
    _assert_images_visible(images)
    page.save_screenshot(str(artifacts / "shards_preview.png"))
    _close_dialog(page)


def test_pairs_metadata_counts_and_plot(page, ui, artifacts):
    pairs = pd.read_parquet(ui["root"] / "pairs" / REGION / "pairs.parquet", columns=["sv_id", "tile_id"])
    _open(page, ui["url"] + "/assets/pairs", "//tr[td[1][normalize-space()='num_pairs']]", artifacts)
    assert _metadata_value(page, "num_pairs") == str(len(pairs))
    assert _metadata_value(page, "tiles_with_points") == str(pairs.tile_id.nunique())
    assert _metadata_value(page, "num_outside_every_tile") == "10"  # the sample's planted outliers
    images = _shown_markdown_images(page, "offsets")
    _assert_images_visible(images)
    page.save_screenshot(str(artifacts / "pairs_offsets_plot.png"))
    _close_dialog(page)


def test_shards_checks_passed(page, ui, artifacts):
    n_samples = len(pd.read_parquet(ui["root"] / "shards" / REGION / "manifest.parquet", columns=["key"]))
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    _open(page, ui["url"] + "/assets/shards?view=checks", "//*[normalize-space()='Execution history']", artifacts)
    expected = [f"{c} Succeeded" for c in ("manifest_matches_samples", "shards_readable_and_complete")]
    expected += ["Evaluation result Passed", f"manifest_rows {n_samples}", f"stats_samples {n_samples}"]

    def body_text(p) -> str:
        return " ".join(p.find_element("tag name", "body").text.split())

    try:  # the check's result and metadata may arrive in a later answer than the page's header
        WebDriverWait(page, 30).until(lambda p: all(e in body_text(p) for e in expected))
    except TimeoutException:
        pass  # the assertions below say what is missing
    text = body_text(page)
    for check in ("manifest_matches_samples", "shards_readable_and_complete"):
        assert f"{check} Succeeded" in text, text[:2000]
    # The first check is open on the right: its result and its metadata, counted from the written files.
    assert "Evaluation result Passed" in text
    assert f"manifest_rows {n_samples}" in text and f"stats_samples {n_samples}" in text
    page.save_screenshot(str(artifacts / "shards_checks.png"))
