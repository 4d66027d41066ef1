"""Both backends through the real daemon: llama.cpp and mlx-lm workers side by side,
sampling parameters reaching each backend's sampler, prompt-cache reuse, and the
errors a model or a request gets when a backend cannot serve it."""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import httpx
import openai

from tests.conftest import BACKENDS
from tests.daemon import NO_EOS, Daemon

# Sampling fields beyond OpenAI's (llama-server's names), sent through the client's extra_body.
EXTRA = {"top_k", "min_p", "repeat_penalty"}


def say(client: openai.OpenAI, model: str, n: int = 12, **kw: object) -> str:
    extra = {k: v for k, v in kw.items() if k in EXTRA}
    openai_kw = {"logit_bias": NO_EOS, **{k: v for k, v in kw.items() if k not in EXTRA}}
    r = client.completions.create(model=model, prompt="Once upon a time", max_tokens=n,  # type: ignore[call-overload]
                                  extra_body=extra, **openai_kw)
    assert r.usage.completion_tokens == n
    return r.choices[0].text  # type: ignore[no-any-return]


def test_a_gguf_and_an_mlx_model_serve_at_once_from_their_own_workers(
        client: openai.OpenAI, daemon: Daemon) -> None:
    gguf, mlx = daemon.load("tiny-a"), daemon.load("mlx-long")
    assert gguf["pid"] != mlx["pid"] and None not in (gguf["pid"], mlx["pid"])
    assert (gguf["backend"], mlx["backend"]) == ("llama_cpp", "mlx")
    for entry in (gguf, mlx):
        assert entry["device"] in ("cpu", "metal", "cuda")
        assert entry["meta"]["backend"] == entry["backend"]  # type: ignore[index]
        assert entry["memory"]["backend"] > 0  # type: ignore[index]
    assert gguf["device_fallback"] is None  # it asked for no GPU (n_gpu_layers = 0)
    # mlx prefers the GPU: on a machine without one it says why it runs on the CPU.
    assert (mlx["device"] == "cpu") == (mlx["device_fallback"] is not None)

    # An MLX generation frozen mid-stream does not hold up the GGUF model.
    long = client.chat.completions.create(
        model="mlx-long", messages=[{"role": "user", "content": "go"}], max_tokens=8000,
        stream=True, logit_bias=NO_EOS)
    assert next(iter(long)).choices[0].delta.role == "assistant"
    mlx_pid = mlx["pid"]
    assert isinstance(mlx_pid, int)
    os.kill(mlx_pid, signal.SIGSTOP)
    try:
        assert say(client, "tiny-a", 5)
        long.close()
    finally:
        os.kill(mlx_pid, signal.SIGCONT)


@BACKENDS
def test_sampling_parameters_reach_the_sampler(client: openai.OpenAI, model: str) -> None:
    greedy = say(client, model, temperature=0.0)
    # Each of these alone leaves only the most likely token, whatever the temperature.
    assert say(client, model, temperature=1.5, top_k=1) == greedy
    assert say(client, model, temperature=1.5, top_p=1e-6) == greedy
    assert say(client, model, temperature=1.5, top_p=0.0) == greedy
    assert say(client, model, temperature=1.5, min_p=1.0) == greedy
    # Without them, that temperature samples something else from the same seed.
    assert say(client, model, temperature=1.5, seed=1) != greedy
    # A penalty for repeating changes what greedy decoding says (the tiny model loops).
    assert say(client, model, 30, temperature=0.0, repeat_penalty=1.5) != say(
        client, model, 30, temperature=0.0)
    for penalty in ("frequency_penalty", "presence_penalty"):
        assert say(client, model, 30, temperature=0.0, **{penalty: 2.0}) != say(
            client, model, 30, temperature=0.0)
    # Any integer is a seed: negative, past 64 bits, or llama.cpp's "random" 0xFFFFFFFF.
    for seed in (-1, 2**64 + 5, 0xFFFFFFFF):
        assert say(client, model, temperature=1.0, seed=seed) == say(
            client, model, temperature=1.0, seed=seed)


@BACKENDS
def test_logit_bias_forces_a_token(client: openai.OpenAI, model: str, models_dir: Path) -> None:
    vocab = json.loads((models_dir / "tiny-mlx" / "tokenizer.json").read_text())["model"]["vocab"]
    word, token = next((w, i) for w, i in sorted(vocab.items(), key=lambda kv: kv[1])
                       if len(w) >= 3 and w.isascii() and w.isalpha())  # both models share this vocabulary
    text = say(client, model, 6, temperature=1.0, logit_bias={str(token): 100})
    assert text == word * 6


@BACKENDS
def test_a_conversations_next_turn_reuses_the_prompt_cache(client: openai.OpenAI, model: str) -> None:
    turn1 = [{"role": "user", "content": f"Tell me about the fox ({model})."}]
    first = client.chat.completions.create(model=model, messages=turn1, max_tokens=8,  # type: ignore[arg-type]
                                           temperature=0.0, logit_bias=NO_EOS)
    reply = first.choices[0].message.content
    turn2 = [*turn1, {"role": "assistant", "content": reply}, {"role": "user", "content": "More."}]
    second = client.chat.completions.create(model=model, messages=turn2, max_tokens=8,  # type: ignore[arg-type]
                                            temperature=0.0, logit_bias=NO_EOS)
    assert first.usage is not None and second.usage is not None
    assert second.usage.prompt_tokens_details is not None
    # The first turn's prompt was not read again (at most its last token).
    assert second.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens - 1
    assert second.usage.prompt_tokens > first.usage.prompt_tokens


def test_features_an_mlx_model_lacks_are_400s_naming_them(daemon: Daemon) -> None:
    chat = {"model": "tiny-mlx", "messages": [{"role": "user", "content": "x"}], "max_tokens": 4}
    cases = [
        ("/v1/embeddings", {"model": "tiny-mlx", "input": "x"}, "model", "embeddings"),
        ("/v1/chat/completions", {**chat, "grammar": 'root ::= "x"'}, "grammar", "grammar"),
        ("/v1/chat/completions", {**chat, "response_format": {"type": "json_object"}}, "response_format",
         "response_format"),
    ]
    with daemon.client() as c:
        for path, body, param, named in cases:
            r = c.post(path, json=body)
            assert r.status_code == 400, r.text
            error = r.json()["error"]
            assert (error["code"], error["param"], error["type"]) == ("unsupported", param,
                                                                      "invalid_request_error")
            assert named in error["message"]
        # The worker is fine afterwards.
        assert c.post("/v1/chat/completions", json=chat).status_code == 200


# ---- load failures ------------------------------------------------------------------------


def _failure(d: Daemon, model: str) -> dict[str, object]:
    with d.client() as c:
        r = c.post("/models/load", json={"model": model, "wait": True})
    assert r.status_code == 503, r.text
    status = d.models()[model]["status"]
    assert isinstance(status, dict) and status["value"] == "failed"
    return status


def test_an_unsupported_architecture_fails_with_mlx_lms_message(
        tmp_path: Path, models_dir: Path, isolated_env: dict[str, str]) -> None:
    odd = shutil.copytree(models_dir / "tiny-mlx", tmp_path / "models" / "odd")
    config = json.loads((odd / "config.json").read_text())
    config["model_type"] = "nosucharch"
    (odd / "config.json").write_text(json.dumps(config))
    with Daemon("--models-dir", str(tmp_path / "models"), env=isolated_env) as d:
        assert d.models()["odd"]["backend"] == "mlx"  # discovered as a folder of safetensors
        assert "Model type nosucharch not supported" in str(_failure(d, "odd")["message"])


def test_without_mlx_installed_an_mlx_model_fails_saying_what_to_install(
        tmp_path: Path, models_dir: Path, isolated_env: dict[str, str]) -> None:
    # Python's own way to make a module unimportable: None in sys.modules. A
    # sitecustomize does it in every process of this daemon, workers included.
    hide = tmp_path / "hide"
    hide.mkdir()
    (hide / "sitecustomize.py").write_text("import sys\nsys.modules['mlx'] = sys.modules['mlx_lm'] = None\n")
    env = {**isolated_env, "PYTHONPATH": os.pathsep.join([str(hide), str(Path(__file__).parent.parent)])}
    (tmp_path / "c.toml").write_text(f"""
[server]
models_dirs = ["{models_dir}"]

[models.gpu-asked]
source = "{models_dir / 'tiny-a.gguf'}"
n_gpu_layers = -1
""")
    with Daemon("--config", str(tmp_path / "c.toml"), env=env) as d:
        message = str(_failure(d, "tiny-mlx")["message"])
        assert "needs mlx" in message and "install modelherd[mlx]" in message
        # GGUF models are unaffected; one that asks for a GPU this build lacks says so.
        entry = d.load("gpu-asked")
        if entry["device"] == "cpu":
            assert "without GPU offload" in str(entry["device_fallback"])
        else:
            assert entry["device_fallback"] is None
        with d.client() as c:
            r = c.post("/v1/completions", json={"model": "gpu-asked", "prompt": "x", "max_tokens": 2})
            assert r.status_code == 200, r.text


def test_the_models_listing_shows_each_models_backend(daemon: Daemon) -> None:
    with httpx.Client(base_url=daemon.url) as c:
        ids = {m["id"] for m in c.get("/v1/models").json()["data"]}
    assert {"tiny-mlx", "mlx-long"} <= ids
    models = daemon.models()
    assert models["tiny-mlx"]["origin"] == "models_dir" and models["mlx-long"]["origin"] == "config"
    assert models["tiny-mlx"]["backend"] == models["mlx-long"]["backend"] == "mlx"
