"""The README's commands and its config example are the ones that work: the quick start's
test command is what CI runs, its serve command installs the embedded model its first
request names, and the "Configuration" example starts a daemon as written, whose keys,
roles and default model behave as the example's comments say."""

from __future__ import annotations

import json
import re
import shlex
import socket
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from router.builtin import SMOLLM2
from tests.daemon import REPO, Daemon

README = (REPO / "README.md").read_text()
ADMIN, KIDS = "sk-admin-change-me", "sk-kids-change-me"  # the example's keys, as its comments give them


def section(title: str) -> str:
    start = README.index(f"\n## {title}\n")
    end = README.find("\n## ", start + 1)
    return README[start: end if end > 0 else None]


def fenced(text: str, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", text, re.S)


def test_the_quick_starts_test_command_is_what_ci_runs() -> None:
    block = fenced(section("Quick start"), "sh")[0]
    commands = [ln for ln in block.splitlines() if ln and not ln.startswith("#")]
    assert len(commands) == 2, commands
    ci_last = [ln for ln in (REPO / ".ci" / "run").read_text().splitlines() if ln.strip()][-1]
    assert commands[1] == ci_last
    serve = shlex.split(commands[0].replace("&&", ";"))
    assert "-e" in serve and ".[llama,starter]" in serve and serve[-2:] == [".venv/bin/modelherd", "serve"]


def test_the_quick_starts_first_request_names_the_embedded_model() -> None:
    curl = fenced(section("Quick start"), "sh")[1]
    assert f'"model": "{SMOLLM2.name}"' in curl
    starter = re.search(r'starter = \["([^"]+)"\]', (REPO / "pyproject.toml").read_text())
    assert starter is not None and starter.group(1).startswith(SMOLLM2.distribution)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def example(tmp_path_factory: pytest.TempPathFactory, isolated_env: dict[str, str],
            smollm2_gguf: Path) -> Iterator[Daemon]:
    toml = fenced(section("Configuration"), "toml")
    assert len(toml) == 1
    path = tmp_path_factory.mktemp("readme") / "modelherd.toml"
    path.write_text(toml[0])
    # Its host and port are overridden (the tests bind a free port); no hub is reachable.
    env = {**isolated_env, "HF_ENDPOINT": f"http://127.0.0.1:{_closed_port()}"}
    with Daemon("--config", str(path), env=env) as d:
        yield d


def test_the_config_example_runs_as_written(example: Daemon) -> None:
    admin = {"Authorization": f"Bearer {ADMIN}"}
    listed = example.models(**admin)
    qwen = listed["qwen/0.5b"]
    assert qwen["aliases"] == ["qwen", "gpt-4o-mini"] and qwen["tags"] == ["small"]
    assert SMOLLM2.name in listed  # builtin_models = true
    with example.client() as c:
        # No "model": the example's default_model answers.
        r = c.post("/v1/chat/completions", headers=admin, json={
            "max_tokens": 8, "messages": [{"role": "user", "content": "Say hello."}]})
        assert r.status_code == 200, r.text
        assert r.json()["model"] == SMOLLM2.name
        assert c.get("/metrics", headers=admin).status_code == 200
        assert c.get("/v1/models").status_code == 401  # the example has keys: they are asked for


def test_the_examples_user_key_sees_its_models_and_no_admin_routes(example: Daemon) -> None:
    kids = {"Authorization": f"Bearer {KIDS}"}
    with example.client() as c:
        names = [m["id"] for m in c.get("/v1/models", headers=kids).json()["data"]]
        assert names == [SMOLLM2.name]
        r = c.post("/v1/chat/completions", headers=kids, json={
            "model": "qwen", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 404, r.text
        r = c.post("/v1/chat/completions", headers=kids, json={
            "model": SMOLLM2.name, "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 200, r.text
        assert c.post("/models/load", headers=kids, json={"model": SMOLLM2.name}).status_code == 403
        assert c.get("/metrics", headers=kids).status_code == 403


def _served(c: httpx.Client, path: str) -> bool:
    """GET or POST on `path` reaches a route (anything but the router's 404 for no route)."""
    for method in ("GET", "POST"):
        with c.stream(method, path) as r:  # an event feed is not read to its end
            if r.status_code != 404 or not json.loads(r.read())["error"]["message"].endswith(": Not Found"):
                return True
    return False


def test_every_route_in_the_table_is_served(example: Daemon) -> None:
    table = section("What it serves")
    paths = set(re.findall(r"`(?:GET|POST|DELETE|OPTIONS)?,? ?(/[a-zA-Z0-9_/.{}-]*)", table))
    assert len(paths) > 30, paths
    with httpx.Client(base_url=example.url, timeout=60, headers={"Authorization": f"Bearer {ADMIN}"}) as c:
        assert not _served(c, "/no-such-route")  # the probe tells a missing route
        missing = [p for p in sorted(paths)
                   if not _served(c, p.replace("{id}", "resp_missing").replace("{ID}", "conv-missing"))]
    assert not missing, missing
