"""What each endpoint asks of the engine: a request body turned into either an answer
made at once (tokenize, embeddings, /props...) or a generation to run (a task, its
prompt tokens, how to sample it, how to read its output, how to render it).

Everything about a request that can be wrong is found here, before a slot is taken:
a bad body, a prompt over the context, a grammar llama.cpp cannot parse, a feature
the backend lacks. Those become RequestInvalid: a 400 (or 501) before any byte streams.
"""

from __future__ import annotations

import base64
import json
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

from protocol.errors import ErrorKind
from protocol.messages import Endpoint, ModelInfo, StoredTurn, WorkerConfig
from worker import messages_api, native_api, openai_api, responses_api, responses_render
from worker import openai_wire as w
from worker.backend import Backend, LazyGrammar, Prompt, SeqSpec
from worker.choice import OutputParser, PlainText
from worker.outputs import Delta, Finish, PromptProgress, Timings
from worker.schema import (
    ChatRequest,
    CompletionRequest,
    DetokenizeRequest,
    EmbeddingRequest,
    InfillRequest,
    NativeCompletionRequest,
    RequestInvalid,
    TokenizeRequest,
    parse,
)
from worker.singlechoice import SingleChoice
from worker.task import Message, Task
from worker.toolcalls import ChoiceParser
from worker.toolformat import (
    ToolFormat,
    calls_as_text,
    detect_format,
    template_tools,
    tools_system_prompt,
)

JSON = "application/json"


class Renderer(Protocol):
    """Turns a generation's outputs into the bytes its API's client receives."""

    content_type: str

    def start(self, prompt_tokens: int, cached_tokens: int) -> bytes: ...
    def progress(self, p: PromptProgress, t: Timings | None) -> bytes: ...
    def live(self, choice: int, t: Timings) -> None: ...  # timings for its next chunks
    def delta(self, choice: int, d: Delta) -> bytes: ...
    def finish(self, choice: int, f: Finish) -> bytes: ...
    def end(self) -> bytes: ...
    def fail(self, kind: ErrorKind, message: str) -> bytes: ...


@dataclass(frozen=True)
class Immediate:
    """An answer made at once, without a slot."""

    body: bytes
    content_type: str = JSON
    status: int = 200


@dataclass
class Generation:
    task: Task
    prompt: Prompt
    spec: SeqSpec
    renderer: Renderer
    parser: Callable[[], OutputParser]
    stops: tuple[str, ...]
    stored: Callable[[], StoredTurn | None] = lambda: None  # a Responses answer to keep
    response_id: str = ""


@dataclass(frozen=True)
class SeqProgress:
    n_decoded: int  # tokens generated so far
    n_remain: int  # tokens it may still generate
    paused: bool  # held back until its client reads (flow control)


class Endpoints:
    def __init__(self, backend: Backend, config: WorkerConfig, info: ModelInfo,
                 chat_template: str | None) -> None:
        self._backend = backend
        self._model = config.name
        self._config = config
        self._info = info
        self._vocab = openai_api.Vocab(info.n_vocab, lambda text: backend.tokenize(text, add_special=False),
                                       self._end_tokens)
        self._eog: tuple[int, ...] | None = None
        self._template = chat_template
        self._format: ToolFormat = detect_format(chat_template)
        # What each running sequence (by slot handle) is at, set by the engine every step;
        # /slots shows it.
        self.running: Mapping[int, SeqProgress] = {}

    def prepare(self, endpoint: Endpoint, body: bytes, stream_key: str | None,
                history: Sequence[StoredTurn]) -> Immediate | Generation:
        handler = _HANDLERS.get(endpoint)
        if handler is None:
            raise RequestInvalid(f"endpoint {endpoint.value!r} is not served by this model",
                                 kind=ErrorKind.UNSUPPORTED)
        return handler(self, body, stream_key, history)

    # ---- OpenAI chat and text completions ---------------------------------------------------

    def _chat(self, body: bytes, key: str | None, _h: Sequence[StoredTurn]) -> Generation:
        req = parse(body, ChatRequest)
        task = openai_api.chat_task(req, self._vocab, key)
        return self._generation(task, openai_api.ChatRenderer(self._model, task))

    def _chat_input_tokens(self, body: bytes, key: str | None, _h: Sequence[StoredTurn]) -> Immediate:
        req = parse(body, ChatRequest)
        task = openai_api.chat_task(req, self._vocab, key)
        prompt = self._chat_prompt(task)
        count = native_api.InputTokens(len(prompt.tokens), "response.input_tokens")
        return Immediate(native_api.encode(count))

    def _completion(self, body: bytes, key: str | None, _h: Sequence[StoredTurn]) -> Generation:
        req = parse(body, CompletionRequest)
        task = openai_api.completion_task(req, self._vocab, key)
        prompt = None
        if req.suffix:  # fill in the middle, where the model has the tokens for it
            if not isinstance(task.prompt, str):  # llama.cpp aborts on an id out of its vocabulary
                self._check_ids(task.prompt or (), "prompt")
            text = (task.prompt if isinstance(task.prompt, str)
                    else self._backend.detokenize(task.prompt or ()))
            prompt = self._infill_prompt(text, req.suffix, [], "")
        return self._generation(task, openai_api.CompletionRenderer(self._model, task), prompt)

    # ---- llama-server's native routes ---------------------------------------------------

    def _native(self, body: bytes, key: str | None, _h: Sequence[StoredTurn]) -> Generation:
        req = parse(body, NativeCompletionRequest)
        return self._native_generation(req, key, None)

    def _infill(self, body: bytes, key: str | None, _h: Sequence[StoredTurn]) -> Generation:
        req = parse(body, InfillRequest)
        extra = [(e.filename, e.text) for e in req.input_extra]
        text = req.prompt if isinstance(req.prompt, str) else ""
        prompt = self._infill_prompt(req.input_prefix, req.input_suffix, extra, text)
        return self._native_generation(req, key, prompt)

    def _native_generation(self, req: NativeCompletionRequest, key: str | None,
                           prompt: Prompt | None) -> Generation:
        n_probs = req.logprobs if req.logprobs is not None else req.n_probs
        if prompt is None:
            prompt = Prompt(tuple(self._mixed_tokens(req.prompt, add_special=True)))
            self._check_ids(prompt.tokens, "prompt")  # before the renderer detokenizes them
        task = Task(prompt=prompt.tokens, max_tokens=openai_api.max_tokens(req), stop=openai_api.stops(req),
                    sampling=openai_api.sampling(req, self._vocab), n=req.n,
                    # return_tokens needs each token's id, which travels with its log-probability
                    logprobs=n_probs if n_probs > 0 else (0 if req.return_tokens else None),
                    grammar=req.grammar,
                    json_schema=req.json_schema,
                    cache_prompt=req.cache_prompt, stream=bool(req.stream),
                    return_progress=bool(req.stream) and req.return_progress,
                    timings_per_token=bool(req.stream) and req.timings_per_token, conversation=key)
        settings = native_api.request_settings(task, n_probs, req.ignore_eos)
        renderer = native_api.NativeRenderer(self._model, self._backend.detokenize(prompt.tokens),
                                             len(prompt.tokens), bool(req.stream), n_probs, req.return_tokens,
                                             task.n, settings)
        return self._generation(task, renderer, prompt)

    def _end_tokens(self) -> tuple[int, ...]:
        """The vocabulary's end-of-generation tokens, found once (a pass over it is ~50 ms)."""
        if self._eog is None:
            self._eog = tuple(t for t in range(self._info.n_vocab) if self._backend.is_end(t))
        return self._eog

    def _check_ids(self, tokens: Sequence[int], param: str) -> None:
        bad = [t for t in tokens if not 0 <= t < self._info.n_vocab]
        if bad:
            raise RequestInvalid(f"{param} token {bad[0]} is not a token id of this model", param=param)

    def _tokenize(self, body: bytes, _k: str | None, _h: Sequence[StoredTurn]) -> Immediate:
        req = parse(body, TokenizeRequest)
        tokens = self._mixed_tokens(req.content, req.add_special, req.parse_special)
        pieces = [self._backend.piece(t) for t in tokens] if req.with_pieces else None
        return Immediate(native_api.tokens_body(tokens, pieces))

    def _detokenize(self, body: bytes, _k: str | None, _h: Sequence[StoredTurn]) -> Immediate:
        req = parse(body, DetokenizeRequest)
        bad = [t for t in req.tokens if not 0 <= t < self._info.n_vocab]
        if bad:
            raise RequestInvalid(f"token {bad[0]} is not a token id of this model "
                                 f"(0..{self._info.n_vocab - 1})",
                                 param="tokens")
        return Immediate(native_api.encode(native_api.Detokenized(self._backend.detokenize(req.tokens))))

    def _apply_template(self, body: bytes, key: str | None, _h: Sequence[StoredTurn]) -> Immediate:
        req = parse(body, ChatRequest)
        task = openai_api.chat_task(req, self._vocab, key)
        return Immediate(native_api.encode(native_api.Applied(self._chat_prompt(task).text)))

    def _embedding(self, body: bytes, _k: str | None, _h: Sequence[StoredTurn]) -> Immediate:
        req = parse(body, EmbeddingRequest)
        inputs = self._embedding_inputs(req.input)
        result = self._backend.embed(inputs, req.embd_normalize)
        data = []
        for i, vec in enumerate(result.vectors):
            emb: list[float] | str = vec
            if req.encoding_format == "base64":
                emb = base64.b64encode(struct.pack(f"<{len(vec)}f", *vec)).decode("ascii")
            data.append(w.EmbeddingOut(i, emb))
        usage = w.EmbeddingUsage(result.prompt_tokens, result.prompt_tokens)
        return Immediate(native_api.encode(w.EmbeddingList(data, self._model, usage)))

    def _embedding_inputs(self, raw: str | list[Any]) -> list[list[int]]:
        items: list[str | list[int]]
        if isinstance(raw, str):
            items = [raw]
        elif all(isinstance(t, int) for t in raw):
            items = [[int(t) for t in raw]]
        elif all(isinstance(t, str) for t in raw) or all(
                isinstance(t, list) and all(isinstance(x, int) for x in t) for t in raw):
            items = list(raw)
        else:
            raise RequestInvalid("input: a string, a list of strings, a list of token ids or a list of "
                                 "lists of token ids", param="input")
        out = []
        for i, item in enumerate(items):
            tokens = self._backend.tokenize(item, add_special=True) if isinstance(item, str) else list(item)
            if len(tokens) > self._backend.n_ctx:
                raise RequestInvalid(f"input[{i}] has {len(tokens)} tokens, more than the model's context of "
                                     f"{self._backend.n_ctx}", kind=ErrorKind.CONTEXT_LENGTH_EXCEEDED,
                                     param="input")
            bad = [t for t in tokens if not 0 <= t < self._info.n_vocab]
            if bad:
                raise RequestInvalid(f"input[{i}]: {bad[0]} is not a token id of this model", param="input")
            out.append(tokens)
        return out

    # ---- the Responses API and Anthropic's Messages API -----------------------------------

    def _responses(self, body: bytes, key: str | None, history: Sequence[StoredTurn]) -> Generation:
        task, options = responses_api.parse(body)
        if history:
            past = responses_api.history_messages([(t.request, t.response) for t in history])
            task = responses_api.with_history(task, options, past)
        task = replace(task, conversation=key)
        renderer = responses_render.ResponsesRenderer(self._model, options)
        gen = self._generation(task, SingleChoice(renderer, task.stream), None)
        gen.response_id = renderer.id
        if options.store:
            gen.stored = lambda: StoredTurn(body, renderer.response_bytes())
        return gen

    def _responses_input_tokens(self, body: bytes, key: str | None,
                                history: Sequence[StoredTurn]) -> Immediate:
        task, _ = responses_api.parse(body)
        return Immediate(responses_api.input_tokens_body(len(self._chat_prompt(task).tokens)))

    def _messages(self, body: bytes, key: str | None, _h: Sequence[StoredTurn]) -> Generation:
        task, options = messages_api.parse(body)
        task = replace(task, conversation=key)
        renderer = messages_api.MessagesRenderer(self._model, options)
        return self._generation(task, SingleChoice(renderer, task.stream, anthropic=True), None)

    def _count_tokens(self, body: bytes, _k: str | None, _h: Sequence[StoredTurn]) -> Immediate:
        task, _ = messages_api.parse_count_tokens(body)
        return Immediate(messages_api.count_tokens_body(len(self._chat_prompt(task).tokens)))

    # ---- building a generation ----------------------------------------------------------

    def _generation(self, task: Task, renderer: Renderer, prompt: Prompt | None = None) -> Generation:
        backend = self._backend
        if task.parallel_tool_calls is None:  # llama-server: the template's capability decides
            task = replace(task, parallel_tool_calls=self._format.parallel and self._format.renders_tools)
        if prompt is None:
            if task.messages is not None:
                prompt = self._chat_prompt(task)
            elif isinstance(task.prompt, str):
                prompt = Prompt(tuple(backend.tokenize(task.prompt, add_special=True)))
            else:
                prompt = Prompt(tuple(task.prompt or ()))
        field = "messages" if task.messages is not None else "prompt"
        n_ctx = backend.n_ctx
        if not prompt.tokens:
            raise RequestInvalid("the prompt is empty", param=field)
        if len(prompt.tokens) >= n_ctx:
            raise RequestInvalid(f"request ({len(prompt.tokens)} tokens) exceeds the available context size "
                                 f"({n_ctx} tokens), try increasing it",
                                 kind=ErrorKind.CONTEXT_LENGTH_EXCEEDED,
                                 param=field, sizes=(len(prompt.tokens), n_ctx))
        self._check_ids(prompt.tokens, field)
        if task.n > backend.batcher.parallel:
            raise RequestInvalid(f"n is {task.n}, more than this model's {backend.batcher.parallel} slots "
                                 "(its `parallel` option)", param="n")
        budget = n_ctx - len(prompt.tokens)
        max_tokens = min(task.max_tokens, budget) if task.max_tokens is not None else budget
        forced = bool(task.tools) and task.tool_choice.mode in ("required", "named")
        if not backend.supports_grammar and (forced or task.grammar is not None or task.json_object
                                             or task.json_schema is not None):
            param = "tool_choice" if forced else "grammar" if task.grammar is not None else "response_format"
            raise RequestInvalid(f"{param} needs a grammar, which the {self._info.backend} backend cannot "
                                 "apply (constrained decoding needs llama.cpp: serve this model as a GGUF)",
                                 kind=ErrorKind.UNSUPPORTED, param=param)
        grammar, lazy = self._grammar(task, prompt)
        spec = SeqSpec(prompt.tokens, task.sampling, max(max_tokens, 0), task.n, task.logprobs, grammar, lazy,
                       task.conversation, task.cache_prompt)
        fmt = self._format
        tools = task.tools if task.tool_choice.mode != "none" else ()
        thinking = prompt.thinking_started

        def parser() -> OutputParser:
            if not tools and task.reasoning.format == "none" and not thinking:
                return PlainText()
            return ChoiceParser(fmt, tools, task.reasoning.format, thinking, choice=task.tool_choice)

        stops = tuple(dict.fromkeys(task.stop + prompt.stop))
        return Generation(task, prompt, spec, renderer, parser, stops)

    def _chat_prompt(self, task: Task) -> Prompt:
        if task.parallel_tool_calls is None:
            task = replace(task, parallel_tool_calls=self._format.parallel and self._format.renders_tools)
        if task.messages is None:
            raise RequestInvalid("this route needs messages", param="messages")
        chars = sum(len(m.content) for m in task.messages)
        # A token is rarely less than one character: a prompt with this many more characters
        # than the context has tokens cannot fit, and is refused before templating it.
        if chars > 64 * self._backend.n_ctx:
            raise RequestInvalid(f"the messages hold {chars} characters: far more than fits the model's "
                                 f"context of {self._backend.n_ctx} tokens",
                                 kind=ErrorKind.CONTEXT_LENGTH_EXCEEDED, param="messages")
        fmt = self._format
        if "tool_calls" not in (self._template or "") and any(m.tool_calls for m in task.messages):
            task = replace(task, messages=calls_as_text(task.messages))
        if task.tools and task.tool_choice.mode != "none":
            kwargs = dict(task.chat_template_kwargs)
            kwargs.update({k: v for k, v in template_tools(fmt, task.tools).items() if k != "tools"})
            task = replace(task, chat_template_kwargs=tuple(kwargs.items()))
            if not fmt.renders_tools:  # the template cannot show the tools: a system message does
                text = tools_system_prompt(task.tools, bool(task.parallel_tool_calls))
                messages = list(task.messages or ())
                if messages and messages[0].role == "system":
                    messages[0] = replace(messages[0], content=messages[0].content + "\n\n" + text)
                else:
                    messages.insert(0, Message("system", text))
                task = replace(task, messages=tuple(messages))
        elif task.tools:
            task = replace(task, tools=())
        prompt = self._backend.chat_prompt(task)
        if not task.prefill:
            return prompt
        # The prefill is tokenized on its own: the template's text before it stays the
        # tokens a plain request has, so the prompt cache still matches.
        tail = self._backend.tokenize(task.prefill, add_special=False, parse_special=False)
        return Prompt(prompt.tokens + tuple(tail), prompt.text + task.prefill, prompt.stop, False)

    def _grammar(self, task: Task, prompt: Prompt) -> tuple[str | None, LazyGrammar | None]:
        if task.tools and task.tool_choice.mode in ("required", "named"):
            # Imported here: its JSON-schema converter is llama.cpp's, which an MLX-only
            # worker may not have (and MLX workers refuse grammars anyway).
            from worker.toolgrammar import tool_grammar

            try:
                return tool_grammar(self._format, task.tools, task.tool_choice,
                                    bool(task.parallel_tool_calls),
                                    thinking_started=prompt.thinking_started), None
            except ValueError as exc:
                raise RequestInvalid(str(exc), param="tool_choice") from exc
        if task.json_schema is not None:
            return _schema_grammar(task.json_schema), None
        if task.json_object:
            return openai_api.JSON_OBJECT_GBNF, None
        return task.grammar, None

    def _mixed_tokens(self, content: str | Sequence[int | str], add_special: bool,
                      parse_special: bool = True) -> list[int]:
        """llama-server's prompt forms: text, token ids, or a mix of both."""
        if isinstance(content, str):
            return self._backend.tokenize(content, add_special=add_special, parse_special=parse_special)
        out: list[int] = []
        for i, item in enumerate(content):
            if isinstance(item, str):
                out.extend(self._backend.tokenize(item, add_special=add_special and i == 0,
                                                  parse_special=parse_special))
            else:
                out.append(int(item))
        return out

    def _infill_prompt(self, prefix: str, suffix: str, extra: list[tuple[str, str]], prompt: str) -> Prompt:
        special = self._backend.special_tokens()
        if "fim_pre" not in special or "fim_suf" not in special or "fim_mid" not in special:
            raise RequestInvalid("infill is not supported by this model: it has no fill-in-the-middle tokens",
                                 kind=ErrorKind.UNSUPPORTED)
        tok = self._backend.tokenize
        context: list[int] = []
        for filename, text in extra:  # llama.cpp's repo-level FIM layout
            if "fim_rep" in special:
                context += [special["fim_rep"]]
            context += tok(f"{filename}\n" if filename else "", add_special=False)
            context += tok(text, add_special=False)
        tokens = [special["fim_pre"], *tok(prefix, add_special=False), special["fim_suf"],
                  *tok(suffix, add_special=False), special["fim_mid"], *tok(prompt, add_special=False)]
        if "bos" in special:
            tokens = [special["bos"], *context, *tokens]
        return Prompt(tuple(tokens))

    # ---- /props and /slots ----------------------------------------------------------------

    def _props(self, body: bytes, _k: str | None, _h: Sequence[StoredTurn]) -> Immediate:
        backend = self._backend
        special = backend.special_tokens()
        token_text = backend.token_text
        fmt = self._format
        caps = native_api.TemplateCaps(
            supports_tools=fmt.renders_tools and self._template is not None,
            supports_tool_calls=True, supports_parallel_tool_calls=fmt.parallel,
            supports_object_arguments=fmt.object_arguments)
        props = native_api.Props(
            native_api.GenerationSettings(backend.n_ctx), backend.batcher.parallel, self._model,
            self._config.path, native_api.Modalities(), self._template or "", caps,
            token_text(special["bos"]) if "bos" in special else "",
            token_text(special["eos"]) if "eos" in special else "", _build_info(self._info))
        return Immediate(native_api.encode(props))

    def _slots(self, body: bytes, _k: str | None, _h: Sequence[StoredTurn]) -> Immediate:
        idle = SeqProgress(0, -1, False)
        slots = []
        for s in self._backend.batcher.info():
            seq = self.running.get(s.handle, idle) if s.handle is not None else idle
            slots.append(native_api.SlotBody(
                s.id, s.n_ctx, False, s.is_processing, s.n_tokens,
                [native_api.NextToken(s.is_processing, n_remain=seq.n_remain, n_decoded=seq.n_decoded)],
                s.conversation, s.n_tokens, seq.paused))
        return Immediate(native_api.encode(slots))


def _schema_grammar(schema: dict[str, Any]) -> str:
    from llama_cpp.llama_grammar import json_schema_to_gbnf  # llama.cpp's own converter

    try:
        return str(json_schema_to_gbnf(json.dumps(schema)))
    except Exception as exc:
        raise RequestInvalid(f"invalid response_format/json_schema: {exc}", param="response_format") from exc


def _build_info(info: ModelInfo) -> str:
    return f"modelherd ({info.backend})"


_HANDLERS: dict[Endpoint, Callable[[Endpoints, bytes, str | None, Sequence[StoredTurn]],
                                   Immediate | Generation]] = {
    Endpoint.CHAT: Endpoints._chat,
    Endpoint.CHAT_INPUT_TOKENS: Endpoints._chat_input_tokens,
    Endpoint.COMPLETION: Endpoints._completion,
    Endpoint.EMBEDDING: Endpoints._embedding,
    Endpoint.NATIVE_EMBEDDING: Endpoints._embedding,
    Endpoint.RESPONSES: Endpoints._responses,
    Endpoint.RESPONSES_INPUT_TOKENS: Endpoints._responses_input_tokens,
    Endpoint.MESSAGES: Endpoints._messages,
    Endpoint.MESSAGES_COUNT_TOKENS: Endpoints._count_tokens,
    Endpoint.NATIVE_COMPLETION: Endpoints._native,
    Endpoint.INFILL: Endpoints._infill,
    Endpoint.TOKENIZE: Endpoints._tokenize,
    Endpoint.DETOKENIZE: Endpoints._detokenize,
    Endpoint.APPLY_TEMPLATE: Endpoints._apply_template,
    Endpoint.PROPS: Endpoints._props,
    Endpoint.SLOTS: Endpoints._slots,
}
