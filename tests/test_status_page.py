"""The status page (GET /, or /status beside a web app) in a real browser: Debian's chromium
driven by Playwright. It asks for the key once, lists every model, follows a load live from
/models/sse after a click on Load, and shows no buttons to a user key.

The slow model is the scripted backend, whose load reports progress in 20 steps over a few
seconds: long enough for the page to show steps of it. Every wait is on a condition."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.daemon import Daemon

try:
    from playwright.sync_api import expect, sync_playwright
except ImportError:  # the browser fixture says what to install
    expect = sync_playwright = None

pytestmark = pytest.mark.timeout(120, func_only=True)

ADMIN, USER = "sk-page-admin-01", "sk-page-user-002"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]

# Runs before the page's own script: records each progress text and state the page shows,
# so that steps lasting a moment are seen for sure.
RECORDER = """
(() => {
  const rec = window.__seen = {progress: [], states: []};
  const look = () => {
    for (const tr of document.querySelectorAll('tr[data-model="slow"]')) {
      const p = tr.querySelector('td.progress span');
      const text = p ? p.textContent : '';
      if (text && rec.progress[rec.progress.length - 1] !== text) rec.progress.push(text);
      const s = tr.dataset.status;
      if (s && rec.states[rec.states.length - 1] !== s) rec.states.push(s);
    }
  };
  new MutationObserver(look).observe(document, {subtree: true, childList: true, characterData: true,
                                                attributes: true});
})();
"""


@pytest.fixture(scope="module")
def paged(tmp_path_factory: pytest.TempPathFactory, models_dir: Path,
          isolated_env: dict[str, str]) -> Iterator[Daemon]:
    tmp = tmp_path_factory.mktemp("statuspage")
    (tmp / "slow.bin").write_bytes(b"scripted")
    (tmp / "c.toml").write_text(f"""
[server]
models_dirs = []
stop_timeout = 1

[[keys]]
name = "ops"
key = "{ADMIN}"
role = "admin"

[[keys]]
name = "alice"
key = "{USER}"

[models.tiny]
source = "{models_dir / 'tiny-a.gguf'}"
n_ctx = 512

[models.slow]
source = "{tmp / 'slow.bin'}"
backend = "scripted"
options = {{ load_seconds = 3 }}
""")
    with Daemon("--config", str(tmp / "c.toml"), env=isolated_env) as d:
        yield d


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    chromium = os.environ.get("MODELHERD_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(chromium).is_file():
        pytest.fail("the status page tests need Chromium: apt-get install -y chromium", pytrace=False)
    if sync_playwright is None:
        pytest.fail("the status page tests need Playwright for Python (pip install -e '.[test]')",
                    pytrace=False)
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS, timeout=60_000)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    context.set_default_timeout(30_000)
    context.add_init_script(RECORDER)
    p = context.new_page()
    p.on("console", lambda m: print(f"console.{m.type}: {m.text[:500]}") if m.type == "error" else None)
    try:
        yield p
    finally:
        context.close()


def sign_in(page: Any, d: Daemon, key: str, path: str = "/") -> None:
    page.goto(d.url + path)
    page.get_by_label("API key").fill(key)
    page.get_by_role("button", name="Use this key").click()
    expect(page.locator("#models")).to_be_visible()


def row(page: Any, model: str) -> Any:
    return page.locator(f'tr[data-model="{model}"]')


def unloaded(d: Daemon, model: str) -> None:
    with d.client(headers={"Authorization": f"Bearer {ADMIN}"}) as c:
        c.post("/models/unload", json={"model": model})
    d.wait_until(lambda: d.models(Authorization=f"Bearer {ADMIN}")[model]["status"]["value"]  # type: ignore[index]
                 == "unloaded", f"{model} unloaded")


def test_the_page_asks_for_the_key_once_and_lists_every_model(page: Any, paged: Daemon) -> None:
    seen: list[str] = []
    page.on("request", lambda r: seen.append(r.url))
    sign_in(page, paged, ADMIN)
    expect(row(page, "tiny")).to_be_visible()
    expect(row(page, "slow")).to_be_visible()
    expect(row(page, "tiny").locator("td.backend")).to_have_text("llama_cpp")
    expect(row(page, "tiny").locator(".state")).to_have_text("unloaded")
    expect(page.locator("#who")).to_contain_text("ops")
    expect(page.locator("#conn")).to_have_attribute("data-live", "true")  # following /models/sse
    assert not any(ADMIN in url for url in seen)  # the key goes in a header, never in a URL
    # Kept: a reload of the page asks no more.
    page.reload()
    expect(row(page, "tiny")).to_be_visible()
    expect(page.locator("#keyform")).to_be_hidden()


def test_a_load_shows_its_progress_and_state_live(page: Any, paged: Daemon) -> None:
    unloaded(paged, "slow")
    sign_in(page, paged, ADMIN)
    slow = row(page, "slow")
    expect(slow.locator(".state")).to_have_text("unloaded")
    slow.get_by_role("button", name="Load").click()
    expect(slow.locator(".state")).to_have_text("loaded", timeout=60_000)
    seen = page.evaluate("() => window.__seen")
    assert "loading" in seen["states"] and seen["states"][-1] == "loaded", seen
    steps = [int(t.split()[-1].rstrip("%")) for t in seen["progress"] if t.startswith("load ")]
    assert any(0 < s < 100 for s in steps), seen  # steps of the load, not just its end
    assert steps == sorted(steps), seen
    expect(slow.locator("td.slots")).not_to_have_text("")
    # And back: Unload, and the feed shows it unloaded.
    slow.get_by_role("button", name="Unload").click()
    expect(slow.locator(".state")).to_have_text("unloaded", timeout=30_000)
    expect(slow.get_by_role("button", name="Load")).to_be_visible()


def test_a_user_key_sees_the_models_and_no_buttons(page: Any, paged: Daemon) -> None:
    sign_in(page, paged, USER)
    expect(row(page, "tiny")).to_be_visible()
    expect(page.locator("#who")).to_contain_text("user")
    assert page.locator("#models button").count() == 0


def test_a_refused_key_is_asked_again(page: Any, paged: Daemon) -> None:
    page.goto(paged.url + "/")
    page.get_by_label("API key").fill("sk-wrong-wrong-wrong")
    page.get_by_role("button", name="Use this key").click()
    expect(page.locator("#keyerror")).to_contain_text("refused")
    expect(page.locator("#models")).to_be_hidden()


def test_beside_a_web_app_the_page_is_at_status(tmp_path: Path, models_dir: Path,
                                                isolated_env: dict[str, str]) -> None:
    """With ui_dir the web app has /; the page is at /status (always there), its files and
    the page public, its data calls not."""
    ui = tmp_path / "ui"
    ui.mkdir()
    (ui / "index.html").write_text("<!doctype html><title>the web app</title>")
    (tmp_path / "c.toml").write_text(f'[server]\nmodels_dirs = ["{models_dir}"]\napi_keys = ["{ADMIN}"]\n'
                                     f'ui_dir = "{ui}"\n')
    with Daemon("--config", str(tmp_path / "c.toml"), env=isolated_env) as d, d.client() as c:
        assert "the web app" in c.get("/").text
        status = c.get("/status")
        assert status.status_code == 200 and "/_modelherd/status.js" in status.text
        assert "script-src 'self'" in status.headers["content-security-policy"]
        assert c.get("/_modelherd/status.js").headers["content-type"].startswith("text/javascript")
        assert c.get("/whoami").status_code == 401
        me = c.get("/whoami", headers={"Authorization": f"Bearer {ADMIN}"}).json()
        assert me == {"key": "key-1", "role": "admin", "keys_required": True}


def test_without_a_web_app_the_page_is_at_both_paths(paged: Daemon) -> None:
    with paged.client() as c:
        for path in ("/", "/status"):
            r = c.get(path)
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
            assert "/_modelherd/status.js" in r.text
        assert c.get("/models").status_code == 401  # the page is public; its data is not
