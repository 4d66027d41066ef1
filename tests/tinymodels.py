"""Build tiny but real models for tests and benchmarks; nothing is downloaded.

`write_tiny_gguf` trains a byte-level BPE vocabulary with `tokenizers` on a small
built-in corpus and writes a llama-architecture GGUF with random F32 weights and a
ChatML chat template. llama.cpp loads it in milliseconds and generates (random)
text from it through exactly the code paths a real model uses.

`write_tiny_mlx` writes the same kind of model as a Hugging Face style folder
(config.json, model.safetensors, tokenizer.json, tokenizer_config.json with the
chat template), the layout mlx-lm loads.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello, world! How are you today? I am fine, thank you.",
    "A model server runs several local language models for everyone on the network.",
    "Streams of tokens flow from the worker to the router and on to the client.",
    "Numbers 0123456789 and symbols {}[]()<>:;,.!? appear in JSON and code.",
    "def main():\n    print('hello')\n    return 0\n",
    '{"name": "value", "count": 42, "ok": true, "items": [1, 2, 3]}',
    "The sky is blue, the grass is green, and the sun is bright.",
    "Once upon a time there was a small computer in a quiet house.",
]


@dataclass(frozen=True)
class TinyShape:
    n_vocab_target: int = 320
    n_embd: int = 64
    n_head: int = 4
    n_head_kv: int = 2
    n_ff: int = 128
    n_layer: int = 2
    n_ctx_train: int = 512


# The benches' model sizes: the suite's own, and one with ~30M parameters (slower per token).
SHAPES = {"tiny": TinyShape(), "small": TinyShape(n_embd=512, n_head=8, n_head_kv=8, n_ff=1536, n_layer=8)}


def _train_tokenizer(n_vocab: int) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=n_vocab,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer)
    return tok


def _train_vocab(n_vocab: int) -> tuple[list[str], list[int], list[str]]:
    tok = _train_tokenizer(n_vocab)
    by_id = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
    tokens = [t for t, _ in by_id]
    assert [i for _, i in by_id] == list(range(len(tokens))), "vocab ids must be dense"
    types = [3 if t in SPECIAL_TOKENS else 1 for t in tokens]  # 3 = CONTROL, 1 = NORMAL
    raw_merges = json.loads(tok.to_str())["model"]["merges"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in raw_merges]
    return tokens, types, merges


def write_tiny_gguf(path: Path, seed: int = 0, shape: TinyShape | None = None) -> Path:
    """Write a loadable llama-architecture GGUF to `path` (atomically) and return it."""
    import gguf

    shape = shape or TinyShape()
    tokens, types, merges = _train_vocab(shape.n_vocab_target)
    n_vocab = len(tokens)
    rng = np.random.default_rng(seed)
    head_dim = shape.n_embd // shape.n_head

    def w(*dims: int) -> np.ndarray:
        return (rng.standard_normal(dims) * 0.5).astype(np.float32)

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    writer = gguf.GGUFWriter(str(tmp), "llama")
    writer.add_name(path.stem)
    writer.add_context_length(shape.n_ctx_train)
    writer.add_embedding_length(shape.n_embd)
    writer.add_block_count(shape.n_layer)
    writer.add_feed_forward_length(shape.n_ff)
    writer.add_head_count(shape.n_head)
    writer.add_head_count_kv(shape.n_head_kv)
    writer.add_rope_dimension_count(head_dim)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(n_vocab)
    writer.add_file_type(0)  # all F32
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(tokens.index("<|endoftext|>"))
    writer.add_eos_token_id(tokens.index("<|im_end|>"))
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHATML_TEMPLATE)

    n_kv = shape.n_head_kv * head_dim
    writer.add_tensor("token_embd.weight", w(n_vocab, shape.n_embd))
    for i in range(shape.n_layer):
        p = f"blk.{i}."
        writer.add_tensor(p + "attn_norm.weight", np.ones(shape.n_embd, dtype=np.float32))
        writer.add_tensor(p + "attn_q.weight", w(shape.n_embd, shape.n_embd))
        writer.add_tensor(p + "attn_k.weight", w(n_kv, shape.n_embd))
        writer.add_tensor(p + "attn_v.weight", w(n_kv, shape.n_embd))
        writer.add_tensor(p + "attn_output.weight", w(shape.n_embd, shape.n_embd))
        writer.add_tensor(p + "ffn_norm.weight", np.ones(shape.n_embd, dtype=np.float32))
        writer.add_tensor(p + "ffn_gate.weight", w(shape.n_ff, shape.n_embd))
        writer.add_tensor(p + "ffn_up.weight", w(shape.n_ff, shape.n_embd))
        writer.add_tensor(p + "ffn_down.weight", w(shape.n_embd, shape.n_ff))
    writer.add_tensor("output_norm.weight", np.ones(shape.n_embd, dtype=np.float32))
    writer.add_tensor("output.weight", w(n_vocab, shape.n_embd))

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(tmp, path)
    return path


def write_tiny_mlx(folder: Path, seed: int = 0, shape: TinyShape | None = None) -> Path:
    """Write a loadable mlx-lm model folder (built beside it, then renamed into place)."""
    from safetensors.numpy import save_file

    shape = shape or TinyShape()
    tok = _train_tokenizer(shape.n_vocab_target)
    n_vocab = tok.get_vocab_size()
    rng = np.random.default_rng(seed)
    head_dim = shape.n_embd // shape.n_head
    n_kv = shape.n_head_kv * head_dim

    def w(*dims: int) -> np.ndarray:
        return (rng.standard_normal(dims) * 0.5).astype(np.float32)

    weights = {"model.embed_tokens.weight": w(n_vocab, shape.n_embd)}
    for i in range(shape.n_layer):
        p = f"model.layers.{i}."
        weights |= {
            p + "input_layernorm.weight": np.ones(shape.n_embd, dtype=np.float32),
            p + "self_attn.q_proj.weight": w(shape.n_embd, shape.n_embd),
            p + "self_attn.k_proj.weight": w(n_kv, shape.n_embd),
            p + "self_attn.v_proj.weight": w(n_kv, shape.n_embd),
            p + "self_attn.o_proj.weight": w(shape.n_embd, shape.n_embd),
            p + "post_attention_layernorm.weight": np.ones(shape.n_embd, dtype=np.float32),
            p + "mlp.gate_proj.weight": w(shape.n_ff, shape.n_embd),
            p + "mlp.up_proj.weight": w(shape.n_ff, shape.n_embd),
            p + "mlp.down_proj.weight": w(shape.n_embd, shape.n_ff),
        }
    weights["model.norm.weight"] = np.ones(shape.n_embd, dtype=np.float32)
    weights["lm_head.weight"] = w(n_vocab, shape.n_embd)
    eos = tok.token_to_id("<|im_end|>")
    config = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": shape.n_embd,
        "num_hidden_layers": shape.n_layer,
        "intermediate_size": shape.n_ff,
        "num_attention_heads": shape.n_head,
        "num_key_value_heads": shape.n_head_kv,
        "rms_norm_eps": 1e-5,
        "vocab_size": n_vocab,
        "max_position_embeddings": shape.n_ctx_train,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "bos_token_id": tok.token_to_id("<|endoftext|>"),
        "eos_token_id": eos,
    }
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "chat_template": CHATML_TEMPLATE,
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "add_bos_token": False,
        "model_max_length": shape.n_ctx_train,
    }
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(weights, str(tmp / "model.safetensors"), metadata={"format": "mlx"})
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    (tmp / "tokenizer.json").write_text(tok.to_str())
    (tmp / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
    shutil.rmtree(folder, ignore_errors=True)  # a rename does not replace a non-empty folder
    os.replace(tmp, folder)
    return folder


if __name__ == "__main__":
    import sys

    out = Path(sys.argv[1] if len(sys.argv) > 1 else "tiny.gguf")
    print(write_tiny_gguf(out))
