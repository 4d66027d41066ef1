"""The engine thread: every request of this worker, from its body to its last byte.

The socket thread calls `submit`, `cancel` and `detach`; they only touch a queue and
per-request flags, so they never wait on generation. The engine thread takes each new
request, prepares it (worker.endpoints: a 400 is known before any slot is taken),
answers at once what needs no slot, and admits generations to the backend's slots in
arrival order as slots free up. Then, one decode step at a time, it turns each sampled
token into text, its choice's output pieces and its API's bytes, sent on the engine's
own DEALER (`Sink`) straight to the router: no second thread touches a token, and each
zmq socket is used only by the thread that made it. A cancel or a detach takes effect
before the next step.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence

from protocol.errors import ErrorKind
from protocol.messages import (
    Endpoint,
    ResponseStored,
    StoredTurn,
    WorkerStatus,
)
from worker.backend import Backend, Sampled, SeqStats
from worker.choice import Choice
from worker.endpoints import Endpoints, Immediate, SeqProgress
from worker.outputs import Finish, PromptProgress, Timings, Usage
from worker.reply import Job, Reply, Sink
from worker.schema import RequestInvalid
from worker.streams import StreamStore

log = logging.getLogger("modelherd.worker.engine")
# A sequence's bytes go to the router at most this often (its last ones at once).
COALESCE_S = 0.001


class Engine:
    def __init__(self, backend: Backend, endpoints: Endpoints, sink_factory: Callable[[], Sink],
                 streams: StreamStore) -> None:
        self._backend = backend
        self._endpoints = endpoints
        self._sink_factory = sink_factory
        self._streams = streams
        self._jobs: queue.SimpleQueue[Job | _Wake | None] = queue.SimpleQueue()
        self._pending: dict[int, Job] = {}  # every job not finished, by request id
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self._stopping = False  # cancels from here on are the worker's, not the client's
        self._waiting: list[Job] = []  # prepared, waiting for free slots (arrival order)
        self._running: dict[int, Choice] = {}  # by slot handle
        self._jobs_by_handle: dict[int, Job] = {}
        self._replies: dict[int, Reply] = {}
        self._sink: Sink | None = None
        self.active = 0
        # Counters for the router's metrics (read from the socket thread: plain ints).
        self.prompt_tokens = 0
        self.cached_tokens = 0
        self.generated_tokens = 0
        self.finished = 0

    @property
    def pending(self) -> int:
        """Requests submitted and not finished yet (running or queued)."""
        with self._lock:
            return len(self._pending)

    @property
    def queued(self) -> int:
        with self._lock:
            return len(self._pending) - self.active

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float) -> bool:
        """Cancel everything and wait for the thread; False if it is still busy (it may be
        inside a decode, which cannot be interrupted)."""
        self._stopping = True
        with self._lock:
            for job in self._pending.values():
                job.cancel.set()
        self._jobs.put(None)
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def status(self) -> WorkerStatus:
        """What the engine is doing, for a Heartbeat's answer (read off the engine thread:
        every figure is a plain int, read once)."""
        batcher = self._backend.batcher
        cache = batcher.cache_info()
        active = self.active
        return WorkerStatus(active, max(0, self.pending - active), batcher.parallel - batcher.free,
                            batcher.parallel, cache.entries, cache.bytes, cache.hits, cache.misses,
                            self.prompt_tokens, self.cached_tokens, self.generated_tokens, self.finished)

    # ---- the socket thread ----------------------------------------------------------

    def submit(self, req_id: int, endpoint: Endpoint, body: bytes, stream_key: str | None = None,
               history: Sequence[StoredTurn] = (), window: int = 0) -> None:
        job = Job(req_id, endpoint, body, threading.Event(), history, stream_key, window=window)
        if stream_key is not None:
            # Opened now, not when generation starts: a DELETE while this waits in the
            # queue must find it (and a newer request for the key replaces it).
            job.stream = self._streams.open(stream_key, req_id, lambda why: self.cancel(req_id, why))
        with self._lock:
            self._pending[req_id] = job
        self._jobs.put(job)

    def cancel(self, req_id: int, reason: str | None = None) -> None:
        """Stop a request: its client left (no reason), or someone else stopped it."""
        with self._lock:
            job = self._pending.get(req_id)
        if job is not None:
            if reason is not None and job.stop_reason is None:
                job.stop_reason = reason
            job.cancel.set()

    def detach(self, req_id: int) -> None:
        """The client of a resumable request left: generate on, into its stream only."""
        with self._lock:
            job = self._pending.get(req_id)
        if job is not None:
            job.detached = True
            self._jobs.put(_WAKE)  # what it held back for the client goes, and it runs on
            log.info("request %d: its client left; generating on into its conversation stream", req_id)

    def credit(self, req_id: int, amount: int) -> None:
        """The router wrote `amount` more bytes of the request to its client."""
        with self._lock:
            job = self._pending.get(req_id)
            if job is not None:
                job.credits += amount
        if job is not None:
            self._jobs.put(_WAKE)

    # ---- the engine thread ----------------------------------------------------------

    def _run(self) -> None:
        self._sink = self._sink_factory()
        try:
            self._backend.warm_up()
            while self._take_jobs():
                self._take_credits()
                self._admit()
                self._reap_cancelled()
                if self._steppable():
                    self._step()
        finally:
            self._sink.close()

    def _take_jobs(self) -> bool:
        """Prepare what arrived; block for work only when nothing can step or be admitted
        (every running request waits for its client, or nothing runs)."""
        waiting = bool(self._waiting) and self._backend.batcher.free >= _slots_needed(self._waiting[0])
        block = not self._steppable() and not waiting
        while True:
            try:
                job = self._jobs.get(block=block)
            except queue.Empty:
                return True
            if job is None:
                self._abandon_all()
                return False
            if isinstance(job, Job):
                self._prepare(job)
            block = False

    def _steppable(self) -> bool:
        return any(not self._replies[j.req_id].blocked for j in self._jobs_by_handle.values())

    def _take_credits(self) -> None:
        with self._lock:
            granted = [(j, j.credits) for j in self._pending.values()
                       if j.credits or j.detached or (j.finished and j.cancel.is_set())]
            for job, _ in granted:
                job.credits = 0
        for job, credit in granted:
            reply = self._replies.get(job.req_id)
            if reply is None:
                continue
            if job.finished and job.cancel.is_set():  # its client left while its end waited
                reply.backlog.clear()
            reply.grant(credit)
            if job.finished and reply.end_held is None:  # its last byte went out
                self._replies.pop(job.req_id, None)
                self._forget(job)

    def _prepare(self, job: Job) -> None:
        assert self._sink is not None
        reply = Reply(self._sink, job, self._streams)
        if job.cancel.is_set():
            self._cancelled(job, reply, None)
            return
        try:
            if job.endpoint is Endpoint.SLOTS:
                self._endpoints.running = self._progress()
            prepared = self._endpoints.prepare(job.endpoint, job.body, job.stream_key, job.history)
        except RequestInvalid as exc:
            reply.fail(exc.kind, exc.message, exc.param, sizes=exc.sizes)
            self._forget(job)
            return
        except Exception as exc:  # a backend bug must not take the worker down
            log.exception("request %d failed", job.req_id)
            reply.fail(ErrorKind.INTERNAL, f"request failed: {type(exc).__name__}: {exc}")
            self._forget(job)
            return
        if isinstance(prepared, Immediate):
            reply.head(prepared.status, prepared.content_type)
            reply.chunk(prepared.body)
            reply.end()
            self._forget(job)
            return
        job.gen = prepared
        self._replies[job.req_id] = reply
        self._waiting.append(job)

    def _admit(self) -> None:
        """Give waiting generations their slots, first come first served."""
        batcher = self._backend.batcher
        while self._waiting and batcher.free >= _slots_needed(self._waiting[0]):
            job = self._waiting.pop(0)
            gen = job.gen
            assert gen is not None
            reply = self._replies[job.req_id]
            if job.cancel.is_set():
                self._cancelled(job, reply, None)
                continue
            if gen.spec.max_tokens <= 0:
                self._finish_without_tokens(job, reply)
                continue
            try:
                handles = batcher.admit(gen.spec)
            except ValueError as exc:  # llama.cpp refused the grammar
                param = "grammar" if gen.task.grammar is not None else "response_format"
                reply.fail(ErrorKind.INVALID_REQUEST, f"invalid grammar: {exc}", param)
                self._end(job)
                continue
            self.active += 1
            stats = batcher.stats(handles[0])
            reply.head(200, gen.renderer.content_type)
            job.out.append(gen.renderer.start(len(gen.prompt.tokens), stats.cached))
            if gen.task.return_progress:
                self._report_progress(job, handles[0])
            backend = self._backend
            for i, handle in enumerate(handles):
                choice = Choice(i, handle, gen.parser(), gen.stops, backend.decoder(), backend.piece,
                                backend.token_text,
                                gen.task.logprobs is not None)
                job.choices.append(choice)
                self._running[handle] = choice
                self._jobs_by_handle[handle] = job
            self._flush(job)

    def _paused(self) -> set[int]:
        return {h for h, j in self._jobs_by_handle.items() if self._replies[j.req_id].blocked}

    def _progress(self) -> dict[int, SeqProgress]:
        paused = self._paused()
        out = {}
        for handle, choice in self._running.items():
            gen = self._jobs_by_handle[handle].gen
            assert gen is not None
            out[handle] = SeqProgress(choice.count, gen.spec.max_tokens - choice.count, handle in paused)
        return out

    def _step(self) -> None:
        # A request whose client reads slowly waits here: its bytes are held, its sequences skip
        # this decode, and the others go on at full speed.
        try:
            sampled = self._backend.batcher.step(self._paused())
        except Exception as exc:  # a failed decode ends what was in it, not the worker
            log.exception("decode failed")
            for job in {id(j): j for j in self._jobs_by_handle.values()}.values():
                self._fail(job, ErrorKind.INTERNAL, f"generation failed: {exc}")
            return
        touched: dict[int, Job] = {}
        for handle, job in list(self._jobs_by_handle.items()):
            gen = job.gen
            if gen is not None and gen.task.return_progress and job.choices[0].handle == handle:
                if self._report_progress(job, handle):
                    touched[job.req_id] = job
        for s in sampled:
            owner = self._jobs_by_handle.get(s.handle)
            if owner is None:
                continue
            self._token(owner, self._running[s.handle], s)
            touched[owner.req_id] = owner
        # Once the first tokens are out, tokens that come faster than one a millisecond go out
        # together: one message per token would cost the router more CPU than a fast model
        # spends making it.
        now = time.perf_counter()
        for job in touched.values():
            if not job.tokens_flushed or now - job.flushed_at >= COALESCE_S:
                self._flush(job)

    def _report_progress(self, job: Job, handle: int) -> bool:
        """llama-server's prompt_progress: once when the request takes its slot (what the
        cache gave), then after each decode that read more of its prompt, up to all of it."""
        gen = job.gen
        assert gen is not None
        stats = self._backend.batcher.stats(handle)
        processed = stats.cached + stats.read
        if processed <= job.progress_sent:
            return False
        job.progress_sent = processed
        now = time.perf_counter()
        elapsed = int((now - stats.admitted_at) * 1e3)
        live = None
        if gen.task.timings_per_token:  # nothing read yet: nothing timed yet
            live = Timings(stats.read, (now - stats.admitted_at) * 1e3 if stats.read else 0.0, 0, 0.0,
                           stats.cached)
        job.out.append(gen.renderer.progress(PromptProgress(stats.cached + stats.evaluated, stats.cached,
                                                            processed, elapsed), live))
        return True

    def _timings(self, choice: Choice, now: float, stats: SeqStats | None = None) -> Timings:
        """llama-server's timings of a choice so far: its prompt, then what it generated."""
        stats = stats or self._backend.batcher.stats(choice.handle)
        done_at = stats.prompt_done_at or now
        return Timings(stats.evaluated, (done_at - stats.admitted_at) * 1e3, choice.count,
                       (now - done_at) * 1e3, stats.cached)

    def _token(self, job: Job, choice: Choice, s: Sampled) -> None:
        gen = job.gen
        assert gen is not None
        if self._backend.is_end(s.token):
            self._finish_choice(job, choice, "stop", None)
            return
        step = choice.token(s.token, s.probs)
        renderer = gen.renderer
        if gen.task.timings_per_token:
            renderer.live(choice.index, self._timings(choice, time.perf_counter()))
        for d in step.deltas:
            job.out.append(renderer.delta(choice.index, d))
        if step.stop is not None:
            self._finish_choice(job, choice, "stop", step.stop)
        elif choice.count >= gen.spec.max_tokens:
            self._finish_choice(job, choice, "length", None)

    def _finish_choice(self, job: Job, choice: Choice, reason: str, stop: str | None) -> None:
        gen = job.gen
        assert gen is not None
        batcher = self._backend.batcher
        stats = batcher.stats(choice.handle)
        batcher.release(choice.handle)
        self._running.pop(choice.handle, None)
        self._jobs_by_handle.pop(choice.handle, None)
        for d in choice.end(stopped=stop is not None):
            job.out.append(gen.renderer.delta(choice.index, d))
        now = time.perf_counter()
        done_at = stats.prompt_done_at or now
        timings = self._timings(choice, now, stats)
        usage = Usage(len(gen.prompt.tokens), choice.count, stats.cached, choice.reasoning_tokens)
        if choice.index == 0:
            job.first_token_ms = (done_at - job.received) * 1e3
            job.predicted_ms = timings.predicted_ms
        self.generated_tokens += choice.count
        if choice.index == 0:
            self.prompt_tokens += stats.evaluated
            self.cached_tokens += stats.cached
        if reason == "stop" and choice.tool_calls:
            reason = "tool_calls"
        finish = Finish(reason, usage, timings, stop, choice.tool_calls)
        job.out.append(gen.renderer.finish(choice.index, finish))
        if all(c.done for c in job.choices):
            self.finished += 1
            job.out.append(gen.renderer.end())
            self._flush(job)
            stored = gen.stored()
            if stored is not None:
                assert self._sink is not None
                self._sink.send(ResponseStored(job.req_id, gen.response_id, stored))
            self._replies[job.req_id].end(len(gen.prompt.tokens), sum(c.count for c in job.choices))
            self._end(job)

    def _finish_without_tokens(self, job: Job, reply: Reply) -> None:
        """max_tokens 0 (llama-server's "only evaluate the prompt"): an empty answer."""
        gen = job.gen
        assert gen is not None
        reply.head(200, gen.renderer.content_type)
        zero = Timings(0, 0.0, 0, 0.0, 0)
        out = [gen.renderer.start(len(gen.prompt.tokens), 0)]
        for i in range(gen.task.n):
            out.append(gen.renderer.finish(i, Finish("length", Usage(len(gen.prompt.tokens), 0), zero)))
        out.append(gen.renderer.end())
        reply.chunk(b"".join(out))
        reply.end()
        self._forget(job)

    def _flush(self, job: Job) -> None:
        if job.out:
            data = b"".join(job.out)
            job.out.clear()
            job.flushed_at = time.perf_counter()
            job.tokens_flushed = job.tokens_flushed or any(c.count for c in job.choices)
            self._replies[job.req_id].chunk(data)

    # ---- stopping requests ---------------------------------------------------------------

    def _reap_cancelled(self) -> None:
        for job in [j for j in self._waiting if j.cancel.is_set()]:
            self._waiting.remove(job)
            self._cancelled(job, self._replies[job.req_id], None)
        for job in list({id(j): j for j in self._jobs_by_handle.values()}.values()):
            if job.cancel.is_set():
                self._release_all(job)
                self._cancelled(job, self._replies[job.req_id], job)

    def _cancelled(self, job: Job, reply: Reply, running: Job | None) -> None:
        tokens = sum(c.count for c in job.choices)
        if self._stopping:
            # The worker is being stopped: the client did nothing wrong and may retry.
            log.info("request %d stopped by shutdown after %d tokens", job.req_id, tokens)
            self._fail(job, ErrorKind.UNAVAILABLE, "the model was unloaded while generating; retry", reply)
            return
        if job.stop_reason is not None:  # a DELETE, or a newer request for its conversation
            log.info("request %d stopped after %d tokens: %s", job.req_id, tokens, job.stop_reason)
            self._fail(job, ErrorKind.CANCELLED, f"request stopped: {job.stop_reason}", reply)
            return
        # The client went away. Generation stops within one token; tests read this line.
        log.info("request %d cancelled after %d tokens", job.req_id, tokens)
        self._flush_if_replying(job)
        reply.backlog.clear()  # nobody will read it
        reply.end()
        self._end(job)

    def _fail(self, job: Job, kind: ErrorKind, message: str, reply: Reply | None = None) -> None:
        assert self._sink is not None
        reply = reply or self._replies.get(job.req_id) or Reply(self._sink, job, self._streams)
        self._release_all(job)
        self._flush_if_replying(job)
        event = job.gen.renderer.fail(kind, message) if job.gen is not None else None
        reply.fail(kind, message, None, event)
        self._end(job)

    def _flush_if_replying(self, job: Job) -> None:
        if job.req_id in self._replies:
            self._flush(job)

    def _release_all(self, job: Job) -> None:
        batcher = self._backend.batcher
        for choice in job.choices:
            if not choice.done:
                choice.done = True
                batcher.release(choice.handle)
            self._running.pop(choice.handle, None)
            self._jobs_by_handle.pop(choice.handle, None)

    def _abandon_all(self) -> None:
        """The worker stops: everything still waiting or running ends now."""
        for job in list(self._waiting):
            self._waiting.remove(job)
            self._cancelled(job, self._replies[job.req_id], None)
        for job in list({id(j): j for j in self._jobs_by_handle.values()}.values()):
            self._release_all(job)
            self._cancelled(job, self._replies[job.req_id], job)

    def _end(self, job: Job) -> None:
        if job.choices and any(c.handle in self._running for c in job.choices):
            self._release_all(job)
        reply = self._replies.get(job.req_id)
        if reply is not None and job.choices and not job.finished:
            self.active -= 1
        job.finished = True
        if reply is not None and reply.end_held is not None:
            return  # its last bytes wait for the client: forgotten once they went out
        self._replies.pop(job.req_id, None)
        self._forget(job)

    def _forget(self, job: Job) -> None:
        with self._lock:
            self._pending.pop(job.req_id, None)


def _slots_needed(job: Job) -> int:
    return job.gen.spec.n if job.gen is not None else 1


class _Wake:
    """Put in the job queue to wake a blocked engine: a credit or a detach arrived."""


_WAKE = _Wake()
