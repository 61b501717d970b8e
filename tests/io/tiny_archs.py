"""Tiny random checkpoints of real architectures, built by transformers from its config classes.

Each architecture gets a base model and two "fine-tunes" (the base plus Gaussian noise),
saved with ``save_pretrained`` (safetensors, the Hub's tensor layout: one tensor per
expert for MoE) and the zoo's tokenizer, so every command can run on them.
"""

from __future__ import annotations

from pathlib import Path

import torch

# model_type -> config class kwargs (hidden 32, 2 layers, 4 heads / 2 KV heads of dim 8)
COMMON = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.2,
              bos_token_id=1, eos_token_id=2, pad_token_id=0)
CONFIGS: dict[str, dict] = {
    "llama": {},
    "mistral": {},
    "qwen2": {},
    "qwen3": {"head_dim": 8},
    "phi3": {},
    "gemma2": {"head_dim": 8, "sliding_window": 8},
    "gemma3_text": {"head_dim": 8, "sliding_window": 8, "layer_types": ["sliding_attention", "full_attention"]},
    "gpt2": {},
    "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2},
    # layer 1 is dense (mlp_only_layers), so layer reordering must renumber that list
    "qwen2_moe": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 16,
                  "shared_expert_intermediate_size": 32, "mlp_only_layers": [1]},
    "qwen3_moe": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 16, "head_dim": 8},
}
ARCHS = list(CONFIGS)
MOE = {"mixtral", "qwen2_moe", "qwen3_moe"}


def config_for(model_type: str, vocab_size: int, num_layers: int = 2):
    from transformers import AutoConfig

    if model_type == "gpt2":
        return AutoConfig.for_model("gpt2", vocab_size=vocab_size, n_embd=32, n_layer=num_layers, n_head=4,
                                    n_positions=64, initializer_range=0.2, bos_token_id=1, eos_token_id=2,
                                    pad_token_id=0)
    kw = {**COMMON, **CONFIGS[model_type], "num_hidden_layers": num_layers}
    if "layer_types" in kw:  # one entry per layer
        kw["layer_types"] = [kw["layer_types"][i % len(kw["layer_types"])] for i in range(num_layers)]
    return AutoConfig.for_model(model_type, vocab_size=vocab_size, **kw)


def build_family(model_type: str, root: Path, noise: float = 0.05, names: tuple[str, ...] = ("base", "a", "b"),
                 num_layers: int = 2) -> dict[str, Path]:
    """``{names[0]: base, names[1:]: base + noise}`` -> model directories of one architecture under ``root``."""
    from transformers import AutoModelForCausalLM

    from evomerge.zoo.tokenizer import build_tokenizer, save_tokenizer

    vocab = build_tokenizer().get_vocab_size()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config_for(model_type, vocab, num_layers)).eval()
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    paths = {}
    for i, name in enumerate(names):
        if i:
            gen = torch.Generator().manual_seed(100 + i)
            with torch.no_grad():
                for key, param in model.state_dict().items():
                    if param.is_floating_point():
                        param.copy_(base_state[key] + noise * torch.randn(param.shape, generator=gen))
        out = root / name
        model.save_pretrained(out, safe_serialization=True)
        save_tokenizer(out)
        paths[name] = out
    return paths
