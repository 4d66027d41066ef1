"""GET /metrics: the daemon in Prometheus's text format (prometheus-client).

One `Metrics` per Runtime owns its own CollectorRegistry (never the library's global
one): two daemons in one process, as the tests run them, must not share counters.
Three sources feed it:

- every request's `RequestFacts` (a request observer): requests by route and status,
  tokens, time to the first token and per token, by model and by key name (never the key);
- every status change of a model (the pool's on_status): load time and load failures;
- the pool's views, read at scrape time by `PoolCollector`: state, queue, slots, memory,
  the worker's own counters from its last heartbeat. Nothing of the scheduler's state
  is copied here, so a scrape can never disagree with GET /models.

Where llama-server exports the same quantity its name is used too (`llamacpp:*`, with a
`model` label since one daemon serves several). Those read from a worker's heartbeat
count since that worker started, as llama-server's count since it started: an unload
resets them, which Prometheus's rate() takes as a counter reset.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.process_collector import ProcessCollector
from starlette.requests import Request
from starlette.responses import Response

from router.modelstate import ModelStatus
from router.pool import ModelView
from router.requestlog import RequestFacts

# What a model's `modelherd_model_state` may say (GET /models' status.value).
STATES = ("unloaded", "downloading", "loading", "loaded", "unloading", "failed")

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
PER_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.15, 0.3, 0.6, 1.2)
DURATION_BUCKETS = (0.005, 0.025, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 180.0, 600.0)
LOAD_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)


class Metrics:
    def __init__(self, views: Callable[[], list[ModelView]], resolve: Callable[[str], str | None],
                 version: str = "", clock: Callable[[], float] = time.monotonic) -> None:
        self.registry = CollectorRegistry()
        self._resolve = resolve
        self._clock = clock
        r = self.registry
        ProcessCollector(registry=r)  # the router's own process_* (its workers are in modelherd_worker_*)
        self._requests = Counter("modelherd_requests", "HTTP requests answered, by route template, "
                                 "method and status (status 0: the client left before an answer)",
                                 ["model", "route", "method", "status", "key"], registry=r)
        self._duration = Histogram("modelherd_request_duration_seconds", "From a request's arrival to "
                                   "its last byte (queue and model load included)", ["model", "route"],
                                   buckets=DURATION_BUCKETS, registry=r)
        self._prompt = Counter("modelherd_prompt_tokens", "Prompt tokens of finished requests (cached "
                               "ones included, as usage.prompt_tokens counts them)", ["model", "key"],
                               registry=r)
        self._generated = Counter("modelherd_generated_tokens", "Tokens generated", ["model", "key"],
                                  registry=r)
        self._ttft = Histogram("modelherd_time_to_first_token_seconds", "From a request's arrival to its "
                               "first token (queue and model load included)", ["model"],
                               buckets=TTFT_BUCKETS, registry=r)
        self._per_token = Histogram("modelherd_time_per_token_seconds", "Seconds per generated token "
                                    "after the first, per request", ["model"], buckets=PER_TOKEN_BUCKETS,
                                    registry=r)
        # llama-server's names, summed here over requests (its worker does not report times).
        self._prompt_s = Counter("llamacpp:prompt_seconds", "Total time spent processing prompts",
                                 ["model"], registry=r)
        self._predicted_s = Counter("llamacpp:tokens_predicted_seconds", "Total time spent generating "
                                    "tokens", ["model"], registry=r)
        self._load_time = Histogram("modelherd_load_seconds", "Time from a load's start to its model "
                                    "being loaded (a download included)", ["model"], buckets=LOAD_BUCKETS,
                                    registry=r)
        self._load_failures = Counter("modelherd_load_failures", "Loads that failed", ["model"], registry=r)
        self._worker_failures = Counter("modelherd_worker_failures", "Loaded workers that died or stopped "
                                        "answering heartbeats", ["model"], registry=r)
        r.register(PoolCollector(views, version))
        # Only what a load's duration needs: when each model's current load began.
        self._last: dict[str, ModelStatus] = {}
        self._load_began: dict[str, float] = {}

    # ---- feeds --------------------------------------------------------------------

    def observe(self, facts: RequestFacts) -> None:
        """A request observer (Runtime.request_observers)."""
        # Resolved to the model's own name: an alias or an unknown name must not become a series.
        model = (self._resolve(facts.model) or "") if facts.model else ""
        route = facts.route or "unmatched"
        self._requests.labels(model, route, facts.method, str(facts.status), facts.key_name).inc()
        self._duration.labels(model, route).observe(facts.duration)
        if not model:
            return
        if facts.prompt_tokens or facts.completion_tokens:
            self._prompt.labels(model, facts.key_name).inc(facts.prompt_tokens)
            self._generated.labels(model, facts.key_name).inc(facts.completion_tokens)
            self._prompt_s.labels(model).inc(facts.first_token_ms / 1e3)
            self._predicted_s.labels(model).inc(facts.predicted_ms / 1e3)
        if (ttft := facts.time_to_first_token) is not None:
            self._ttft.labels(model).observe(ttft)
        if (per_token := facts.time_per_token) is not None:
            self._per_token.labels(model).observe(per_token)

    def status(self, view: ModelView) -> None:
        """Every status change of a model (the pool's on_status)."""
        name, now = view.name, view.status
        before = self._last.get(name)
        self._last[name] = now
        if now is ModelStatus.LOADING and before is not ModelStatus.LOADING:
            self._load_began[name] = self._clock()
        elif before is ModelStatus.LOADING and now is not ModelStatus.LOADING:
            began = self._load_began.pop(name, None)
            if now is ModelStatus.LOADED and began is not None:
                self._load_time.labels(name).observe(self._clock() - began)
            elif now is ModelStatus.FAILED:
                self._load_failures.labels(name).inc()
        elif before is ModelStatus.LOADED and now is ModelStatus.FAILED:
            self._worker_failures.labels(name).inc()

    # ---- the scrape ----------------------------------------------------------------

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class PoolCollector:
    """Gauges and worker counters, read from the pool's views at each scrape."""

    def __init__(self, views: Callable[[], list[ModelView]], version: str) -> None:
        self._views = views
        self._version = version

    def collect(self) -> Iterator[Metric]:
        def gauge(name: str, doc: str, labels: tuple[str, ...] = ("model",)) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, doc, labels=list(labels))

        def counter(name: str, doc: str) -> CounterMetricFamily:
            return CounterMetricFamily(name, doc, labels=["model"])

        info = gauge("modelherd_build_info", "Always 1: the daemon's version", ("version",))
        info.add_metric([self._version], 1)
        state = gauge("modelherd_model_state", "1 for the state each model is in, 0 for the others "
                      "(GET /models' status.value)", ("model", "state"))
        in_flight = gauge("modelherd_requests_in_flight", "Requests handed to the model's worker and "
                          "not finished")
        queued = gauge("modelherd_requests_queued", "Requests waiting in the router for the model "
                       "(to load, or for a place)")
        worker_queued = gauge("modelherd_worker_queued", "Requests in the worker waiting for a free "
                              "slot (last heartbeat)")
        busy = gauge("modelherd_slots_busy", "Slots decoding (last heartbeat)")
        slots = gauge("modelherd_slots_total", "Slots the worker has (last heartbeat)")
        rss = gauge("modelherd_worker_rss_bytes", "Resident memory of the model's worker process")
        estimate = gauge("modelherd_memory_estimate_bytes", "The model's memory estimate before loading")
        in_a_row = gauge("modelherd_load_failures_in_a_row", "Failed loads since the last good one "
                         "(the backoff grows with it)")
        hits = counter("modelherd_prompt_cache_hits", "Prompt cache hits since the worker started")
        misses = counter("modelherd_prompt_cache_misses", "Prompt cache misses since the worker started")
        entries = gauge("modelherd_prompt_cache_entries", "Conversations held in the prompt cache")
        cache_bytes = gauge("modelherd_prompt_cache_bytes", "Bytes the prompt cache holds")
        # llama-server's names and meanings (tools/server/server-task.cpp, to_metrics).
        l_prompt = counter("llamacpp:prompt_tokens", "Number of prompt tokens processed, excluding "
                           "cached tokens")
        l_cached = counter("llamacpp:prompt_tokens_cached", "Number of prompt tokens reused from the cache")
        l_predicted = counter("llamacpp:tokens_predicted", "Number of generation tokens processed")
        l_processing = gauge("llamacpp:requests_processing", "Number of requests processing")
        l_deferred = gauge("llamacpp:requests_deferred", "Number of requests deferred")
        for view in self._views():
            name, m = view.name, view.model
            worker = view.worker
            status = worker.status if worker is not None and m.status is ModelStatus.LOADED else None
            shown = view.public_status
            for s in STATES:
                state.add_metric([name, s], 1.0 if s == shown else 0.0)
            in_flight.add_metric([name], len(m.serving))
            queued.add_metric([name], len(m.waiters))
            in_a_row.add_metric([name], m.failures)
            if view.rss is not None:
                rss.add_metric([name], view.rss)
            if m.estimate is not None:
                estimate.add_metric([name], m.estimate.total)
            l_processing.add_metric([name], status.active if status is not None else 0)
            l_deferred.add_metric([name], len(m.waiters) + (status.queued if status is not None else 0))
            if status is None:
                continue
            worker_queued.add_metric([name], status.queued)
            busy.add_metric([name], status.slots_busy)
            slots.add_metric([name], status.slots_total)
            hits.add_metric([name], status.cache_hits)
            misses.add_metric([name], status.cache_misses)
            entries.add_metric([name], status.cache_entries)
            cache_bytes.add_metric([name], status.cache_bytes)
            l_prompt.add_metric([name], status.prompt_tokens)
            l_cached.add_metric([name], status.cached_tokens)
            l_predicted.add_metric([name], status.generated_tokens)
        yield from (info, state, in_flight, queued, worker_queued, busy, slots, rss, estimate, in_a_row,
                    hits, misses, entries, cache_bytes, l_prompt, l_cached, l_predicted, l_processing,
                    l_deferred)


def endpoint(metrics: Metrics) -> Callable[[Request], Awaitable[Response]]:
    """GET /metrics (an admin key's, unless `metrics_public`: router.auth and router.app)."""

    # llama-server's header: lets a scraper tell a restart from a counter reset.
    started = {"Process-Start-Time-Unix": str(int(time.time()))}

    async def scrape(request: Request) -> Response:
        return Response(metrics.exposition(), media_type=CONTENT_TYPE_PLAIN_0_0_4, headers=started)

    return scrape
