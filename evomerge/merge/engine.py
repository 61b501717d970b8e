"""The merge engine: a ``MergePlan`` applied to a ``SourceSet``, one tensor at a time.

``compile_plan`` turns the plan into a list of per-tensor jobs (which source
tensors, which method, which resolved parameters) -- all validation happens
there, before any tensor is read or any file is written. ``iter_merge`` then
runs the jobs lazily, so a disk merge of N models holds about one tensor per
source in memory; ``merge`` collects them into a dict for in-memory use
(workers, no disk); ``merge_to_disk`` streams them into ``write_checkpoint``.

Layer structure follows mergekit: with ``models`` every layer of every model
is merged position-wise; with ``slices`` the output layers are the slices'
layer ranges concatenated in order (layer swap, frankenmerges, data-flow
stacking). Embeddings take their inputs from the first slice, the final
norm and lm_head from the last.
"""

from __future__ import annotations

import copy
import queue
import random
import threading
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from evomerge.errors import CheckpointError, ConfigError, EvomergeError
from evomerge.io.architectures import common_architecture
from evomerge.io.checkpoint import Checkpoint, write_checkpoint
from evomerge.merge import registry
from evomerge.merge.plan import MergePlan, resolve

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
                "float64": torch.float64, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class Layout:
    """Where a model's tensors sit: layer tensors by index, the rest before/after the layers."""

    prefix: str | None
    layers: dict[int, list[str]]  # layer index -> suffixes in file order
    pre: list[str]  # embeddings
    post: list[str]  # final norm, lm_head, ...


def _layout(ckpt: Checkpoint) -> Layout:
    """Split a model's tensors by its registry architecture (``evomerge.io.architectures``)."""
    arch = ckpt.architecture
    layers: dict[int, list[str]] = {}
    pre, post = [], []
    for name in ckpt.tensor_names:
        split = arch.split_layer(name)
        if split is not None:
            layers.setdefault(split[0], []).append(split[1])
        elif arch.is_pre(name):
            pre.append(name)
        else:
            post.append(name)
    return Layout(arch.layer_prefix if layers else None, dict(sorted(layers.items())), pre, post)


class SourceSet:
    """The source models of a merge, by the names the plan uses.

    ``resident=True`` reads every tensor once onto ``device`` and keeps it there
    between merges (what search workers want); ``resident=False`` reads each
    tensor from its memory-mapped file when a merge needs it (what a one-off
    disk merge of large models wants).
    """

    def __init__(self, checkpoints: Mapping[str, Checkpoint], device: str | torch.device = "cpu",
                 resident: bool = True):
        self.checkpoints: dict[str, Checkpoint] = dict(checkpoints)
        self.names: list[str] = list(self.checkpoints)
        self.device = torch.device(device)
        self.resident = resident
        self._layouts = {name: _layout(ck) for name, ck in self.checkpoints.items()}
        self._tensors: dict[str, dict[str, Tensor]] = {}
        self.check_compatible()  # before reading any weights into memory
        if resident:
            for name, ck in self.checkpoints.items():
                self._tensors[name] = {t: ck.get(t).to(self.device) for t in ck.tensor_names}

    @classmethod
    def load(cls, paths: Mapping[str, str | Path], device: str = "cpu", resident: bool = True,
             allow_bin: bool = False) -> SourceSet:
        """Open each model directory (``{name used in plans: path}``) and check they fit together."""
        return cls({name: Checkpoint(path, allow_bin=allow_bin) for name, path in paths.items()},
                   device=device, resident=resident)

    def tensor(self, model: str, name: str) -> Tensor:
        if model in self._tensors:
            return self._tensors[model][name]
        # Streaming: map the bytes from the page cache rather than copying them (CPU only).
        return self.checkpoints[model].get(name, mapped=self.device.type == "cpu").to(self.device)

    def layout(self, model: str) -> Layout:
        return self._layouts[model]

    def check_compatible(self) -> None:
        """All sources must share architecture and every tensor's shape (layer counts may differ)."""
        names = list(self.checkpoints)
        if len(names) < 2:
            return
        first = names[0]
        common_architecture({name: self.checkpoints[name].architecture for name in names})
        ref_shapes = _canonical_shapes(self.checkpoints[first], self._layouts[first])
        for other in names[1:]:
            shapes = _canonical_shapes(self.checkpoints[other], self._layouts[other])
            for key, shape in ref_shapes.items():
                if key not in shapes:
                    raise CheckpointError(f"tensor {key} is in {first} but missing from {other}")
                if shapes[key] != shape:
                    raise CheckpointError(f"shape mismatch for tensor {key}: {list(shape)} in {first}, "
                                          f"{list(shapes[key])} in {other}")
            for key in shapes:
                if key not in ref_shapes:
                    raise CheckpointError(f"tensor {key} is in {other} but missing from {first}")


def _canonical_shapes(ck: Checkpoint, layout: Layout) -> dict[str, tuple[int, ...]]:
    """Tensor shapes keyed by name with the layer index replaced by '*'."""
    out = {}
    arch = ck.architecture
    for name in ck.tensor_names:
        split = arch.split_layer(name)
        key = f"{arch.layer_prefix}*.{split[1]}" if split is not None else name
        shape = ck.shape(name)
        if key in out and out[key] != shape:
            raise CheckpointError(f"layers of {ck.name} differ in shape at {name}")
        out[key] = shape
    return out


# -- compiling a plan into per-tensor jobs -----------------------------------------------------

@dataclass
class TensorJob:
    out_name: str
    models: list[str]
    names: list[str]  # tensor name in each input model
    base_index: int | None
    shared: dict
    per_input: list[dict] = field(default_factory=list)


def _plan_slices(plan: MergePlan, sources: SourceSet) -> list[tuple[list[tuple[str, dict, int, int]], dict, str | None]]:
    """[(sources as (model, params, start, end), slice parameters, slice base)] -- models become one slice."""
    out = []
    if plan.models is not None:
        group = plan.input_groups()[0]
        srcs = []
        for model, params in group:
            srcs.append((model, params, 0, sources.checkpoints[model].num_layers))
        lengths = {e - s for _, _, s, e in srcs}
        if len(lengths) > 1:
            counts = ", ".join(f"{m}: {e}" for m, _, _, e in srcs)
            raise ConfigError(f"models have different numbers of layers ({counts}); use slices to combine them")
        out.append((srcs, {}, plan.base_model))
    else:
        for i, sl in enumerate(plan.slices):
            srcs = [(s.model, s.parameters, s.layer_range[0], s.layer_range[1]) for s in sl.sources]
            out.append((srcs, sl.parameters, plan.slice_base(i)))
    return out


def compile_plan(plan: MergePlan, sources: SourceSet) -> list[TensorJob]:
    """Resolve a plan against its sources into per-tensor jobs; raises on any problem."""
    for model in plan.referenced_models():
        if model not in sources.checkpoints:
            raise ConfigError(f"the plan uses model {model!r}, which is not among the sources "
                              f"({', '.join(sources.names) or 'none'})")
    spec = registry.METHODS[plan.merge_method]
    slices = _plan_slices(plan, sources)
    for srcs, _, _ in slices:
        for model, _, start, end in srcs:
            n = sources.checkpoints[model].num_layers
            if end > n:
                raise ConfigError(f"layer_range [{start}, {end}] is beyond the {n} layers of {model}")

    jobs: list[TensorJob] = []

    def add(out_name: str, srcs, in_names: list[str], slice_params: dict, base: str | None, t: float) -> None:
        models = [m for m, *_ in srcs]
        for model, name in zip(models, in_names):
            if name not in sources.checkpoints[model]:
                raise CheckpointError(f"model {model} has no tensor {name}")
        base_index = models.index(base) if base is not None and base in models else None
        shared_scopes = [slice_params, plan.parameters]
        shared = {}
        for p in spec.params:
            if p.scope == "shared":
                shared[p.name] = _resolved(p, shared_scopes, _filter_name(sources, models[0], out_name), t,
                                           plan.merge_method, None)
        per_input = []
        for i, (model, params, *_rest) in enumerate(srcs):
            values = {}
            for p in spec.params:
                if p.scope == "input" or (p.scope == "non_base" and i != base_index):
                    values[p.name] = _resolved(p, [params, slice_params, plan.parameters],
                                               _filter_name(sources, model, in_names[i]), t, plan.merge_method, model)
            if spec.constraint is not None and i != base_index:
                problem = spec.constraint({**shared, **values})
                if problem:
                    raise ConfigError(f"{problem} for model {model}, tensor {in_names[i]}")
            per_input.append(values)
        jobs.append(TensorJob(out_name, models, list(in_names), base_index, shared, per_input))

    # Embeddings (before the layers) come from the first slice, at t = 0.
    first_srcs, first_params, first_base = slices[0]
    for name in sources.layout(first_srcs[0][0]).pre:
        add(name, first_srcs, [name] * len(first_srcs), first_params, first_base, 0.0)

    out_layer = 0
    for srcs, slice_params, base in slices:
        n = srcs[0][3] - srcs[0][2]
        lead = sources.layout(srcs[0][0])
        for idx in range(n):
            t = idx / (n - 1) if n > 1 else 1.0
            for suffix in lead.layers.get(srcs[0][2] + idx, []):
                in_names = [f"{sources.layout(m).prefix}{start + idx}.{suffix}" for m, _, start, _ in srcs]
                add(f"{lead.prefix}{out_layer}.{suffix}", srcs, in_names, slice_params, base, t)
            out_layer += 1

    last_srcs, last_params, last_base = slices[-1]
    for name in sources.layout(last_srcs[0][0]).post:
        add(name, last_srcs, [name] * len(last_srcs), last_params, last_base, 0.0)
    return jobs


class _FilterName(str):
    """A tensor name whose parameter filters also match its runtime name.

    mergekit 0.1.5 names MoE tensors as transformers 5 holds them (``mlp.experts.down_proj``
    where a Mixtral checkpoint has ``block_sparse_moe.experts.3.w2.weight``), so recipes
    written for it filter on ``mlp`` / ``down_proj``; evomerge merges the checkpoint layout.
    A filter matches if it is a substring of either name (``evaluate_setting`` tests
    ``filter in name``).
    """

    alias: str

    def __new__(cls, name: str, alias: str) -> "_FilterName":
        out = super().__new__(cls, name)
        out.alias = alias
        return out

    def __contains__(self, sub: object) -> bool:
        return str.__contains__(self, sub) or (isinstance(sub, str) and sub in self.alias)


def _filter_name(sources: SourceSet, model: str, name: str) -> str:
    alias = sources.checkpoints[model].architecture.runtime_name(name)
    return name if alias == name else _FilterName(name, alias)


def _resolved(p: registry.Param, scopes, tensor_name: str, t: float, method: str, model: str | None):
    try:
        value = resolve(p, scopes, tensor_name, t)
    except ValueError as exc:
        raise ConfigError(f"parameter {p.name} for tensor {tensor_name}: {exc}") from None
    if value is registry.REQUIRED:
        who = f" for model {model}" if model else ""
        raise ConfigError(f"merge_method {method} needs parameter {p.name!r}{who} (tensor {tensor_name})")
    return value


# -- running jobs ---------------------------------------------------------------------------------

def _seed_for(base_seed: int, job: TensorJob) -> int:
    return (base_seed * 1_000_003 + zlib.crc32(job.out_name.encode())) % (2**63 - 1)


def _run_job(spec: registry.MergeMethod, job: TensorJob, tensors: list[Tensor], seed: int) -> Tensor:
    tensor_seed = _seed_for(seed, job) if spec.random else None
    base_index = None if spec.base == "ignored" else job.base_index
    return spec.run(registry.MergeInputs(tensors, base_index, job.shared, job.per_input, tensor_seed))


def iter_merge(plan: MergePlan, sources: SourceSet, device: str | torch.device | None = None
               ) -> Iterator[tuple[str, Tensor]]:
    """Yield ``(name, merged tensor)`` in output order, one tensor at a time.

    The plan is checked completely before this returns. Tensors from a plain
    passthrough are the source tensors themselves (not copies): treat results
    as read-only.
    """
    jobs = compile_plan(plan, sources)
    return _run(plan, sources, jobs, device)


def _background(items: Iterator, depth: int) -> Iterator:
    """Run an iterator in a thread up to ``depth`` items ahead of its consumer.

    Reading (pread), merging (numba / torch kernels) and writing all release the GIL,
    so a disk merge overlaps the three; ``depth`` bounds the tensors held in between.
    An exception in the thread is re-raised here; closing early stops the thread.
    """
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def put(entry) -> bool:
        while not stop.is_set():
            try:
                q.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            for item in items:
                if not put((None, item)):
                    return
            put((None, done))
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            put((exc, None))

    thread = threading.Thread(target=work, name="evomerge-pipeline", daemon=True)
    thread.start()
    try:
        while True:
            exc, item = q.get()
            if exc is not None:
                raise exc
            if item is done:
                return
            yield item
    finally:
        stop.set()
        thread.join()


def _inputs(sources: SourceSet, jobs: list[TensorJob], prefetch: bool) -> Iterator[tuple[TensorJob, list[Tensor]]]:
    loaded = ((job, [sources.tensor(m, n) for m, n in zip(job.models, job.names)]) for job in jobs)
    return _background(loaded, 1) if prefetch else loaded


def _run(plan: MergePlan, sources: SourceSet, jobs: list[TensorJob], device, prefetch: bool = False
         ) -> Iterator[tuple[str, Tensor]]:
    spec = registry.METHODS[plan.merge_method]
    in_dtype = TORCH_DTYPES[plan.dtype] if plan.dtype else None
    out_dtype = TORCH_DTYPES[plan.out_dtype] if plan.out_dtype else None
    device = torch.device(device) if device is not None else None
    seed = plan.random_seed if plan.random_seed is not None else random.SystemRandom().randrange(2**31)
    with torch.no_grad():
        for job, tensors in _inputs(sources, jobs, prefetch):
            if device is not None and tensors[0].device != device:
                tensors = [x.to(device) for x in tensors]
            if not tensors[0].is_floating_point():
                # Integer buffers are not merged: take the base's (or the first model's).
                yield job.out_name, tensors[job.base_index or 0]
                continue
            if in_dtype is not None:
                tensors = [x.to(in_dtype) for x in tensors]
            dtype = out_dtype or _promoted(tensors)
            try:
                result = _offset_gain_scaled(plan.merge_method, sources, job, tensors)
                if result is None:
                    result = _run_job(spec, job, tensors, seed)
            except ValueError as exc:
                raise EvomergeError(f"{plan.merge_method} failed on tensor {job.out_name}: {exc}") from None
            del tensors
            yield job.out_name, result if result.dtype == dtype else result.to(dtype)


def _offset_gain_scaled(method: str, sources: SourceSet, job: TensorJob, tensors: list[Tensor]) -> Tensor | None:
    """A passthrough ``scale`` on a norm whose gain is stored as ``gain - 1`` (Gemma2/3).

    Scaling such a norm means scaling its output, i.e. its gain ``1 + w``: the stored
    weight becomes ``c * (1 + w) - 1``. (mergekit multiplies the stored ``w``, which for
    these norms scales nothing in particular.) This is what makes a data-flow residual
    scale, folded into Gemma's post-attention / post-feed-forward norms, exact.
    None for every other tensor.
    """
    if method != "passthrough":
        return None
    scale = job.per_input[0].get("scale")
    if scale is None or scale == 1.0:
        return None
    arch = sources.checkpoints[job.models[0]].architecture
    if not arch.norm_gain_offset or not any(f in job.names[0] for f in arch.norm_filters):
        return None
    w = tensors[0]
    return ((1.0 + w.float()) * float(scale) - 1.0).to(w.dtype)


def _promoted(tensors: list[Tensor]) -> torch.dtype:
    return _promoted_dtypes([x.dtype for x in tensors])


def _promoted_dtypes(dtypes: list[torch.dtype]) -> torch.dtype:
    dtype = dtypes[0]
    for d in dtypes[1:]:
        dtype = torch.promote_types(dtype, d)
    return dtype


def merge(plan: MergePlan, sources: SourceSet, device: str | torch.device | None = None) -> dict[str, Tensor]:
    """The merged weights as a dict, computed on ``device`` (default: the sources' device)."""
    return dict(iter_merge(plan, sources, device))


def output_config(plan: MergePlan, sources: SourceSet) -> dict:
    """config.json of the merged model: the base's (or first model's), layer count and dtype adjusted."""
    ref = plan.base_model or plan.referenced_models()[0]
    if ref not in sources.checkpoints:
        raise ConfigError(f"the plan uses model {ref!r}, which is not among the sources")
    config = copy.deepcopy(sources.checkpoints[ref].config)
    if plan.slices is not None:
        # Output layer j is layer i of the slice source that leads its slice; the layer count
        # and every per-layer config key (layer_types, mlp_only_layers, ...) follow.
        source_layers = []
        for s in plan.slices:
            lead = sources.checkpoints[s.sources[0].model]
            start, end = s.sources[0].layer_range
            source_layers += [(lead.config, i) for i in range(start, end)]
        sources.checkpoints[ref].architecture.with_layers(config, source_layers)
    dtype = plan.out_dtype or plan.dtype
    if dtype:
        name = str(TORCH_DTYPES[dtype]).removeprefix("torch.")
        if "dtype" in config:
            config["dtype"] = name
        config["torch_dtype"] = name
    return config


def _tokenizer_dir(plan: MergePlan, sources: SourceSet, tokenizer_from: str | Path | None) -> Path:
    if tokenizer_from is not None:
        return Path(tokenizer_from)
    choice = plan.tokenizer_source
    if choice == "union":
        raise ConfigError("tokenizer_source: union is not supported by evomerge (name one model or 'base')")
    if choice == "base":
        choice = plan.base_model
        if choice is None:
            raise ConfigError("tokenizer_source: base needs a base_model")
    if choice is None:
        choice = plan.base_model or plan.referenced_models()[0]
    if choice in sources.checkpoints:
        return sources.checkpoints[choice].path
    path = Path(choice)
    if not path.is_dir():
        raise ConfigError(f"tokenizer_source {choice!r} is neither a plan model nor a directory")
    return path


def merge_to_disk(plan: MergePlan, sources: SourceSet, out_dir: str | Path, tokenizer_from: str | Path | None = None,
                  *, overwrite: bool = False, max_shard_size: int = 2**30) -> Path:
    """Write the merged model to ``out_dir`` atomically (complete, or not there at all)."""
    jobs = compile_plan(plan, sources)
    config = output_config(plan, sources)
    tok = _tokenizer_dir(plan, sources, tokenizer_from)
    readme = "---\ntags: [merge, evomerge]\n---\n# Merged model\n\nMade by evomerge with this mergekit-compatible recipe:\n\n```yaml\n" \
        + plan.to_yaml() + "```\n"
    # Three stages at once: read the next tensors, merge the current ones, write the last result.
    merged = _background(_run(plan, sources, jobs, None, prefetch=not sources.resident), 1)
    try:
        return write_checkpoint(out_dir, merged, config, tokenizer_from=tok, max_shard_size=max_shard_size,
                                extra_files={"mergekit_config.yml": plan.to_yaml(), "README.md": readme},
                                overwrite=overwrite, layout=_output_layout(plan, sources, jobs))
    finally:
        merged.close()  # stops the merging thread if writing failed


def _output_layout(plan: MergePlan, sources: SourceSet, jobs: list[TensorJob]) -> list[tuple]:
    """(name, shape, dtype) of every output tensor, known before merging, so shards stream to disk."""
    in_dtype = TORCH_DTYPES[plan.dtype] if plan.dtype else None
    out_dtype = TORCH_DTYPES[plan.out_dtype] if plan.out_dtype else None
    layout = []
    for job in jobs:
        dtypes = [sources.checkpoints[m].dtype(n) for m, n in zip(job.models, job.names)]
        shape = sources.checkpoints[job.models[0]].shape(job.names[0])
        if not dtypes[0].is_floating_point:
            dtype = dtypes[job.base_index or 0]
        else:
            dtype = out_dtype or in_dtype or _promoted_dtypes(dtypes)
        layout.append((job.out_name, shape, dtype))
    return layout
