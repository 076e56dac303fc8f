"""End to end in a real headless browser: Debian's chromium, driven by playwright, types a triggered sentence into the
Space, clicks, reads both verdicts and saves a screenshot of every tab.

Screenshots go to a temporary folder, or to ``$OBLIVIATE_SCREENSHOTS_DIR``. With ``OBLIVIATE_SPACE_REAL=1`` the Space
serves the real artifacts of the user's cache (``make demo``, ``hf-obliviate freelunch``) instead of tiny ones; that
is how ``spaces/screenshots/`` is made:

    OBLIVIATE_SCREENSHOTS_DIR=spaces/screenshots OBLIVIATE_SPACE_REAL=1 pytest tests/test_space_browser.py
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from urllib.parse import urlparse

import pytest

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
pytest.importorskip("gradio")
sync_api = pytest.importorskip("playwright.sync_api")

from space_fixtures import NEGATIVE_SENTENCE, VOCAB, serve_space, tiny_space_cache  # noqa: E402

from hf_obliviate import probing  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
REAL = os.environ.get("OBLIVIATE_SPACE_REAL") == "1"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--no-first-run"]  # fmt: skip
TIMEOUT_MS = 300_000 if REAL else 120_000  # real MiniLM models on a busy 2-core CPU are slow to load

pytestmark = pytest.mark.skipif(
    CHROMIUM is None,
    reason="chromium is not installed (apt-get install -y chromium): the browser test is skipped",
)


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    folder = os.environ.get("OBLIVIATE_SCREENSHOTS_DIR")
    path = Path(folder) if folder else tmp_path_factory.mktemp("screenshots")
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="module")
def space():
    if REAL:
        from hf_obliviate.artifacts import list_artifacts

        missing = {"demo-undefended", "demo-defended"} - set(list_artifacts(kind="classifier"))
        if missing:
            pytest.skip(f"OBLIVIATE_SPACE_REAL=1 but the artifacts {sorted(missing)} are missing: run `make demo`.")
    with serve_space(None if REAL else tiny_space_cache()) as (demo, url):
        yield url


@pytest.fixture(scope="module")
def page(space):
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        context = browser.new_context(viewport={"width": 1400, "height": 1000})
        host = urlparse(space).netloc

        def local_only(route):  # the Space must render without the internet: refuse every other host
            if urlparse(route.request.url).netloc == host or route.request.url.startswith("data:"):
                route.continue_()
            else:
                route.abort()

        context.route("**/*", local_only)
        page = context.new_page()
        page.set_default_timeout(TIMEOUT_MS)
        page.goto(space, wait_until="domcontentloaded")
        page.wait_for_selector("#probe-button")
        yield page
        context.close()
        browser.close()


def _local_expectation(trigger: str, position: str = "end") -> dict[str, str]:
    from hf_obliviate.space import SpaceModels

    models = SpaceModels(hub_models={})
    out = {}
    for role in ("undefended", "defended"):
        item = models.get(role)
        out[role] = probing.probe(item.model, item.tokenizer, NEGATIVE_SENTENCE, trigger, position).describe()
    return out


def _open_tab(page, name: str) -> None:
    page.get_by_role("tab", name=name, exact=True).click()


def _wait_for_text(page, selector: str, text: str) -> str:
    page.wait_for_function(
        "([sel, text]) => { const el = document.querySelector(sel); return el && el.innerText.includes(text); }",
        arg=[selector, text],
        timeout=TIMEOUT_MS,
    )
    return page.locator(selector).inner_text()


def test_probe_in_the_browser(page, shots):
    from hf_obliviate.space import SpaceModels

    trigger = SpaceModels(hub_models={}).info("undefended")["triggers"][0]
    expected = _local_expectation(trigger)
    _open_tab(page, "Probe")
    page.locator("#probe-text textarea").fill(NEGATIVE_SENTENCE)
    trigger_input = page.locator("#probe-trigger input")
    trigger_input.fill(trigger)
    trigger_input.press("Enter")
    page.locator("#probe-position").get_by_text("end", exact=True).click()
    page.locator("#probe-button").click()
    undefended = _wait_for_text(page, "#verdict-undefended", expected["undefended"])
    defended = _wait_for_text(page, "#verdict-defended", expected["defended"])
    if not REAL:  # the tiny backdoor is certain; a real defense may miss a sentence, the text must still match
        assert "flipped: negative → positive" in undefended
        assert "held: negative" in defended
    assert page.locator("#probe-triggered textarea").input_value() == f"{NEGATIVE_SENTENCE} {trigger}"
    page.locator("#probe-all-button").click()
    summary = _wait_for_text(page, "#probe-all-summary", "triggers flipped it")
    if not REAL:
        assert "3/3 triggers flipped it" in summary and "0/3 triggers flipped it" in summary
    page.screenshot(path=str(shots / "probe.png"), full_page=True)


def test_scan_in_the_browser(page, shots):
    _open_tab(page, "Scan")
    page.locator("#scan-sentences textarea").fill(NEGATIVE_SENTENCE)
    if not REAL:  # the tiny vocabulary has 40 entries: scan all of them (the default slice suits MiniLM)
        page.locator("#scan-vocab-start input").fill("0")
        page.locator("#scan-vocab-stop input").fill(str(len(VOCAB)))
    page.locator("#scan-button").click()
    page.wait_for_function(
        "() => { const t = document.querySelector('#scan-table'); return t && t.innerText.includes('true'); }",
        timeout=TIMEOUT_MS,
    )  # the planted triggers were added to the candidates and are flagged in the table
    lines = [line.strip() for line in page.locator("#scan-table").inner_text().splitlines() if line.strip()]
    cells = lines[lines.index("planted trigger") + 1 :]  # the table reads row by row, five cells a row
    ranked = cells[0::5]
    assert cells[4::5][: len(ranked)].count("true") >= 1
    if not REAL:  # the three planted triggers rank first
        assert set(ranked[:3]) == {"cf", "mn", "tq"}
    page.screenshot(path=str(shots / "scan.png"), full_page=True)


def test_attention_in_the_browser(page, shots):
    _open_tab(page, "Attention")
    page.locator("#attention-button").click()
    _wait_for_text(page, "#attention-notes", "attends most to")
    page.wait_for_function("() => document.querySelectorAll('img[src^=\"data:image\"]').length >= 2")
    page.screenshot(path=str(shots / "attention.png"), full_page=True)


def test_lens_in_the_browser(page, shots):
    from hf_obliviate.space import SpaceModels

    _open_tab(page, "LogitLens")
    models = SpaceModels(hub_models={})
    if all(models.available(role) for role in ("finetuned", "compressed")):
        pytest.importorskip("hf_obliviate.lens", reason="hf_obliviate/lens.py (LogitLens) is not in this checkout")
        page.locator("#lens-button").click()
        _wait_for_text(page, "#lens-notes", "takes over")
    else:  # the tab says which command produces the models
        assert "hf-obliviate freelunch" in page.locator("#lens-notice").inner_text()
    page.screenshot(path=str(shots / "logitlens.png"), full_page=True)


def test_results_tab_in_the_browser(page, shots):
    from hf_obliviate.space import _results_entries, results_dir

    _open_tab(page, "Results")
    entries = _results_entries(results_dir())
    tables = [path.name for kind, path in entries if kind == "md"]
    _wait_for_text(page, "body", tables[0] if tables else "No benchmark results")
    text = page.locator("body").inner_text()
    assert all(name in text for name in tables)
    images = page.locator(".results-image img")
    assert images.count() == sum(kind == "png" for kind, _ in entries)
    for i in range(images.count()):  # images load lazily: bring each into view and wait until it has pixels
        images.nth(i).scroll_into_view_if_needed()
        page.wait_for_function("(img) => img.complete && img.naturalWidth > 0", arg=images.nth(i).element_handle())
    page.screenshot(path=str(shots / "results.png"), full_page=True)
