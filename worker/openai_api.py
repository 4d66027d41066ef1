"""OpenAI chat and text completions: request bodies to tasks, outputs to the exact bytes.

Streams follow OpenAI's chunk format with llama-server's choices where clients of
llama.cpp rely on them: a role chunk (`content: null`) before a choice's first piece,
no empty deltas, `reasoning_content` deltas, `system_fingerprint` on every chunk and
`timings` on the last one. The per-token chunk of plain text is built from a prefix and
a suffix made once per choice, so the hot path encodes only the text.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version

import msgspec

from protocol.errors import ErrorKind, error_body
from worker import openai_wire as w
from worker.outputs import (
    Delta,
    Finish,
    PromptProgress,
    Reasoning,
    Text,
    Timings,
    TokenLogprob,
    ToolCallArgs,
    ToolCallBegin,
)
from worker.schema import ChatRequest, CompletionRequest, RequestInvalid, message_text
from worker.schema import Sampling as SamplingFields
from worker.task import Message, Sampling, Task, Tool, ToolCall, ToolChoice, continuation
from worker.task import Reasoning as TaskReasoning

SSE = "text/event-stream"
JSON = "application/json"
DONE = b"data: [DONE]\n\n"
# OpenAI's seed is any integer; llama.cpp reads 0xFFFFFFFF as "random": taken modulo 2**32 - 1.
SEED_RANGE = 2**32 - 1
# The GBNF of any JSON object (response_format json_object), from llama.cpp's grammars/json.gbnf.
JSON_OBJECT_GBNF = r'''
root   ::= object
value  ::= object | array | string | number | ("true" | "false" | "null") ws
object ::= "{" ws ( string ":" ws value ("," ws string ":" ws value)* )? "}" ws
array  ::= "[" ws ( value ("," ws value)* )? "]" ws
string ::= "\"" ( [^"\\\x7F\x00-\x1F] | "\\" (["\\bfnrt] | "u" [0-9a-fA-F]{4}) )* "\"" ws
number ::= ("-"? ([0-9] | [1-9] [0-9]{0,15})) ("." [0-9]+)? ([eE] [-+]? [0-9] [1-9]{0,15})? ws
ws ::= | " " | "\n" [ \t]{0,20}
'''

_json = msgspec.json.Encoder()


def _fingerprint() -> str:
    try:
        return f"modelherd-{version('modelherd')}"
    except PackageNotFoundError:
        return "modelherd"


SYSTEM_FINGERPRINT = _fingerprint()


def new_id(prefix: str) -> str:
    return prefix + os.urandom(16).hex()


# ---- requests ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Vocab:
    """What reading a request needs of the model's vocabulary."""

    n: int
    tokenize: Callable[[str], list[int]]  # text, without special tokens
    end_tokens: Callable[[], tuple[int, ...]]  # every end-of-generation token


def logit_biases(raw: dict[str, float | bool] | list[tuple[int | str, float | bool]] | None,
                 vocab: Vocab) -> tuple[tuple[int, float], ...]:
    """A request's logit_bias as (token, bias) pairs, read as llama-server reads it."""
    items = raw.items() if isinstance(raw, dict) else (raw or ())
    out: list[tuple[int, float]] = []
    for key, value in items:
        if value is True:
            raise RequestInvalid("logit_bias: a bias is a number from -100 to 100, or false to ban the token",
                                 param="logit_bias")
        bias = -math.inf if value is False else float(value)
        if isinstance(key, int) or key.isdigit():
            token = int(key)
            if not 0 <= token < vocab.n:
                raise RequestInvalid(f"logit_bias key {key!r} is not a token id of this model "
                                     f"(0..{vocab.n - 1})", param="logit_bias")
            out.append((token, bias))
        else:  # text: every token it is made of
            out.extend((token, bias) for token in vocab.tokenize(key))
    return tuple(out)


def sampling(req: SamplingFields, vocab: Vocab) -> Sampling:
    d = Sampling()
    return Sampling(
        temperature=d.temperature if req.temperature is None else req.temperature,
        top_p=d.top_p if req.top_p is None else req.top_p,
        top_k=d.top_k if req.top_k is None else req.top_k,
        min_p=d.min_p if req.min_p is None else req.min_p,
        seed=None if req.seed is None else req.seed % SEED_RANGE,
        presence_penalty=req.presence_penalty or 0.0,
        frequency_penalty=req.frequency_penalty or 0.0,
        repeat_penalty=req.repeat_penalty or d.repeat_penalty,
        # ignore_eos bans the end tokens with -inf biases, as llama-server does (and shows)
        logit_bias=logit_biases(req.logit_bias, vocab)
        + (tuple((t, -math.inf) for t in vocab.end_tokens()) if req.ignore_eos else ()),
    )


def max_tokens(req: SamplingFields) -> int | None:
    if isinstance(req, ChatRequest) and req.max_completion_tokens:
        return req.max_completion_tokens
    if req.max_tokens:
        return req.max_tokens
    if req.n_predict is not None and req.n_predict >= 0:
        return req.n_predict
    return None


def stops(req: SamplingFields) -> tuple[str, ...]:
    return (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())


def chat_task(req: ChatRequest, vocab: Vocab, conversation: str | None) -> Task:
    messages = []
    for m in req.messages:
        role = "system" if m.role == "developer" else m.role
        calls = tuple(ToolCall(c.id, c.function.name, c.function.arguments) for c in m.tool_calls or ())
        messages.append(Message(role, message_text(m), calls, m.tool_call_id, m.name, m.reasoning_content))
    tools = []
    for i, spec in enumerate(req.tools or ()):
        if spec.type != "function" or spec.function is None:
            raise RequestInvalid(f"tools[{i}]: only function tools are supported, not {spec.type!r}",
                                 kind=ErrorKind.UNSUPPORTED, param="tools")
        f = spec.function
        tools.append(Tool(f.name, f.description, f.parameters or {"type": "object", "properties": {}},
                          bool(f.strict)))
    choice = _tool_choice(req, tools)
    json_schema, json_object = None, False
    fmt = req.response_format
    if fmt is not None and fmt.type != "text":
        json_schema = fmt.json_schema.schema if fmt.json_schema else fmt.schema
        json_object = json_schema is None
    if req.json_schema is not None:
        json_schema = req.json_schema
    if (json_schema is not None or json_object) and req.grammar is not None:
        raise RequestInvalid("use either grammar or response_format/json_schema, not both", param="grammar")
    constrained = req.grammar is not None or json_schema is not None or json_object
    if tools and choice.mode != "none" and constrained:
        raise RequestInvalid("tools cannot be combined with a grammar or response_format: the tool calls "
                             "have a grammar of their own; set tool_choice to \"none\" to use yours",
                             param="tools")
    logprobs = None
    if req.logprobs:
        logprobs = req.top_logprobs or 0
    enabled = req.thinking
    if enabled is None and req.reasoning_effort is not None:
        enabled = req.reasoning_effort not in ("none", "minimal")
    kwargs = dict(req.chat_template_kwargs or {})
    if enabled is None and isinstance(kwargs.get("enable_thinking"), bool):
        enabled = kwargs["enable_thinking"]
    reasoning_format = req.reasoning_format or "auto"
    if reasoning_format == "deepseek-legacy":
        reasoning_format = "none"
    messages, prefill, generation_prompt = continuation(messages, req.continue_final_message,
                                                        req.add_generation_prompt)
    return Task(
        messages=tuple(messages), prefill=prefill, tools=tuple(tools), tool_choice=choice,
        parallel_tool_calls=req.parallel_tool_calls, max_tokens=max_tokens(req), stop=stops(req),
        sampling=sampling(req, vocab), n=req.n, logprobs=logprobs, grammar=req.grammar,
        json_schema=json_schema, json_object=json_object,
        reasoning=TaskReasoning(enabled, reasoning_format),
        cache_prompt=req.cache_prompt, chat_template_kwargs=tuple(kwargs.items()),
        add_generation_prompt=generation_prompt, stream=bool(req.stream),
        return_progress=bool(req.stream) and req.return_progress,
        timings_per_token=bool(req.stream) and req.timings_per_token,
        include_usage=bool(req.stream_options and req.stream_options.include_usage),
        conversation=conversation)


def _tool_choice(req: ChatRequest, tools: list[Tool]) -> ToolChoice:
    choice = req.tool_choice
    if choice is None:
        return ToolChoice("auto" if tools else "none")
    if isinstance(choice, str):
        if choice != "none" and not tools:
            if choice == "required":
                raise RequestInvalid("tool_choice \"required\" needs at least one tool in tools",
                                     param="tool_choice")
            return ToolChoice("none")
        return ToolChoice(choice)
    name = choice.function.name if choice.function else None
    if choice.type != "function" or name is None:
        raise RequestInvalid(f"tool_choice of type {choice.type!r} is not supported; use \"auto\", "
                             "\"none\", \"required\" or {\"type\": \"function\", \"function\": {\"name\"}}",
                             kind=ErrorKind.UNSUPPORTED, param="tool_choice")
    if name not in {t.name for t in tools}:
        raise RequestInvalid(f"tool_choice names the function {name!r}, which is not in tools",
                             param="tool_choice")
    return ToolChoice("named", name)


def completion_task(req: CompletionRequest, vocab: Vocab, conversation: str | None) -> Task:
    prompt: str | tuple[int, ...]
    if isinstance(req.prompt, str):
        prompt = req.prompt
    elif all(isinstance(t, int) for t in req.prompt):
        prompt = tuple(int(t) for t in req.prompt)
    elif len(req.prompt) == 1:
        prompt = str(req.prompt[0])
    else:
        raise RequestInvalid("prompt: a string, a list of token ids, or a list of one string "
                             "(send one request per prompt)", param="prompt")
    return Task(prompt=prompt, max_tokens=max_tokens(req), stop=stops(req), sampling=sampling(req, vocab),
                n=req.n, logprobs=req.logprobs, grammar=req.grammar, json_schema=req.json_schema,
                cache_prompt=req.cache_prompt, stream=bool(req.stream),
                return_progress=bool(req.stream) and req.return_progress,
                timings_per_token=bool(req.stream) and req.timings_per_token,
                include_usage=bool(req.stream_options and req.stream_options.include_usage),
                conversation=conversation)


# ---- outputs -----------------------------------------------------------------------------


def usage(finishes: list[Finish]) -> w.UsageOut:
    first = finishes[0].usage
    completion = sum(f.usage.completion_tokens for f in finishes)
    return w.UsageOut(first.prompt_tokens, completion, first.prompt_tokens + completion,
                      w.PromptDetails(first.cached_tokens),
                      w.CompletionDetails(sum(f.usage.reasoning_tokens for f in finishes)))


def progress_out(p: PromptProgress) -> w.PromptProgressOut:
    return w.PromptProgressOut(p.total, p.cache, p.processed, p.time_ms)


def timings(f: Finish) -> w.TimingsOut:
    return timings_out(f.timings)


def timings_out(t: Timings) -> w.TimingsOut:
    return w.TimingsOut(t.cache_n, t.prompt_n, round(t.prompt_ms, 3), round(t.prompt_per_token_ms, 3),
                        round(t.prompt_per_second, 3), t.predicted_n, round(t.predicted_ms, 3),
                        round(t.predicted_per_token_ms, 3), round(t.predicted_per_second, 3))


def logprob_entry(t: TokenLogprob, native: bool = False) -> w.LogprobOut:
    top = [w.TopLogprobOut(x.token, x.logprob, list(x.bytes), x.id if native else msgspec.UNSET)
           for x in t.top]
    return w.LogprobOut(t.token, t.logprob, list(t.bytes), top, t.id if native else msgspec.UNSET)


class _ChatChoice:
    """One choice of a chat completion: what it said so far (for the whole answer)."""

    def __init__(self) -> None:
        self.text: list[str] = []
        self.reasoning: list[str] = []
        self.calls: list[w.ToolCallOut] = []
        self.logprobs: list[w.LogprobOut] = []
        self.started = False
        self.finish: Finish | None = None


class ChatRenderer:
    """Renders one chat completion (all its choices), streamed or whole."""

    def __init__(self, model: str, task: Task) -> None:
        self._model = model
        self._task = task
        self._stream = task.stream
        self.content_type = SSE if task.stream else JSON
        self._id = new_id("chatcmpl-")
        self._created = int(time.time())
        self._choices = [_ChatChoice() for _ in range(task.n)]
        self._live: list[w.TimingsOut | None] = [None] * task.n
        head = _json.encode({"id": self._id, "object": "chat.completion.chunk", "created": self._created,
                             "model": model, "system_fingerprint": SYSTEM_FINGERPRINT})[:-1]
        self._head = head
        tail = b',"usage":null}\n\n' if task.include_usage else b"}\n\n"
        self._tail = tail
        self._text_prefix = [b"data: " + head + b',"choices":[{"index":%d,"delta":{"content":' % i
                             for i in range(task.n)]
        self._text_suffix = b'},"logprobs":null,"finish_reason":null}]' + tail

    def start(self, prompt_tokens: int, cached_tokens: int) -> bytes:
        return b""

    def progress(self, p: PromptProgress, t: Timings | None) -> bytes:
        """llama-server's progress chunk: an empty assistant delta carrying prompt_progress."""
        chunk = w.ChatChunk(self._id, self._created, self._model, SYSTEM_FINGERPRINT,
                            [w.ChunkChoice(0, w.ChatDelta(role="assistant", content=None))],
                            prompt_progress=progress_out(p))
        if t is not None:
            chunk.timings = timings_out(t)
        if self._task.include_usage:
            chunk.usage = None
        return b"data: " + _json.encode(chunk) + b"\n\n"

    def live(self, choice: int, t: Timings) -> None:
        self._live[choice] = timings_out(t)

    def delta(self, choice: int, d: Delta) -> bytes:
        c = self._choices[choice]
        if isinstance(d, Text):
            c.text.append(d.text)
            c.logprobs.extend(logprob_entry(t) for t in d.logprobs)
        elif isinstance(d, Reasoning):
            c.reasoning.append(d.text)
        elif isinstance(d, ToolCallBegin):
            c.calls.append(w.ToolCallOut(d.id, w.FunctionOut(d.name, "")))
        else:
            call = c.calls[-1]
            call.function.arguments += d.text
        if not self._stream:
            return b""
        out = b""
        if not c.started:
            c.started = True
            # as llama-server: the role chunk carries no timings, the text's chunks do
            out = self._chunk(choice, w.ChatDelta(role="assistant", content=None), timed=False)
        if isinstance(d, Text) and not d.logprobs and self._live[choice] is None:
            return out + self._text_prefix[choice] + _json.encode(d.text) + self._text_suffix
        if isinstance(d, Text):
            logprobs = w.ChatLogprobs([logprob_entry(t) for t in d.logprobs])
            return out + self._chunk(choice, w.ChatDelta(content=d.text), logprobs)
        if isinstance(d, Reasoning):
            return out + self._chunk(choice, w.ChatDelta(reasoning_content=d.text))
        if isinstance(d, ToolCallBegin):
            begin = w.ToolCallDelta(d.index, w.FunctionOut(d.name, ""), d.id, "function")
            return out + self._chunk(choice, w.ChatDelta(tool_calls=[begin]))
        assert isinstance(d, ToolCallArgs)
        return out + self._chunk(choice, w.ChatDelta(tool_calls=[w.ToolCallDelta(d.index, w.FunctionOut(
            arguments=d.text))]))

    def finish(self, choice: int, f: Finish) -> bytes:
        c = self._choices[choice]
        c.finish = f
        if not self._stream:
            return b""
        last = all(x.finish is not None for x in self._choices)
        chunk = w.ChatChunk(self._id, self._created, self._model, SYSTEM_FINGERPRINT,
                            [w.ChunkChoice(choice, w.ChatDelta(), None, f.reason)])
        if self._task.include_usage:
            chunk.usage = None
        elif last:  # llama-server: timings ride on the last object of the stream
            chunk.timings = timings(f)
        return b"data: " + _json.encode(chunk) + b"\n\n"

    def end(self) -> bytes:
        finishes = [c.finish for c in self._choices if c.finish is not None]
        if self._stream:
            if not self._task.include_usage:
                return DONE
            chunk = w.ChatChunk(self._id, self._created, self._model, SYSTEM_FINGERPRINT, [],
                                usage=usage(finishes), timings=timings(finishes[-1]))
            return b"data: " + _json.encode(chunk) + b"\n\n" + DONE
        choices = []
        for i, c in enumerate(self._choices):
            assert c.finish is not None
            message = w.ChatMessage("".join(c.text))
            if c.reasoning:
                message.reasoning_content = "".join(c.reasoning)
            if c.calls:
                message.tool_calls = c.calls
            logprobs = w.ChatLogprobs(c.logprobs) if self._task.logprobs is not None else None
            choices.append(w.ChatChoice(i, message, logprobs, c.finish.reason))
        body = w.ChatCompletion(self._id, self._created, self._model, SYSTEM_FINGERPRINT, choices,
                                usage(finishes), timings(finishes[-1]))
        return _json.encode(body)

    def fail(self, kind: ErrorKind, message: str) -> bytes:
        return b"data: " + error_body(kind, message) + b"\n\n"

    def _chunk(self, choice: int, delta: w.ChatDelta, logprobs: w.ChatLogprobs | None = None,
               timed: bool = True) -> bytes:
        chunk = w.ChatChunk(self._id, self._created, self._model, SYSTEM_FINGERPRINT,
                            [w.ChunkChoice(choice, delta, logprobs)])
        live = self._live[choice]
        if live is not None and timed:
            chunk.timings = live
        if self._task.include_usage:
            chunk.usage = None
        return b"data: " + _json.encode(chunk) + b"\n\n"


class CompletionRenderer:
    """Renders one text completion (all its choices), streamed or whole."""

    def __init__(self, model: str, task: Task) -> None:
        self._model = model
        self._task = task
        self._stream = task.stream
        self.content_type = SSE if task.stream else JSON
        self._id = new_id("cmpl-")
        self._created = int(time.time())
        self._texts: list[list[str]] = [[] for _ in range(task.n)]
        self._logprobs: list[list[TokenLogprob]] = [[] for _ in range(task.n)]
        self._finishes: list[Finish | None] = [None] * task.n
        self._live: list[w.TimingsOut | None] = [None] * task.n

    def start(self, prompt_tokens: int, cached_tokens: int) -> bytes:
        return b""

    def progress(self, p: PromptProgress, t: Timings | None) -> bytes:
        body = w.TextCompletion(self._id, self._created, self._model, SYSTEM_FINGERPRINT,
                                [w.TextChoice(0, "", None, None)], prompt_progress=progress_out(p))
        if t is not None:
            body.timings = timings_out(t)
        if self._task.include_usage:
            body.usage = None
        return b"data: " + _json.encode(body) + b"\n\n"

    def live(self, choice: int, t: Timings) -> None:
        self._live[choice] = timings_out(t)

    def delta(self, choice: int, d: Delta) -> bytes:
        if not isinstance(d, Text):
            return b""  # reasoning and tool calls have no place in a text completion
        self._texts[choice].append(d.text)
        self._logprobs[choice].extend(d.logprobs)
        if not self._stream:
            return b""
        logprobs = self._legacy(list(d.logprobs), 0) if self._task.logprobs is not None else None
        out = w.TextCompletion(self._id, self._created, self._model, SYSTEM_FINGERPRINT,
                               [w.TextChoice(choice, d.text, logprobs, None)])
        live = self._live[choice]
        if live is not None:
            out.timings = live
        if self._task.include_usage:
            out.usage = None
        return b"data: " + _json.encode(out) + b"\n\n"

    def finish(self, choice: int, f: Finish) -> bytes:
        self._finishes[choice] = f
        if not self._stream:
            return b""
        last = all(x is not None for x in self._finishes)
        return self._out([w.TextChoice(choice, "", None, f.reason)], last and not self._task.include_usage)

    def end(self) -> bytes:
        finishes = [f for f in self._finishes if f is not None]
        if self._stream:
            if not self._task.include_usage:
                return DONE
            body = w.TextCompletion(self._id, self._created, self._model, SYSTEM_FINGERPRINT, [],
                                    usage=usage(finishes), timings=timings(finishes[-1]))
            return b"data: " + _json.encode(body) + b"\n\n" + DONE
        choices = []
        for i, f in enumerate(self._finishes):
            assert f is not None
            logprobs = self._legacy(self._logprobs[i], 0) if self._task.logprobs is not None else None
            choices.append(w.TextChoice(i, "".join(self._texts[i]), logprobs, f.reason))
        return _json.encode(w.TextCompletion(self._id, self._created, self._model, SYSTEM_FINGERPRINT,
                                             choices,
                                             usage=usage(finishes), timings=timings(finishes[-1])))

    def fail(self, kind: ErrorKind, message: str) -> bytes:
        return b"data: " + error_body(kind, message) + b"\n\n"

    def _out(self, choices: list[w.TextChoice], with_timings: bool = False) -> bytes:
        body = w.TextCompletion(self._id, self._created, self._model, SYSTEM_FINGERPRINT, choices)
        if self._task.include_usage:
            body.usage = None
        if with_timings:
            f = self._finishes[choices[0].index]
            assert f is not None
            body.timings = timings(f)
        return b"data: " + _json.encode(body) + b"\n\n"

    def _legacy(self, tokens: list[TokenLogprob], offset: int) -> w.CompletionLogprobs:
        offsets = []
        for t in tokens:
            offsets.append(offset)
            offset += len(t.token)
        return w.CompletionLogprobs([t.token for t in tokens], [t.logprob for t in tokens],
                                    [{x.token: x.logprob for x in t.top} for t in tokens], offsets)
