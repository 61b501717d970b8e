"""What each model architecture looks like to a merge: declared once, as data.

Everything in evomerge that needs to know a tensor name asks this module: the
checkpoint reader (how many layers), the merge engine (which tensors are layers,
which come before / after them, which config keys follow the layer count), the
genome spaces (per-module filters, where a data-flow residual scale is folded),
the backends (checkpoint layout -> runtime layout for an in-place weight swap)
and export.

An ``Architecture`` describes the *checkpoint* layout (the tensor names of a
Hugging Face safetensors directory, as on the Hub). Layer tensors are named
``{layer_prefix}{index}.{suffix}``; ``modules`` and ``residual_writers`` are
substrings of the suffix, so they double as mergekit parameter filters.

Residual scaling (Sakana's data-flow genes) is exact only if the scale is folded
into the tensors that *write* into the residual stream, and where that write
passes through a norm (Gemma2/3's post-attention / post-feed-forward norms),
into that norm's gain: a scale on the projection in front of a norm is cancelled
by it. ``norm_gain_offset`` marks norms whose gain is ``1 + weight`` (Gemma), so
scaling the gain by c stores ``c * (1 + w) - 1``, not ``c * w``.

An architecture the registry does not know is inferred only when its tensors are
exactly Llama's (pre-norm blocks ending in o_proj / down_proj, no other norms);
otherwise it is refused with a one-line error naming what is missing.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

from evomerge.errors import CheckpointError

# Genome module group -> architecture module keys it covers.
GENE_MODULES = {"attn": ("attention",), "mlp": ("mlp", "router", "experts")}


@dataclass(frozen=True)
class ExpertFusion:
    """Per-expert checkpoint tensors stacked (and concatenated) into one runtime parameter.

    transformers 5 keeps a MoE layer's experts as 3-D parameters: ``gate_up_proj``
    [experts, 2 * inter, hidden] = per expert cat(gate, up) along the output dim, and
    ``down_proj`` [experts, hidden, inter]. Checkpoints (Hub layout) hold one tensor per
    expert: ``{experts}.{e}.{part}``.
    """

    experts: str  # layer suffix of the expert list, e.g. "block_sparse_moe.experts"
    parts: tuple[str, ...]  # per-expert suffixes concatenated in this order, e.g. ("w1.weight", "w3.weight")
    runtime: str  # runtime layer suffix, e.g. "mlp.experts.gate_up_proj"


@dataclass(frozen=True)
class Architecture:
    """The tensor and config layout of one architecture's checkpoints."""

    name: str  # config.json model_type
    hf_classes: tuple[str, ...]  # config.json architectures
    layer_prefix: str = "model.layers."
    layer_count_key: str = "num_hidden_layers"
    per_layer_lists: tuple[str, ...] = ()  # config lists with one entry per layer (sliced with the layers)
    layer_index_lists: tuple[str, ...] = ()  # config lists of layer indices (renumbered with the layers)
    embeddings: tuple[str, ...] = ("model.embed_tokens.weight",)
    final_norm: tuple[str, ...] = ("model.norm.weight",)
    head: tuple[str, ...] = ("lm_head.weight",)
    tied: tuple[tuple[str, str], ...] = (("lm_head.weight", "model.embed_tokens.weight"),)  # (tied, owner)
    # module group -> layer-suffix substrings (mergekit filters): attention, mlp, router, experts
    modules: Mapping[str, tuple[str, ...]] = field(default_factory=lambda: {"attention": ("self_attn.",),
                                                                             "mlp": ("mlp.",)})
    norm_filters: tuple[str, ...] = ("norm",)  # substrings naming every norm tensor
    residual_writers: tuple[str, ...] = ("self_attn.o_proj.", "mlp.down_proj.")
    norm_gain_offset: bool = False  # RMSNorm gain is (1 + weight), as in Gemma
    expert_fusions: tuple[ExpertFusion, ...] = ()
    runtime_renames: tuple[tuple[str, str], ...] = ()  # layer-suffix prefix renames, checkpoint -> runtime
    inferred: bool = False

    # -- names ---------------------------------------------------------------------
    @property
    def layer_re(self) -> re.Pattern:
        return re.compile(rf"^{re.escape(self.layer_prefix)}(\d+)\.(.+)$")

    def split_layer(self, name: str) -> tuple[int, str] | None:
        """``(layer index, suffix)`` of a layer tensor, None for the rest."""
        m = self.layer_re.match(name)
        return (int(m.group(1)), m.group(2)) if m else None

    def is_pre(self, name: str) -> bool:
        """Tensors before the layers (embeddings), which a merge takes from its first slice."""
        return name in self.embeddings

    def module_filters(self, group: str) -> tuple[str, ...]:
        """mergekit filters of a genome module group ("attn" or "mlp")."""
        out: list[str] = []
        for key in GENE_MODULES[group]:
            out += self.modules.get(key, ())
        return tuple(dict.fromkeys(out))

    def separate_filters(self, part: str) -> tuple[str, ...]:
        """mergekit filters naming the embeddings, the norms or the head."""
        if part == "embed":
            return tuple(n.rsplit(".", 1)[0] for n in self.embeddings)
        if part == "lm_head":
            return tuple(n.rsplit(".", 1)[0] for n in self.head)
        if part == "norm":
            return self.norm_filters
        raise CheckpointError(f"unknown tensor group {part!r} (embed, norm, lm_head)")

    def is_residual_norm(self, name: str) -> bool:
        """A norm whose output is added to the residual stream (folded scales go into its gain)."""
        return self.norm_gain_offset and any(w in name for w in self.residual_writers)

    # -- config ----------------------------------------------------------------------
    def config_section(self, config: Mapping) -> Mapping:
        """The part of config.json holding the layer count (``text_config`` for multimodal wrappers)."""
        if self.layer_count_key not in config and isinstance(config.get("text_config"), dict):
            return config["text_config"]
        return config

    def num_layers(self, config: Mapping, where: str) -> int:
        section = self.config_section(config)
        if self.layer_count_key not in section:
            raise CheckpointError(f"{where} has no {self.layer_count_key} (the layer count of a {self.name} model)")
        try:
            return int(section[self.layer_count_key])
        except (TypeError, ValueError):
            raise CheckpointError(f"{where}: {self.layer_count_key} is not an integer "
                                  f"({section[self.layer_count_key]!r})") from None

    def with_layers(self, config: dict, source_layers: list[tuple[Mapping, int]]) -> dict:
        """``config`` rewritten for an output whose layer j is layer ``i`` of a source with config ``c``
        (``source_layers[j] = (c, i)``): the layer count and every per-layer key follow."""
        target = self.config_section(config)
        target[self.layer_count_key] = len(source_layers)
        for key in ("num_hidden_layers", "n_layer"):  # aliases some configs carry beside the real key
            if key != self.layer_count_key and key in target:
                target[key] = len(source_layers)
        for key in self.per_layer_lists:
            if isinstance(target.get(key), list):
                new = []
                for src_config, i in source_layers:
                    values = self.config_section(src_config).get(key) or target[key]
                    new.append(values[i])
                target[key] = new
        for key in self.layer_index_lists:
            if isinstance(target.get(key), list):
                target[key] = [j for j, (src_config, i) in enumerate(source_layers)
                               if i in (self.config_section(src_config).get(key) or [])]
        return target

    # -- checkpoint layout -> runtime layout ------------------------------------------
    def runtime_name(self, name: str) -> str:
        """The name transformers 5 (and mergekit 0.1.5, which writes that layout) gives the
        parameter holding checkpoint tensor ``name``: a fused expert tensor, a renamed module,
        or ``name`` itself."""
        split = self.split_layer(name)
        if split is None or not (self.expert_fusions or self.runtime_renames):
            return name
        layer, suffix = split
        for fusion in self.expert_fusions:
            m = re.match(rf"^{re.escape(fusion.experts)}\.\d+\.(.+)$", suffix)
            if m and m.group(1) in fusion.parts:
                return f"{self.layer_prefix}{layer}.{fusion.runtime}"
        for old, new in self.runtime_renames:
            if suffix.startswith(old):
                return f"{self.layer_prefix}{layer}.{new}{suffix[len(old):]}"
        return name

    def to_runtime(self, weights: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Weights named as in a checkpoint, renamed / fused as transformers 5 holds them in memory.

        Dense architectures come back unchanged (the same tensors); MoE experts are stacked.
        """
        if not self.expert_fusions and not self.runtime_renames:
            return dict(weights)
        out: dict[str, Tensor] = {}
        # (layer, fusion index) -> {expert: {part: tensor}}
        groups: dict[tuple[int, int], dict[int, dict[str, Tensor]]] = {}
        patterns = [re.compile(rf"^{re.escape(f.experts)}\.(\d+)\.(.+)$") for f in self.expert_fusions]
        for name, tensor in weights.items():
            split = self.split_layer(name)
            if split is not None:
                layer, suffix = split
                placed = False
                for k, (fusion, pattern) in enumerate(zip(self.expert_fusions, patterns)):
                    m = pattern.match(suffix)
                    if m and m.group(2) in fusion.parts:
                        groups.setdefault((layer, k), {}).setdefault(int(m.group(1)), {})[m.group(2)] = tensor
                        placed = True
                        break
                if placed:
                    continue
                for old, new in self.runtime_renames:
                    if suffix.startswith(old):
                        suffix = new + suffix[len(old):]
                        break
                name = f"{self.layer_prefix}{layer}.{suffix}"
            out[name] = tensor
        for (layer, k), experts in sorted(groups.items()):
            fusion = self.expert_fusions[k]
            ids = sorted(experts)
            if ids != list(range(len(ids))):
                raise CheckpointError(f"layer {layer} of the {self.name} weights has experts {ids}, not 0..{len(ids) - 1}")
            stacked = []
            for part in fusion.parts:
                missing = [e for e in ids if part not in experts[e]]
                if missing:
                    raise CheckpointError(f"weights lack tensor {self.layer_prefix}{layer}.{fusion.experts}."
                                          f"{missing[0]}.{part}")
                stacked.append(torch.stack([experts[e][part] for e in ids]))
            out[f"{self.layer_prefix}{layer}.{fusion.runtime}"] = (
                stacked[0] if len(stacked) == 1 else torch.cat(stacked, dim=1))
        return out


# --------------------------------------------------------------------------- the registry

_LLAMA = Architecture("llama", ("LlamaForCausalLM",), per_layer_lists=("layer_types",))

_GEMMA_NORMS = ("post_attention_layernorm.", "post_feedforward_layernorm.")

_MOE_QWEN_FUSIONS = (
    ExpertFusion("mlp.experts", ("gate_proj.weight", "up_proj.weight"), "mlp.experts.gate_up_proj"),
    ExpertFusion("mlp.experts", ("down_proj.weight",), "mlp.experts.down_proj"),
)

ARCHITECTURES: dict[str, Architecture] = {a.name: a for a in [
    _LLAMA,
    replace(_LLAMA, name="mistral", hf_classes=("MistralForCausalLM",)),
    replace(_LLAMA, name="qwen2", hf_classes=("Qwen2ForCausalLM",)),
    replace(_LLAMA, name="qwen3", hf_classes=("Qwen3ForCausalLM",)),
    # Phi-3 fuses q/k/v (qkv_proj) and gate/up (gate_up_proj); the blocks still end in o_proj / down_proj.
    replace(_LLAMA, name="phi3", hf_classes=("Phi3ForCausalLM",)),
    # Gemma2/3: sandwich norms -- each branch output is normed before the residual add,
    # so a residual scale must go into those norms' (1 + w) gains.
    replace(_LLAMA, name="gemma2", hf_classes=("Gemma2ForCausalLM",), residual_writers=_GEMMA_NORMS,
            norm_gain_offset=True),
    replace(_LLAMA, name="gemma3_text", hf_classes=("Gemma3ForCausalLM",), residual_writers=_GEMMA_NORMS,
            norm_gain_offset=True),
    Architecture(
        "gpt2", ("GPT2LMHeadModel",), layer_prefix="transformer.h.", layer_count_key="n_layer",
        embeddings=("transformer.wte.weight", "transformer.wpe.weight"),
        final_norm=("transformer.ln_f.weight", "transformer.ln_f.bias"),
        tied=(("lm_head.weight", "transformer.wte.weight"),),
        modules={"attention": ("attn.",), "mlp": ("mlp.",)}, norm_filters=("ln_",),
        # Conv1D weights ([in, out]) and their biases: a scalar scale of the write covers both.
        residual_writers=("attn.c_proj.", "mlp.c_proj."),
    ),
    replace(_LLAMA, name="mixtral", hf_classes=("MixtralForCausalLM",),
            modules={"attention": ("self_attn.",), "router": ("block_sparse_moe.gate.",),
                     "experts": ("block_sparse_moe.experts.",)},
            residual_writers=("self_attn.o_proj.", ".w2."),
            expert_fusions=(
                ExpertFusion("block_sparse_moe.experts", ("w1.weight", "w3.weight"), "mlp.experts.gate_up_proj"),
                ExpertFusion("block_sparse_moe.experts", ("w2.weight",), "mlp.experts.down_proj"),
            ),
            runtime_renames=(("block_sparse_moe.", "mlp."),)),
    # Qwen-MoE: routed experts, a shared expert (qwen2_moe) and possibly dense layers
    # (mlp_only_layers); every down_proj writes into the residual stream.
    replace(_LLAMA, name="qwen2_moe", hf_classes=("Qwen2MoeForCausalLM",), layer_index_lists=("mlp_only_layers",),
            modules={"attention": ("self_attn.",), "router": ("mlp.gate.", "mlp.shared_expert_gate."),
                     "experts": ("mlp.experts.", "mlp.shared_expert."), "mlp": ("mlp.",)},
            residual_writers=("self_attn.o_proj.", "down_proj."), expert_fusions=_MOE_QWEN_FUSIONS),
    replace(_LLAMA, name="qwen3_moe", hf_classes=("Qwen3MoeForCausalLM",), layer_index_lists=("mlp_only_layers",),
            modules={"attention": ("self_attn.",), "router": ("mlp.gate.",), "experts": ("mlp.experts.",),
                     "mlp": ("mlp.",)},
            residual_writers=("self_attn.o_proj.", "down_proj."), expert_fusions=_MOE_QWEN_FUSIONS),
]}

_noted: set[str] = set()


def _note(message: str) -> None:
    if message not in _noted:
        _noted.add(message)
        print(f"note: {message}", file=sys.stderr)


def architecture_of(config: Mapping, tensor_names: Iterable[str] | None = None, where: str = "model") -> Architecture:
    """The registry entry for a model's config.json (and tensor names, to infer unknown ones).

    ``where`` names the model in messages. Raises ``CheckpointError`` for an architecture
    that is neither registered nor safely inferable.
    """
    model_type = config.get("model_type")
    if not model_type and isinstance(config.get("text_config"), dict):
        model_type = config["text_config"].get("model_type")
    if model_type in ARCHITECTURES:
        return ARCHITECTURES[model_type]
    classes = list(config.get("architectures") or [])
    for arch in ARCHITECTURES.values():
        if any(c in arch.hf_classes for c in classes):
            return arch
    label = model_type or (",".join(classes) if classes else "unnamed")
    if tensor_names is None:
        raise CheckpointError(f"{where}: architecture {label} is not in evomerge's registry "
                              f"(known: {', '.join(ARCHITECTURES)})")
    problem = _llama_like_problem(config, list(tensor_names))
    if problem:
        raise CheckpointError(f"{where}: architecture {label} is not in evomerge's registry and cannot be "
                              f"inferred as Llama-like: {problem} (known: {', '.join(ARCHITECTURES)})")
    _note(f"{where}: architecture {label} is not in evomerge's registry; its tensors are Llama's, "
          "so it is merged as a Llama")
    return replace(_LLAMA, name=str(label), hf_classes=tuple(classes), inferred=True)


_LLAMA_LAYER_TENSORS = {
    "self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight", "self_attn.o_proj.weight",
    "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight",
    "input_layernorm.weight", "post_attention_layernorm.weight",
}
# Tensors a Llama-like block may carry besides those (biases, Qwen3's q/k norms inside attention).
_LLAMA_OPTIONAL = {"self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias",
                   "self_attn.o_proj.bias", "mlp.gate_proj.bias", "mlp.up_proj.bias", "mlp.down_proj.bias",
                   "self_attn.q_norm.weight", "self_attn.k_norm.weight"}


def _llama_like_problem(config: Mapping, names: list[str]) -> str | None:
    """Why these tensors are not safely a Llama (None when they are)."""
    if _LLAMA.layer_count_key not in _LLAMA.config_section(config):
        return "config.json has no num_hidden_layers"
    if _LLAMA.embeddings[0] not in names:
        return f"no tensor {_LLAMA.embeddings[0]}"
    if _LLAMA.final_norm[0] not in names:
        return f"no tensor {_LLAMA.final_norm[0]}"
    layers: dict[int, set[str]] = {}
    for name in names:
        split = _LLAMA.split_layer(name)
        if split is not None:
            layers.setdefault(split[0], set()).add(split[1])
        elif name not in (*_LLAMA.embeddings, *_LLAMA.final_norm, *_LLAMA.head):
            return f"tensor {name} is outside the layers and is not an embedding, final norm or head"
    if not layers:
        return f"no layer tensors named {_LLAMA.layer_prefix}N.*"
    for i, suffixes in sorted(layers.items()):
        missing = sorted(_LLAMA_LAYER_TENSORS - suffixes)
        if missing:
            return f"layer {i} has no {missing[0]}"
        extra = sorted(suffixes - _LLAMA_LAYER_TENSORS - _LLAMA_OPTIONAL)
        if extra:
            return f"layer {i} has tensor {extra[0]}, which a Llama block does not have"
    return None


def common_architecture(archs: Mapping[str, Architecture]) -> Architecture:
    """The one architecture shared by every source (``{model name: architecture}``), else a one-line error."""
    items = list(archs.items())
    if not items:
        raise CheckpointError("no source models")
    first, ref = items[0]
    for other, arch in items[1:]:
        if arch.name != ref.name:
            raise CheckpointError(f"architecture mismatch: {first} is {ref.name}, {other} is {arch.name}")
    return ref
