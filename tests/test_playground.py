"""The web playground in a real headless Chromium (Playwright): type a prompt, generate, watch the canvas resolve,
and compare what it shows with the library's own generation. Saves a screenshot in the test's tmp dir.

Browser: $ILLADA_CHROMIUM, else Playwright's own Chromium if installed, else a system Chromium/Chrome on PATH
(CI installs Debian's `chromium`); the test skips only when none is found."""
import contextlib
import os
import shutil
from pathlib import Path

import pytest
from test_serve import Slow, tiny_handle  # pytest puts tests/ on sys.path

sync_api = pytest.importorskip("playwright.sync_api")
pytest.importorskip("uvicorn")

from illada.api import DiffusionLM  # noqa: E402
from illada.serving import ServerSettings, create_app, serve_in_thread  # noqa: E402

KEY = "playground-key"


def find_browser(playwright) -> str | None:
    """Path of a Chromium to drive, or None."""
    candidates = [os.environ.get("ILLADA_CHROMIUM")]
    try:
        candidates.append(playwright.chromium.executable_path)  # Playwright's own download, if any
    except Exception:
        pass
    candidates += [shutil.which(name) for name in ("chromium", "chromium-browser", "google-chrome-stable",
                                                   "google-chrome", "chrome")]
    return next((c for c in candidates if c and Path(c).is_file() and os.access(c, os.X_OK)), None)



@contextlib.contextmanager
def playground(lm):
    """A page on the playground of a server for `lm` (slowed, so the canvas can be seen resolving), its API key
    filled in, and a counter of renders that show committed tokens and masks at once."""
    served = DiffusionLM(model=Slow(lm.model, 0.01), tokenizer=lm.tokenizer, config=lm.config, name=lm.name)
    app = create_app(served, ServerSettings(api_key=KEY))
    with sync_api.sync_playwright() as playwright:
        browser_path = find_browser(playwright)
        if browser_path is None:
            pytest.skip("no Chromium found: set ILLADA_CHROMIUM, `playwright install chromium`, or "
                        "`apt-get install chromium`")
        browser = playwright.chromium.launch(executable_path=browser_path, args=["--no-sandbox"])
        try:
            with serve_in_thread(app) as url:
                page = browser.new_page(viewport={"width": 1200, "height": 700})
                page.goto(url + "/")
                page.wait_for_function(f"document.getElementById('model').textContent === '{lm.name}'")
                page.fill("#api_key", KEY)
                page.evaluate("""() => { window.partialFrames = 0;
                    new MutationObserver(() => {
                        const c = document.getElementById('canvas');
                        if (c.querySelector('.t') && c.querySelector('.m')) window.partialFrames += 1;
                    }).observe(document.getElementById('canvas'), {childList: true, subtree: true}); }""")
                yield page
        finally:
            browser.close()


def test_playground_shows_the_denoising(tmp_path):
    lm = tiny_handle()
    _, output = lm.generate("ROMEO:", max_new_tokens=32, block_length=8, temperature=0.0, return_output=True)
    tokens = output.generated_tokens()[0]
    with playground(lm) as page:
        page.fill("#prompt", "ROMEO:")
        page.fill("#max_tokens", "32")
        page.fill("#block_length", "8")
        page.click("#generate")
        page.wait_for_selector("#status[data-state=done]", timeout=60_000)

        shown = page.eval_on_selector_all("#canvas .t", "spans => spans.map(s => s.textContent)")
        steps = page.eval_on_selector_all("#canvas .t", "spans => spans.map(s => +s.dataset.step)")
        colours = page.eval_on_selector_all("#canvas .t", "spans => spans.map(s => s.style.color)")
        assert shown == [lm.tokenizer.decode([t]) for t in tokens]
        assert page.locator("#canvas .m").count() == 0
        assert page.inner_text("#nfe") == str(output.nfe)
        assert page.inner_text("#tokens") == str(len(tokens))
        assert float(page.inner_text("#tps")) > 0
        assert page.evaluate("window.partialFrames") > 0
        assert len(set(steps)) > 1 and len(set(colours)) > 1  # coloured by the step that committed them
        assert page.inner_text("#canvas .prompt") == "ROMEO:"
        shot = tmp_path / "playground.png"
        page.screenshot(path=str(shot), full_page=True)
        assert shot.stat().st_size > 0
        print(f"playground screenshot: {shot}")


def test_playground_fills_holes_in_place(tmp_path):
    """Infill mode: type a text with <|mask:N|> holes; the kept text shows from the first pass and the holes
    resolve in place into exactly the library's infill."""
    lm = tiny_handle()
    text = "The capital of France is <|mask:3|>, a city known for <|mask:6|>."
    want, output = lm.infill(text, return_output=True)
    with playground(lm) as page:
        page.fill("#prompt", text)
        page.check("#infill")
        page.click("#generate")
        page.wait_for_selector("#status[data-state=done]", timeout=60_000)
        assert page.inner_text("#canvas") == want
        assert page.locator("#canvas .m").count() == 0
        assert page.locator("#canvas .t").count() == output.filled  # the hole tokens, coloured by step
        assert page.inner_text("#nfe") == str(output.nfe)
        assert page.evaluate("window.partialFrames") > 0
        page.screenshot(path=str(tmp_path / "playground-infill.png"), full_page=True)
