"""The contract every evaluation backend fulfils (see DESIGN.md, "Backends")."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from torch import Tensor

from evomerge.errors import CheckpointError, EvomergeError
from evomerge.tasks.task import Task


@dataclass
class ItemResult:
    index: int                         # position of the item in task.items
    score: float                       # 0/1, or graded in [0, 1]
    output: str                        # generated text, or the chosen choice for multiple choice
    metrics: dict | None = None        # lm-eval tasks: every "metric,filter" value of this item


@runtime_checkable
class Backend(Protocol):
    def load_weights(self, weights: dict[str, Tensor], config: dict) -> None:
        """Install candidate weights; in place when the architecture is unchanged."""
        ...

    def load_stream(self, tensors: Iterable[tuple[str, Tensor]], config: dict) -> None:
        """``load_weights`` from an iterator of (name, tensor), as a merge yields them: each
        tensor checked (finite, known name, shape) and installed as it arrives, so no merged
        copy of the whole model is held."""
        ...

    def score(self, task: Task, indices: Sequence[int]) -> list[ItemResult]:
        """Score the items ``task.items[i] for i in indices``, results in the same order."""
        ...

    def likelihood(self, task: Task, indices: Sequence[int]) -> list[ItemResult]:
        """Graded scores in [0, 1]: for generate tasks the probability of the reference output
        (``task.reference``) given the prompt, teacher-forced; for multiple choice the correct
        choice's share of the choices' probability mass. One forward pass per item, no decoding."""
        ...


class NonFiniteWeights(CheckpointError):
    """The merge produced NaN/inf values: the candidate cannot be scored."""


def finite_stream(tensors: Iterable[tuple[str, Tensor]]) -> Iterator[tuple[str, Tensor]]:
    """The merged tensors, each checked as it passes: a NaN/inf value fails the candidate,
    naming the tensor (a merge can overflow, e.g. a large task-arithmetic weight in float16)."""
    import torch

    for name, tensor in tensors:
        # min and max carry any NaN or inf: one pass, no tensor-sized mask (30x isfinite().all())
        if tensor.is_floating_point() and tensor.numel() \
                and not bool(torch.stack(torch.aminmax(tensor)).isfinite().all()):
            raise NonFiniteWeights(f"merged tensor {name} has NaN/inf values")
        yield name, tensor


def timed_stream(tensors: Iterable[tuple[str, Tensor]], timings: dict[str, float], key: str
                 ) -> Iterator[tuple[str, Tensor]]:
    """``tensors`` unchanged, the seconds spent producing them added to ``timings[key]``
    (how long a streamed merge took, apart from its consumer's work)."""
    import time

    it = iter(tensors)
    try:
        while True:
            t = time.perf_counter()
            item = next(it, None)
            timings[key] = timings.get(key, 0.0) + time.perf_counter() - t
            if item is None:
                return
            yield item
    finally:
        if hasattr(it, "close"):       # closed early: close the merge too (see HFBackend.load_stream)
            it.close()


def load_merged(backend: Backend, tensors: Iterable[tuple[str, Tensor]], config: dict) -> None:
    """Install a merge's output as it streams out of the merge (``Backend.load_stream``: no
    merged copy of the whole model; every backend streams since issue 21)."""
    backend.load_stream(tensors, config)


def scoring_method(backend: Backend, scoring: str) -> Callable[[Task, Sequence[int]], list[ItemResult]]:
    """``backend.score`` for exact scoring, ``backend.likelihood`` for likelihood scoring."""
    return backend.likelihood if scoring == "likelihood" else backend.score


def harness_results(backend: Backend, task: Task, indices: Sequence[int], scoring: str) -> list[ItemResult]:
    """An lm-eval task's results (``task.harness``: lm-eval builds and scores the requests,
    ``backend`` answers them through its token-level methods)."""
    return [ItemResult(r.index, r.score, r.output, r.metrics) for r in task.harness.score(backend, indices, scoring)]


def check_indices(task: Task, indices: Sequence[int]) -> list[int]:
    indices = list(indices)
    for i in indices:
        if not 0 <= i < len(task.items):
            raise EvomergeError(f"task {task.name}: item index {i} out of range (0..{len(task.items) - 1})")
    return indices


def choice_rows(task: Task, indices: Sequence[int], encode: Callable[..., list[int]]
                ) -> tuple[list[tuple[list[int], list[int]]], list[tuple[int, int]]]:
    """For multiple choice: one (context tokens, continuation tokens) row per (item, choice),
    and the (item index, choice index) each row belongs to.

    The continuation is taken from the tokenized prompt+choice when the prompt's tokens are a
    prefix of it, so both backends score exactly the tokens the model would see; when the
    tokenizer merged across the boundary the choice is tokenized on its own.
    """
    rows, owners = [], []
    for i in indices:
        item = task.items[i]
        context = encode(item.prompt)
        for c, choice in enumerate(item.choices or []):
            rows.append((context, _continuation(encode, item.prompt, context, choice)))
            owners.append((i, c))
    return rows, owners


def _continuation(encode: Callable[..., list[int]], prompt: str, context: list[int], text: str) -> list[int]:
    """The tokens of ``text`` after ``prompt``: taken from the tokenized prompt+text when the
    prompt's tokens are a prefix of it, else ``text`` tokenized on its own."""
    whole = encode(prompt + text)
    if whole[: len(context)] == context and len(whole) > len(context):
        return whole[len(context):]
    return encode(text, special=False)


def pick_choices(task: Task, indices: Sequence[int], owners: list[tuple[int, int]],
                 logliks: Sequence[float]) -> list[ItemResult]:
    """Per item, the choice with the highest log-likelihood (per character when the task asks
    for ``mc_normalize``); the score is whether it is the answer."""
    best: dict[int, tuple[float, int]] = {}
    for (i, c), ll in zip(owners, logliks):
        value = ll / max(1, len(task.items[i].choices[c])) if task.mc_normalize else ll
        if i not in best or value > best[i][0]:
            best[i] = (value, c)
    results = []
    for i in indices:
        choice = task.items[i].choices[best[i][1]]
        results.append(ItemResult(i, float(choice == task.items[i].answer), choice))
    return results


def reference_rows(task: Task, indices: Sequence[int], encode: Callable[..., list[int]],
                   eos_token_id: int | None) -> list[tuple[list[int], list[int]]]:
    """For likelihood scoring of a generate task: one (prompt tokens, reference tokens) row per
    item, the reference ending with end-of-sequence when the task says its outputs do."""
    rows = []
    for i in indices:
        prompt = task.items[i].prompt
        context = encode(prompt)
        continuation = _continuation(encode, prompt, context, task.reference(i))
        if task.target_eos and eos_token_id is not None:
            continuation = continuation + [eos_token_id]
        rows.append((context, continuation))
    return rows


def likelihood_rows(task: Task, indices: Sequence[int], encode: Callable[..., list[int]],
                    eos_token_id: int | None) -> tuple[list[tuple[list[int], list[int]]], list[tuple[int, int]]]:
    """The rows a backend scores for ``likelihood``, and the (item, choice) each belongs to
    (choice 0 for generate tasks)."""
    if task.kind == "multiple_choice":
        return choice_rows(task, indices, encode)
    return reference_rows(task, indices, encode, eos_token_id), [(i, 0) for i in indices]


def graded_results(task: Task, indices: Sequence[int], owners: list[tuple[int, int]],
                   logliks: Sequence[float]) -> list[ItemResult]:
    """Likelihood scores from the rows' log-likelihoods (see ``Backend.likelihood``)."""
    per_item: dict[int, dict[int, float]] = {}
    for (i, c), ll in zip(owners, logliks):
        per_item.setdefault(i, {})[c] = float(ll)
    results = []
    for i in indices:
        lls = per_item[i]
        if task.kind == "multiple_choice":
            correct = task.items[i].choices.index(task.items[i].answer)
            top = max(lls.values())
            total = sum(math.exp(v - top) for v in lls.values())
            results.append(ItemResult(i, math.exp(lls[correct] - top) / total, task.items[i].answer))
        else:
            results.append(ItemResult(i, math.exp(min(lls[0], 0.0)), task.reference(i)))
    return results


def longest_request(task: Task, encode: Callable[..., list[int]], eos_token_id: int | None) -> int:
    """The most tokens one request of ``task`` occupies in an engine, whichever way it is scored:
    exact generation (prompt + ``max_new_tokens``), multiple-choice rows (prompt + choice) and
    likelihood rows (prompt + reference [+ end-of-sequence]). Sizes the engine's context."""
    indices = range(len(task.items))
    rows, _ = likelihood_rows(task, indices, encode, eos_token_id)
    longest = max((len(ctx) + len(cont) for ctx, cont in rows), default=0)
    if task.kind == "generate":
        longest = max([longest] + [len(encode(item.prompt)) + task.max_new_tokens for item in task.items])
    return longest


# --------------------------------------------------------------------------- identity layers

# Where a Llama-like decoder's layers live in checkpoint names (Llama, Mistral, Qwen2, Gemma, Mixtral).
LLAMA_LAYER_PREFIX = "model.layers."


# Config lists with one entry per layer: a padded candidate's entries must be the engine's first
# ones (Gemma2 / Qwen2 fix sliding-window vs full attention per layer when the engine is built).
PER_LAYER_KEYS = ("layer_types",)


def same_but_depth(config: dict, engine_config: dict, shape_keys: Sequence[str],
                   layer_count_key: str = "num_hidden_layers") -> bool:
    """Whether a candidate's architecture is the engine's up to having fewer or more layers:
    every shape key but the layer count equal, per-layer lists agreeing on the layers it has."""
    for key in shape_keys:
        if key == layer_count_key or key in PER_LAYER_KEYS or (key not in config and key not in engine_config):
            continue
        if config.get(key) != engine_config.get(key):
            return False
    for key in PER_LAYER_KEYS:
        mine, theirs = config.get(key), engine_config.get(key)
        if isinstance(mine, list) and isinstance(theirs, list):
            if mine != theirs[: len(mine)]:
                return False
        elif mine != theirs:
            return False
    return True


def split_layer_name(name: str, layer_prefix: str = LLAMA_LAYER_PREFIX) -> tuple[int, str] | None:
    """``(layer index, suffix)`` of a layer tensor name, None for the tensors outside the layers."""
    if not name.startswith(layer_prefix):
        return None
    index, dot, suffix = name[len(layer_prefix):].partition(".")
    return (int(index), suffix) if dot and index.isdigit() else None


def pad_with_identity_layers(weights: dict[str, Tensor], config: dict, n_layers: int,
                             layer_template: dict[str, tuple[tuple[int, ...], "torch.dtype"]],
                             layer_prefix: str = LLAMA_LAYER_PREFIX,
                             layer_count_key: str = "num_hidden_layers") -> tuple[dict[str, Tensor], dict]:
    """A candidate with fewer layers than the running engine, made to fill all ``n_layers`` slots.

    Slots ``k .. n_layers - 1`` (``k`` = the candidate's layer count) get identity layers:
    every tensor of a spare layer is zero. What makes the layer an exact identity is that its
    residual-writing projections (o_proj and down_proj in a Llama-like block, their biases too)
    are zero, so the block adds exactly 0 to the residual stream -- a norm after them
    (Gemma2's post-norms) maps 0 to 0 as well; the other tensors are zero so that nothing
    inside the spare layer can overflow. The outputs are then bit-for-bit those of the
    ``k``-layer model (``h + 0 == h``), while the engine keeps its ``n_layers`` KV-cache
    layout and the weights swap in place. ``layer_template`` maps each layer-tensor suffix to
    (shape, dtype) (from the engine's own checkpoint). The zero tensors are shared between
    slots (no copies: the engine copies them into its own storage).
    """
    import torch

    have = int(config.get(layer_count_key, 0))
    if have > n_layers:
        raise EvomergeError(f"candidate has {have} layers, more than the engine's {n_layers}")
    padded = dict(weights)
    zeros: dict[tuple, Tensor] = {}
    for layer in range(have, n_layers):
        for suffix, (shape, dtype) in layer_template.items():
            key = (tuple(shape), dtype)
            if key not in zeros:
                zeros[key] = torch.zeros(shape, dtype=dtype)
            padded[f"{layer_prefix}{layer}.{suffix}"] = zeros[key]
    out_config = dict(config)
    out_config[layer_count_key] = n_layers
    for key in PER_LAYER_KEYS:         # spare layers add nothing, whatever their type: repeat the last
        if isinstance(config.get(key), list) and config[key]:
            out_config[key] = list(config[key]) + [config[key][-1]] * (n_layers - len(config[key]))
    return padded, out_config


def layer_template(shapes: dict[str, tuple[int, ...]], dtypes: dict[str, "torch.dtype"],
                   layer_prefix: str = LLAMA_LAYER_PREFIX) -> dict[str, tuple[tuple[int, ...], "torch.dtype"]]:
    """{suffix: (shape, dtype)} of one decoder layer, read from a checkpoint's tensor table
    (layer 0's tensors; every layer of a homogeneous decoder has the same)."""
    out = {}
    for name, shape in shapes.items():
        parts = split_layer_name(name, layer_prefix)
        if parts is not None and parts[0] == 0:
            out[parts[1]] = (tuple(shape), dtypes[name])
    return out
