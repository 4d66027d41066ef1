"""One log format (router.logs): under systemd's journal `<N>` priority prefixes and no
timestamps, elsewhere timestamps; an access line per request with the key's name, never the
key; a worker's lines with its model's name, at the level the worker logged them."""

from __future__ import annotations

import io
import logging
import os
import re
from pathlib import Path

import pytest

from protocol.loglines import PriorityFormatter, WorkerFormatter, parse, priority
from router.logs import journal_stream
from tests.daemon import Daemon

KEY = "sk-alice-secret-1234"
TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\d[ T]\d\d:\d\d:\d\d")
JOURNAL_LINE = re.compile(r"<[0-7]>[\w.\-]+: ")


def config(tmp_path: Path, models_dir: Path) -> Path:
    (tmp_path / "m.bin").write_bytes(b"x")
    path = tmp_path / "c.toml"
    path.write_text(f"""
[server]
models_dirs = []

[[keys]]
name = "alice"
key = "{KEY}"
role = "admin"

[models.tiny-a]
source = "{models_dir / 'tiny-a.gguf'}"
n_ctx = 256

[models.bad]
source = "{tmp_path / 'm.bin'}"
backend = "scripted"
options = {{ fail_load = "weights are corrupt" }}
""")
    return path


def test_under_the_journal_every_line_has_a_priority_and_no_time(
        tmp_path: Path, models_dir: Path, isolated_env: dict[str, str]) -> None:
    with Daemon("--config", str(config(tmp_path, models_dir)), env=isolated_env, journal=True) as d:
        auth = {"Authorization": f"Bearer {KEY}"}
        with d.client(headers=auth) as c:
            r = c.post("/v1/chat/completions", json={"model": "tiny-a", "max_tokens": 3,
                                                     "messages": [{"role": "user", "content": "hi"}]})
            assert r.status_code == 200, r.text
            d.wait_for_log(r"^<6>modelherd\.access: POST /v1/chat/completions 200 model=tiny-a "
                           r"tokens=\d+\+3 \d+\.\d{3}s key=alice$")
            assert c.get("/health").status_code == 200
            d.wait_for_log(r"^<6>modelherd\.access: GET /health 200 model=- tokens=0\+0 .* key=")
            # A worker's error stays an error, with its model's name.
            assert c.post("/v1/completions", json={"model": "bad", "prompt": "x"}).status_code == 503
            d.wait_for_log(r"^<3>modelherd\.worker: \[bad\] loading .* failed: .*weights are corrupt")
            # Its bare output (the scripted backend prints) at info, with the name too.
            d.wait_for_log(r"^<6>modelherd\.worker: \[bad\] scripted backend: loading$")
        d.wait_for_log(r"^<6>modelherd: listening on http://")
        d.wait_for_log(r"^<6>uvicorn\.error: Application startup complete")  # uvicorn's too
        d.wait_for_log(r"^<6>modelherd\.pool: model tiny-a loaded")
        assert d.stop() == 0
    lines = d.lines
    assert lines
    odd = [line for line in lines if not JOURNAL_LINE.match(line) or TIMESTAMP.search(line)]
    assert not odd, odd
    assert not any(KEY in line for line in lines)  # the key's name, never the key
    assert not any("uvicorn.access" in line for line in lines)  # one access line, ours
    # llama.cpp's own chatter is debug: not at the default level.
    assert not any("modelherd.worker.llama.cpp" in line for line in lines)


def test_llama_cpp_output_is_debug(tmp_path: Path, models_dir: Path, isolated_env: dict[str, str]) -> None:
    args = ("--config", str(config(tmp_path, models_dir)), "--log-level", "debug")
    with Daemon(*args, env=isolated_env, journal=True) as d:
        d.load("tiny-a", Authorization=f"Bearer {KEY}")
        d.wait_for_log(r"^<7>modelherd\.worker\.llama\.cpp: \[tiny-a\] ")
    lines = [line for line in d.lines if "modelherd.worker.llama.cpp" in line]
    assert all(line.startswith(("<7>", "<4>", "<3>")) for line in lines), lines


def test_outside_the_journal_lines_have_a_time(tmp_path: Path, models_dir: Path,
                                              isolated_env: dict[str, str]) -> None:
    # JOURNAL_STREAM inherited, but stderr is not that stream (a shell started from a service).
    env = {**isolated_env, "JOURNAL_STREAM": "8:12345"}
    with Daemon("--config", str(config(tmp_path, models_dir)), env=env) as d:
        m = d.wait_for_log(r"^(\S+ \S+) INFO modelherd: listening on http://")
        assert TIMESTAMP.match(m.group(1))
        with d.client(headers={"x-api-key": KEY}) as c:
            assert c.get("/v1/models").status_code == 200
        d.wait_for_log(r" INFO modelherd\.access: GET /v1/models 200 model=- tokens=0\+0 .* key=alice$")
    assert not any(line.startswith("<") for line in d.lines)


def test_journal_stream_must_name_stderr_itself(tmp_path: Path) -> None:
    with open(tmp_path / "f", "w") as f:
        st = os.fstat(f.fileno())
        assert journal_stream({"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}, f.fileno())
        assert not journal_stream({"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino + 1}"}, f.fileno())
        assert not journal_stream({"JOURNAL_STREAM": "nonsense"}, f.fileno())
        assert not journal_stream({}, f.fileno())


@pytest.mark.parametrize(("level", "prio"), [(logging.CRITICAL, 2), (logging.ERROR, 3),
                                             (logging.WARNING, 4), (logging.INFO, 6),
                                             (logging.DEBUG, 7), (5, 7)])
def test_priorities(level: int, prio: int) -> None:
    assert priority(level) == prio


def test_a_worker_traceback_keeps_its_level_and_logger_on_every_line() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(WorkerFormatter("%(message)s"))
    logger = logging.getLogger("modelherd.worker.test")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        try:
            raise ValueError("bad weights")
        except ValueError:
            logger.exception("load failed")
    finally:
        logger.removeHandler(handler)
    lines = stream.getvalue().splitlines()
    assert len(lines) > 3
    parsed = [parse(line) for line in lines]
    assert {(level, name) for level, name, _ in parsed} == {(logging.ERROR, "modelherd.worker.test")}
    assert parsed[0][2] == "load failed" and parsed[-1][2] == "ValueError: bad weights"
    assert parse("plain output from C") == (None, "", "plain output from C")


def test_the_journal_format_prefixes_every_line() -> None:
    record = logging.LogRecord("modelherd", logging.WARNING, __file__, 1, "two\nlines", None, None)
    assert PriorityFormatter("%(name)s: %(message)s").format(record) == "<4>modelherd: two\n<4>lines"
