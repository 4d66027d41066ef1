"""GET /metrics on a real daemon: Prometheus text that prometheus_client's own parser reads,
counters and histograms that move with requests, llama-server's metric names beside ours,
admin keys only (unless metrics_public), key names as labels and never the keys."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.daemon import NO_EOS, Daemon

ADMIN, USER = "sk-metrics-admin-1", "sk-metrics-user-22"
ROUTE = "/v1/chat/completions"

# What llama-server's /metrics exports (tools/server/server-task.cpp, to_metrics) that
# modelherd can know too, with its types: parsed family names (a counter's lose `_total`).
LLAMA_SERVER = {"llamacpp:prompt_tokens": "counter", "llamacpp:prompt_tokens_cached": "counter",
                "llamacpp:prompt_seconds": "counter", "llamacpp:tokens_predicted": "counter",
                "llamacpp:tokens_predicted_seconds": "counter", "llamacpp:requests_processing": "gauge",
                "llamacpp:requests_deferred": "gauge"}

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def config(models_dir: Path, bad: Path, public: bool = False) -> str:
    return f"""
[server]
models_dirs = []
heartbeat_interval = 0.2  # worker figures (slots, its counters) arrive with heartbeats
metrics_public = {"true" if public else "false"}

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
aliases = ["tiny-alias"]

[models.bad]
source = "{bad}"
backend = "scripted"
options = {{ fail_load = "weights are corrupt" }}
"""


@pytest.fixture(scope="module")
def metered(tmp_path_factory: pytest.TempPathFactory, models_dir: Path,
            isolated_env: dict[str, str]) -> Iterator[Daemon]:
    tmp = tmp_path_factory.mktemp("metrics")
    (tmp / "bad.bin").write_bytes(b"scripted")
    (tmp / "c.toml").write_text(config(models_dir, tmp / "bad.bin"))
    with Daemon("--config", str(tmp / "c.toml"), env=isolated_env) as d:
        yield d


def get(d: Daemon, path: str, key: str | None = ADMIN) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    with d.client() as c:
        return c.get(path, headers=headers)


def scrape(d: Daemon, key: str | None = ADMIN) -> Samples:
    r = get(d, "/metrics", key)
    assert r.status_code == 200, r.text
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(r.text) for s in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def scrape_until(d: Daemon, ok: Callable[[Samples], bool], what: str) -> Samples:
    """Scrape until `ok` holds: request facts are counted when the request is over, and a
    worker's own figures come with its next heartbeat."""
    found: list[Samples] = []

    def check() -> bool:
        found[:] = [scrape(d)]
        return ok(found[0])

    d.wait_until(check, what, timeout=30)
    return found[0]


def chat(d: Daemon, key: str, model: str = "tiny-alias", max_tokens: int = 8) -> dict[str, object]:
    with d.client(headers={"Authorization": f"Bearer {key}"}) as c:
        r = c.post(ROUTE, json={"model": model, "max_tokens": max_tokens, "logit_bias": NO_EOS,
                                "messages": [{"role": "user", "content": "hello there"}]})
    assert r.status_code == 200, r.text
    usage = r.json()["usage"]
    assert isinstance(usage, dict)
    return usage


def test_only_an_admin_key_may_scrape(metered: Daemon) -> None:
    assert get(metered, "/metrics", None).status_code == 401
    refused = get(metered, "/metrics", USER)
    assert refused.status_code == 403
    assert "admin" in refused.json()["error"]["message"]
    r = get(metered, "/metrics", ADMIN)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
    assert abs(int(r.headers["process-start-time-unix"]) - time.time()) < 3600  # llama-server's header
    names = {f.name for f in text_string_to_metric_families(r.text)}
    # The router's own process, from prometheus_client's process collector.
    assert {"process_resident_memory_bytes", "process_cpu_seconds", "modelherd_build_info"} <= names


def test_a_chat_request_moves_the_counters_and_histograms(metered: Daemon) -> None:
    before = scrape(metered)
    requests = {"model": "tiny", "route": ROUTE, "method": "POST", "status": "200", "key": "alice"}
    usage = chat(metered, USER)
    assert usage["completion_tokens"] == 8
    after = scrape_until(metered, lambda s: value(s, "modelherd_requests_total", **requests)
                         == value(before, "modelherd_requests_total", **requests) + 1, "the request counted")

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    # By model (its own name: the request said an alias) and by key name.
    assert moved("modelherd_prompt_tokens_total", model="tiny", key="alice") == usage["prompt_tokens"]
    assert moved("modelherd_generated_tokens_total", model="tiny", key="alice") == 8
    for histogram in ("modelherd_time_to_first_token_seconds", "modelherd_time_per_token_seconds"):
        assert moved(f"{histogram}_count", model="tiny") == 1
        assert moved(f"{histogram}_sum", model="tiny") > 0
        assert value(after, f"{histogram}_bucket", model="tiny", le="+Inf") == value(
            after, f"{histogram}_count", model="tiny")
    assert moved("modelherd_request_duration_seconds_count", model="tiny", route=ROUTE) == 1
    assert moved("llamacpp:prompt_seconds_total", model="tiny") > 0
    assert moved("llamacpp:tokens_predicted_seconds_total", model="tiny") > 0
    # The worker's own counters (llama-server's names) arrive with its next heartbeat.
    worker = scrape_until(metered, lambda s: value(s, "llamacpp:tokens_predicted_total", model="tiny")
                          >= value(before, "llamacpp:tokens_predicted_total", model="tiny") + 8,
                          "the worker's heartbeat counted the tokens")
    assert value(worker, "llamacpp:prompt_tokens_total", model="tiny") > 0


def test_llama_server_names_are_there_with_its_types(metered: Daemon) -> None:
    chat(metered, ADMIN)
    samples = scrape_until(metered, lambda s: ("llamacpp:prompt_tokens_total",
                                               frozenset({("model", "tiny")})) in s, "a heartbeat")
    r = get(metered, "/metrics")
    families = {f.name: f.type for f in text_string_to_metric_families(r.text)}
    for name, kind in LLAMA_SERVER.items():
        assert families.get(name) == kind, name
    assert value(samples, "llamacpp:requests_processing", model="tiny") == 0  # nothing running now
    assert value(samples, "llamacpp:requests_deferred", model="tiny") == 0


def test_state_memory_slots_and_load_time_of_a_loaded_model(metered: Daemon) -> None:
    pid = metered.load("tiny", Authorization=f"Bearer {ADMIN}")["pid"]
    assert isinstance(pid, int)
    samples = scrape_until(metered, lambda s: value(s, "modelherd_slots_total", model="tiny") > 0,
                           "the worker's slots from a heartbeat")
    assert value(samples, "modelherd_model_state", model="tiny", state="loaded") == 1
    assert value(samples, "modelherd_model_state", model="tiny", state="unloaded") == 0
    rss = value(samples, "modelherd_worker_rss_bytes", model="tiny")
    real = psutil.Process(pid).memory_info().rss
    assert 0.5 * real < rss < 2 * real  # the worker's own RSS, read at scrape time
    assert value(samples, "modelherd_load_seconds_count", model="tiny") >= 1
    assert value(samples, "modelherd_load_seconds_sum", model="tiny") > 0
    assert value(samples, "modelherd_requests_in_flight", model="tiny") == 0
    assert value(samples, "modelherd_requests_queued", model="tiny") == 0
    assert value(samples, "modelherd_slots_busy", model="tiny") == 0
    assert ("modelherd_prompt_cache_hits_total", frozenset({("model", "tiny")})) in samples


def test_a_failed_load_is_counted(metered: Daemon) -> None:
    before = value(scrape(metered), "modelherd_load_failures_total", model="bad")
    with metered.client(headers={"Authorization": f"Bearer {ADMIN}"}) as c:
        r = c.post("/models/load", json={"model": "bad", "wait": True})
    assert r.status_code >= 400
    samples = scrape_until(metered, lambda s: value(s, "modelherd_load_failures_total", model="bad")
                           == before + 1, "the failed load counted")
    assert value(samples, "modelherd_model_state", model="bad", state="failed") == 1
    assert value(samples, "modelherd_load_failures_in_a_row", model="bad") >= 1


def test_key_names_are_labels_and_keys_appear_nowhere(metered: Daemon) -> None:
    chat(metered, USER)
    text = get(metered, "/metrics").text
    assert 'key="alice"' in text
    assert USER not in text and ADMIN not in text
    # Nor do names that are no model's: an unknown model is not a series of its own.
    with metered.client(headers={"Authorization": f"Bearer {USER}"}) as c:
        c.post(ROUTE, json={"model": "no-such-model-xyz", "messages": [{"role": "user", "content": "x"}]})
    assert "no-such-model-xyz" not in get(metered, "/metrics").text


def test_metrics_public_needs_no_key_but_the_rest_still_does(
        tmp_path: Path, models_dir: Path, isolated_env: dict[str, str]) -> None:
    (tmp_path / "bad.bin").write_bytes(b"scripted")
    (tmp_path / "c.toml").write_text(config(models_dir, tmp_path / "bad.bin", public=True))
    with Daemon("--config", str(tmp_path / "c.toml"), env=isolated_env) as d:
        samples = scrape(d, key=None)
        assert value(samples, "modelherd_model_state", model="tiny", state="unloaded") == 1
        assert scrape(d, key=USER)  # any key, or none
        assert get(d, "/models", None).status_code == 401
        assert not math.isnan(value(samples, "process_resident_memory_bytes"))
