"""Real (random) Llama checkpoints made in code, for tests, demos and benchmarks.

``make_tiny_llama`` writes a directory that ``transformers`` loads as a
``LlamaForCausalLM`` (config.json holds the fields ``LlamaConfig`` writes). With ``base=...`` it writes the base model's weights plus
``noise * randn`` -- a fake fine-tune sharing the base, so task vectors
(model - base) are small and meaningful, as they are for real fine-tunes.
Tensors are generated and written one at a time, so ~200M-parameter models
cost about one shard of memory.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import torch

from evomerge.io.checkpoint import Checkpoint, write_checkpoint


def llama_tensor_shapes(
    num_layers: int, hidden_size: int, intermediate_size: int, num_attention_heads: int,
    num_key_value_heads: int, vocab_size: int, tie_word_embeddings: bool,
) -> list[tuple[str, tuple[int, ...]]]:
    """Names and shapes of a LlamaForCausalLM's parameters, in HF order."""
    head_dim = hidden_size // num_attention_heads
    kv = num_key_value_heads * head_dim
    shapes = [("model.embed_tokens.weight", (vocab_size, hidden_size))]
    for i in range(num_layers):
        p = f"model.layers.{i}."
        shapes += [
            (p + "self_attn.q_proj.weight", (hidden_size, hidden_size)),
            (p + "self_attn.k_proj.weight", (kv, hidden_size)),
            (p + "self_attn.v_proj.weight", (kv, hidden_size)),
            (p + "self_attn.o_proj.weight", (hidden_size, hidden_size)),
            (p + "mlp.gate_proj.weight", (intermediate_size, hidden_size)),
            (p + "mlp.up_proj.weight", (intermediate_size, hidden_size)),
            (p + "mlp.down_proj.weight", (hidden_size, intermediate_size)),
            (p + "input_layernorm.weight", (hidden_size,)),
            (p + "post_attention_layernorm.weight", (hidden_size,)),
        ]
    shapes.append(("model.norm.weight", (hidden_size,)))
    if not tie_word_embeddings:
        shapes.append(("lm_head.weight", (vocab_size, hidden_size)))
    return shapes


def make_tiny_llama(
    path: str | Path,
    *,
    num_layers: int = 2,
    hidden_size: int = 32,
    intermediate_size: int = 64,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    vocab_size: int = 64,
    seed: int = 0,
    shards: int = 1,
    dtype: torch.dtype = torch.float32,
    tie_word_embeddings: bool = False,
    base: str | Path | None = None,
    noise: float = 0.0,
    tokenizer_from: str | Path | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a random LlamaForCausalLM directory at ``path`` and return it.

    Without ``base``: weights ~ N(0, 0.02), norms = 1. With ``base``: the base
    checkpoint's tensors plus ``noise * randn`` (its config is reused; the size
    arguments are ignored). ``shards > 1`` splits the weights into about that many
    roughly equal safetensors shards with an index.
    """
    path = Path(path)
    gen = torch.Generator().manual_seed(seed)
    if base is not None:
        src = Checkpoint(base)
        config = dict(src.config)
        shapes = [(name, src.shape(name)) for name in src.tensor_names]

        def tensors() -> Iterator[tuple[str, torch.Tensor]]:
            for name, _ in shapes:
                t = src.get(name).to(torch.float32)
                if noise:
                    t = t + noise * torch.randn(t.shape, generator=gen)
                yield name, t.to(dtype)
    else:
        config = _llama_config(num_layers, hidden_size, intermediate_size, num_attention_heads,
                               num_key_value_heads, vocab_size, tie_word_embeddings, dtype)
        shapes = llama_tensor_shapes(num_layers, hidden_size, intermediate_size, num_attention_heads,
                                     num_key_value_heads, vocab_size, tie_word_embeddings)

        def tensors() -> Iterator[tuple[str, torch.Tensor]]:
            for name, shape in shapes:
                if name.endswith("norm.weight"):
                    t = torch.ones(shape) + noise * torch.randn(shape, generator=gen)
                else:
                    t = torch.randn(shape, generator=gen) * 0.02
                yield name, t.to(dtype)

    config["torch_dtype"] = config["dtype"] = str(dtype).removeprefix("torch.")
    total = sum(math.prod(s) for _, s in shapes) * torch.empty((), dtype=dtype).element_size()
    max_shard = total + 1 if shards <= 1 else math.ceil(total / shards)
    layout = [(name, tuple(shape), dtype) for name, shape in shapes]
    return write_checkpoint(path, tensors(), config, tokenizer_from=tokenizer_from,
                            max_shard_size=max_shard, overwrite=overwrite, layout=layout)


def _llama_config(num_layers, hidden_size, intermediate_size, num_attention_heads,
                  num_key_value_heads, vocab_size, tie_word_embeddings, dtype) -> dict:
    # The fields LlamaConfig writes, spelled out: importing transformers costs seconds per process.
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_attention_heads,
        "num_key_value_heads": num_key_value_heads,
        "head_dim": hidden_size // num_attention_heads,
        "hidden_act": "silu",
        "max_position_embeddings": max(2048, 4 * vocab_size),
        "initializer_range": 0.02,
        "rms_norm_eps": 1e-6,
        "use_cache": True,
        "tie_word_embeddings": tie_word_embeddings,
        "rope_theta": 10000.0,
        "rope_scaling": None,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "pretraining_tp": 1,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
    }
