"""Hugging Face transformers backend: one resident model, weights swapped in place.

The model is built once from ``model_dir``. ``load_weights`` copies candidate tensors into
the existing parameters (no rebuild, no disk) unless the architecture changed (e.g. a
data-flow merge with a different layer count), in which case the model is rebuilt from the
candidate's config. Scoring is batched: greedy generation with left padding and a KV cache,
or the summed log-likelihood of each choice for multiple choice.
"""

from __future__ import annotations

import inspect
import os
import sys
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import torch
from torch import Tensor

from evomerge.backends.base import (ItemResult, check_indices, choice_rows, finite_stream, graded_results,
                                    harness_results, layer_template, likelihood_rows, pad_with_identity_layers,
                                    pick_choices, same_but_depth)
from evomerge.errors import CheckpointError
from evomerge.io.architectures import architecture_of
from evomerge.tasks.task import Task

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# Config keys that fix parameter shapes or per-layer behaviour; any change means the model must be
# rebuilt. The architecture's own layer-count key (``n_layer`` for GPT-2) is added per model.
SHAPE_KEYS = ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
              "num_key_value_heads", "vocab_size", "tie_word_embeddings", "head_dim", "model_type",
              "n_layer", "n_embd", "n_head", "n_inner", "num_local_experts", "num_experts", "moe_intermediate_size",
              "shared_expert_intermediate_size", "layer_types", "mlp_only_layers")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def load_tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    if not any((model_dir / f).exists() for f in TOKENIZER_FILES):
        raise CheckpointError(f"{model_dir}: no tokenizer files (expected tokenizer.json or tokenizer_config.json)")
    try:
        tok = AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=False)
    except Exception as exc:  # transformers raises many types here
        raise CheckpointError(f"{model_dir}: cannot load tokenizer ({type(exc).__name__}: {str(exc).splitlines()[0]})") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def _config_object(config: dict):
    from transformers import AutoConfig

    config = dict(config)
    model_type = config.pop("model_type", None)
    if model_type is None:
        raise CheckpointError("model config has no 'model_type'")
    return AutoConfig.for_model(model_type, **config)


def runtime_stream(arch, tensors: Iterator[tuple[str, Tensor]]) -> Iterator[tuple[str, Tensor]]:
    """Checkpoint-named tensors renamed / fused as transformers holds them (``Architecture.to_runtime``),
    as a stream: dense architectures pass through; where experts are fused, one layer's tensors
    are gathered (a merge yields a layer's tensors together) and converted when the next begins."""
    if not arch.expert_fusions and not arch.runtime_renames:
        yield from tensors
        return
    layer, pending = None, {}
    for name, tensor in tensors:
        split = arch.split_layer(name)
        here = split[0] if split is not None else None
        if pending and here != layer:
            yield from arch.to_runtime(pending).items()
            pending = {}
        layer = here
        pending[name] = tensor
    if pending:
        yield from arch.to_runtime(pending).items()


def _in_worker_pool() -> bool:
    if os.environ.get("EVOMERGE_WORKER"):
        return True
    ray = sys.modules.get("ray")
    try:
        return bool(ray and ray.is_initialized() and ray.get_runtime_context().get_actor_id())
    except Exception:                      # not inside a Ray actor
        return False


class HFBackend:
    def __init__(self, model_dir: str | Path, device: str = "cpu", dtype: str | torch.dtype | None = None,
                 batch_size: int = 64, num_threads: int | None = None, allow_bin: bool = False,
                 layer_capacity: int | None = None):
        """``num_threads``: torch intra-op threads for this process. Default: 1 inside a worker
        pool (a Ray actor, or ``EVOMERGE_WORKER`` set), where workers already fill the cores
        and tiny matmuls lose more to thread hand-offs than they gain; else torch's default.
        ``layer_capacity``: the most layers a candidate may have (a data-flow genome's
        ``max_layers``): the model is built that deep once, and a shallower candidate fills
        the spare layers with identity layers (``base.pad_with_identity_layers``) instead of
        a rebuild."""
        from transformers import AutoConfig, AutoModelForCausalLM

        self.model_dir = Path(model_dir)
        if not (self.model_dir / "config.json").exists():
            raise CheckpointError(f"{self.model_dir}: not a model directory (no config.json)")
        if num_threads is None and _in_worker_pool():
            num_threads = 1
        if num_threads:
            torch.set_num_threads(num_threads)
        self.device = torch.device(device)
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype)
        self.dtype = dtype or (torch.float32 if self.device.type == "cpu" else torch.bfloat16)
        self.batch_size = batch_size
        self.tokenizer = load_tokenizer(self.model_dir)
        has_safetensors = any(self.model_dir.glob("*.safetensors"))
        if not has_safetensors and not allow_bin:
            raise CheckpointError(f"{self.model_dir}: no .safetensors weights (pickled .bin needs allow_bin=True)")
        try:
            hf_config = AutoConfig.from_pretrained(str(self.model_dir), trust_remote_code=False)
            self.model = AutoModelForCausalLM.from_pretrained(
                str(self.model_dir), config=hf_config, dtype=self.dtype, use_safetensors=has_safetensors,
                trust_remote_code=False,
            )
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{self.model_dir}: cannot load model ({str(exc).splitlines()[0]})") from None
        self.model.to(self.device).eval()
        self.config = self.model.config.to_dict()
        # transformers 5.x renamed past_key_values -> cache
        self._cache_kw = "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"
        self.rebuilds = 0                  # how often load_weights had to rebuild (observability)
        self._depth_from_config: bool | None = None
        from evomerge.io.checkpoint import Checkpoint

        self._tensor_names: list[str] = []
        if has_safetensors:                # one layer's tensors, in checkpoint names: what a spare layer holds
            ck = Checkpoint(self.model_dir)
            self._tensor_names = list(ck.tensor_names)
            arch = architecture_of(self.config, ck.tensor_names, where=str(self.model_dir))
            self._template = layer_template({n: ck.shape(n) for n in ck.tensor_names},
                                            {n: ck.dtype(n) for n in ck.tensor_names}, arch.layer_prefix)
            depth = int(self.config.get(arch.layer_count_key, 0))
            if layer_capacity and layer_capacity > depth and self._template:
                # rebuilt this deep up front (not a restart), the checkpoint's layers first
                self.load_stream(((n, ck.get(n, mapped=True)) for n in ck.tensor_names), dict(self.config),
                                 min_layers=layer_capacity)
                self.rebuilds = 0
        else:
            self._template = {}

    # ------------------------------------------------------------ weights
    def _params(self) -> dict[str, Tensor]:
        # named_parameters drops tied duplicates (lm_head.weight when embeddings are tied)
        return dict(self.model.named_parameters())

    def load_weights(self, weights: dict[str, Tensor], config: dict, min_layers: int = 0) -> None:
        """Swap a candidate's weights (checkpoint names, as a merge makes them) into the model.

        A shallower candidate is first padded with identity layers (``_fill_spare_layers``).
        The registry maps checkpoint names to the runtime's: transformers 5 holds a MoE
        layer's experts as fused 3-D parameters where checkpoints have one tensor per expert.
        Every name is checked before anything is copied (``load_stream`` checks as it goes).
        """
        arch = architecture_of(config, weights.keys(), where=f"candidate for {self.model_dir}")
        layers = config.get(arch.layer_count_key)
        weights, config = self._fill_spare_layers(weights, config, min_layers, arch)
        weights = arch.to_runtime(weights)
        self._rebuild_if_changed(config, arch)
        params = self._params()
        missing = [n for n in params if n not in weights]
        if missing:
            raise CheckpointError(f"candidate weights lack tensor {missing[0]} ({len(missing)} missing)")
        tied_names = self._tied_names(arch)
        for name in weights:
            if name not in params and name not in tied_names:
                raise CheckpointError(f"candidate tensor {name} does not exist in the {self.config.get('model_type')} model")
        self._copy_in(weights.items(), params, arch)
        self._run_layers(layers)

    def load_stream(self, tensors: Iterable[tuple[str, Tensor]], config: dict, min_layers: int = 0) -> None:
        """``load_weights`` for a stream of (checkpoint name, tensor), as ``merge.engine.iter_merge``
        yields them: each tensor is checked (finite, known name, shape) and copied into its
        parameter as it arrives, so no merged copy of the whole model is ever held (a MoE
        model's fused experts: one layer's tensors). A candidate that fails half-way leaves
        the model half-written; every later candidate overwrites every parameter anyway."""
        arch = architecture_of(config, self._tensor_names or None, where=f"candidate for {self.model_dir}")
        layers = config.get(arch.layer_count_key)
        spare, config = self._fill_spare_layers({}, config, min_layers, arch)
        self._rebuild_if_changed(config, arch)
        params = self._params()
        stream = runtime_stream(arch, finite_stream(tensors))
        # A merge left half-read stays suspended inside its own no_grad() block, which restores
        # the grad mode it found (off, inside ours) only when closed: close it in here, so that
        # autograd is on again once this returns or raises.
        with torch.no_grad():
            try:
                filled = self._copy_in(stream, params, arch)
            finally:
                stream.close()
                if hasattr(tensors, "close"):
                    tensors.close()
        filled |= self._copy_in(runtime_stream(arch, iter(spare.items())), params, arch)
        missing = [n for n in params if n not in filled]
        if missing:
            raise CheckpointError(f"candidate weights lack tensor {missing[0]} ({len(missing)} missing)")
        self._run_layers(layers)

    def _rebuild_if_changed(self, config: dict, arch) -> None:
        """A new architecture (not just fewer layers: see ``_fill_spare_layers``): a new model."""
        from transformers import AutoModelForCausalLM

        keys = (*SHAPE_KEYS, arch.layer_count_key)
        if any(config.get(k) != self.config.get(k) for k in keys if k in config or k in self.config):
            self.model = AutoModelForCausalLM.from_config(_config_object(config), dtype=self.dtype)
            self.model.to(self.device).eval()
            self.config = self.model.config.to_dict()
            self.rebuilds += 1
            self._depth_from_config = None

    def _tied_names(self, arch) -> set[str]:
        return {t for t, _ in arch.tied} if self.config.get("tie_word_embeddings") else set()

    def _copy_in(self, tensors: Iterable[tuple[str, Tensor]], params: dict[str, Tensor], arch) -> set[str]:
        """Copy runtime-named tensors into their parameters; the names copied."""
        tied_names = self._tied_names(arch)
        filled: set[str] = set()
        with torch.no_grad():
            for name, src in tensors:
                param = params.get(name)
                if param is None:
                    if name in tied_names:     # the embedding's tensor, which the model shares
                        continue
                    raise CheckpointError(f"candidate tensor {name} does not exist in the "
                                          f"{self.config.get('model_type')} model")
                if tuple(src.shape) != tuple(param.shape):
                    raise CheckpointError(f"tensor {name}: shape {tuple(src.shape)} does not fit {tuple(param.shape)}")
                param.copy_(src.to(device=param.device, dtype=param.dtype))
                filled.add(name)
        return filled

    def _run_layers(self, layers) -> None:
        """Run only the candidate's own layers where the model's forward reads its depth from
        its config (transformers' Llama-like decoders loop over ``layers[:num_hidden_layers]``
        and size their KV cache from it): a padded candidate then costs its own depth. The
        spare layers are identity layers anyway, so other models compute the same outputs."""
        if self._depth_from_config is None:
            inner = getattr(self.model, "model", None)
            try:
                source = inspect.getsource(type(inner).forward) if inner is not None else ""
            except (OSError, TypeError):
                source = ""
            self._depth_from_config = "self.layers[: self.config.num_hidden_layers]" in source
        if self._depth_from_config and isinstance(layers, int):
            self.model.config.num_hidden_layers = min(layers, int(self.config["num_hidden_layers"]))

    def _fill_spare_layers(self, weights: dict[str, Tensor], config: dict, min_layers: int, arch
                           ) -> tuple[dict[str, Tensor], dict]:
        """A candidate that differs from the model only in having fewer layers (a data-flow
        merge) gets identity layers in the spare slots, so it swaps in place; one with more
        layers (or ``min_layers``) is padded to its new depth, so later ones fit."""
        key = arch.layer_count_key
        layers, current = config.get(key), self.config.get(key)
        same = same_but_depth(config, self.config, (*SHAPE_KEYS, key), layer_count_key=key)
        if not (same and self._template and isinstance(layers, int) and isinstance(current, int)):
            return weights, config
        depth = current if layers <= current and min_layers <= current else max(layers, min_layers)
        if layers == depth:
            return weights, config
        return pad_with_identity_layers(weights, config, depth, self._template, layer_prefix=arch.layer_prefix,
                                        layer_count_key=key)

    # ------------------------------------------------------------ scoring
    def score(self, task: Task, indices: Sequence[int]) -> list[ItemResult]:
        if task.harness is not None:       # an lm-eval task: lm-eval scores it, this backend answers
            return harness_results(self, task, indices, "exact")
        indices = check_indices(task, indices)
        results: list[ItemResult] = []
        run = self._generate if task.kind == "generate" else self._choose
        with torch.inference_mode():
            for start in range(0, len(indices), self.batch_size):
                results.extend(run(task, indices[start:start + self.batch_size]))
        return results

    def likelihood(self, task: Task, indices: Sequence[int]) -> list[ItemResult]:
        if task.harness is not None:       # an lm-eval task: lm-eval scores it, this backend answers
            return harness_results(self, task, indices, "likelihood")
        indices = check_indices(task, indices)
        rows, owners = likelihood_rows(task, indices, self._encode, self.tokenizer.eos_token_id)
        with torch.inference_mode():
            logliks = [ll for ll, _ in self._loglikelihood(rows)]
        return graded_results(task, indices, owners, logliks)

    def _encode(self, text: str, special: bool = True) -> list[int]:
        return self.tokenizer(text, add_special_tokens=special)["input_ids"]

    def _generate(self, task: Task, chunk: list[int]) -> list[ItemResult]:
        prompts = [self._encode(task.items[i].prompt) for i in chunk]
        texts = self._greedy(prompts, task.max_new_tokens, task.stop)
        return [ItemResult(i, float(task.is_correct(i, text)), text) for i, text in zip(chunk, texts)]

    def greedy_generate(self, prompts: list[list[int]], max_new_tokens: int, stop: Sequence[str] = ()) -> list[str]:
        """Greedy continuations of token-id prompts, decoded without special tokens and cut at
        end-of-sequence; generation also ends once a ``stop`` string appears (the text still
        holds it). The token-level entry point lm-eval requests use (``tasks.lm_eval_lm``)."""
        out: list[str] = []
        with torch.inference_mode():
            for start in range(0, len(prompts), self.batch_size):
                out.extend(self._greedy(prompts[start:start + self.batch_size], max_new_tokens, list(stop)))
        return out

    def token_loglikelihoods(self, rows: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """Per (context ids, continuation ids) row: the continuation's summed log-probability and
        whether greedy decoding would have produced it (lm-eval's ``loglikelihood`` answer)."""
        with torch.inference_mode():
            return [(ll, greedy) for ll, _, greedy in self._loglikelihood(rows, with_greedy=True)]

    def _greedy(self, prompts: list[list[int]], max_new_tokens: int, stop: list[str]) -> list[str]:
        width, pad = max(map(len, prompts)), self.tokenizer.pad_token_id
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=self.device)
        mask = (torch.arange(width, device=self.device)[None, :] >= torch.tensor(
            [width - len(p) for p in prompts], device=self.device)[:, None]).long()
        eos = self.tokenizer.eos_token_id
        done = torch.zeros(len(prompts), dtype=torch.bool, device=self.device)
        new_tokens, cache = [], None
        step_ids = ids
        for _ in range(max_new_tokens):
            positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, -step_ids.shape[1]:]
            out = self.model(input_ids=step_ids, attention_mask=mask, position_ids=positions,
                             use_cache=True, logits_to_keep=1, **{self._cache_kw: cache})
            cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
            nxt = out.logits[:, -1].argmax(-1)
            nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
            new_tokens.append(nxt)
            done |= nxt == eos
            if stop:                       # decode only when there are stop strings
                texts = self.tokenizer.batch_decode(torch.stack(new_tokens, 1).tolist(), skip_special_tokens=True)
                done |= torch.tensor([any(st in t for st in stop) for t in texts], device=self.device)
            if bool(done.all()):
                break
            step_ids = nxt[:, None]
            mask = torch.cat([mask, torch.ones_like(step_ids)], dim=1)
        texts = []
        for row in torch.stack(new_tokens, dim=1).tolist():
            if eos in row:
                row = row[: row.index(eos)]
            texts.append(self.tokenizer.decode(row, skip_special_tokens=True))
        return texts

    def _choose(self, task: Task, chunk: list[int]) -> list[ItemResult]:
        rows, owners = choice_rows(task, chunk, self._encode)
        return pick_choices(task, chunk, owners, [ll for ll, _ in self._loglikelihood(rows)])

    def _loglikelihood(self, rows: list[tuple[list[int], list[int]]], with_greedy: bool = False) -> list[tuple]:
        """(summed log-probability, continuation length[, is greedy]) per row."""
        out = []
        pad = self.tokenizer.pad_token_id
        for start in range(0, len(rows), self.batch_size):
            part = rows[start:start + self.batch_size]
            seqs = [ctx + cont for ctx, cont in part]
            width = max(map(len, seqs))
            ids = torch.tensor([s + [pad] * (width - len(s)) for s in seqs], device=self.device)
            mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs], device=self.device)
            logprobs = torch.log_softmax(self.model(input_ids=ids, attention_mask=mask).logits.float(), dim=-1)
            for r, (ctx, cont) in enumerate(part):
                # token t is predicted by the logits at position t-1
                positions = torch.arange(len(ctx) - 1, len(ctx) + len(cont) - 1, device=self.device)
                targets = torch.tensor(cont, device=self.device)
                row = (float(logprobs[r, positions, targets].sum()), len(cont))
                if with_greedy:
                    row += (bool((logprobs[r, positions].argmax(-1) == targets).all()),)
                out.append(row)
        return out
