"""Read and write Hugging Face model directories, one tensor at a time.

``Checkpoint`` reads only the safetensors headers up front; each ``get`` reads
a single tensor from its file (one positioned read), so merging N models needs about
one tensor per source in memory, never N whole models. ``write_checkpoint``
takes a stream of ``(name, tensor)`` pairs and writes shards as they fill,
keeping at most one shard in memory, into a temp dir renamed on success.

Pickled ``.bin`` weights can run code when loaded, so they are refused unless
the caller passes ``allow_bin=True`` (the CLI's ``--allow-bin``); even then they
are loaded with ``weights_only=True``.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import shutil
import struct
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

from evomerge.errors import CheckpointError
from evomerge.io.architectures import Architecture, architecture_of
from evomerge.io.atomic import StreamedFile, atomic_dir

SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "generation_config.json",
)

_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


def read_safetensors_header(file: Path) -> tuple[dict, int]:
    """The JSON header of a safetensors file (tensor name -> dtype/shape/offsets) and where data starts.

    Validated against the file before anything is allocated: the header length must fit in
    the file (a length of 2**40 is a damaged file, not a request for a terabyte), every entry
    must be a dtype, a shape and offsets, and each tensor's bytes must lie inside the file and
    match its shape -- so a truncated file is refused here, naming the file and the tensor."""
    def bad(why: str) -> CheckpointError:
        return CheckpointError(f"cannot read safetensors file {file}: {why}")

    try:
        with open(file, "rb") as f:
            file_size = os.fstat(f.fileno()).st_size
            prefix = f.read(8)
            if len(prefix) < 8:
                raise bad(f"{file_size} bytes, shorter than a safetensors header")
            (size,) = struct.unpack("<Q", prefix)
            if size > file_size - 8:
                raise bad(f"header length {size} exceeds the file's {file_size} bytes (damaged or truncated)")
            header = json.loads(f.read(size))
    except CheckpointError:
        raise
    except (OSError, struct.error, ValueError, UnicodeDecodeError) as exc:
        raise bad(str(exc)) from None
    if not isinstance(header, dict):
        raise bad("the header is not a JSON object")
    header.pop("__metadata__", None)
    data_size = file_size - 8 - size
    for name, info in header.items():
        try:
            dtype, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
            ok = (isinstance(dtype, str) and all(isinstance(d, int) and d >= 0 for d in shape)
                  and isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end)
        except (TypeError, KeyError, ValueError):
            ok = False
        if not ok:
            raise bad(f"tensor {name}: malformed header entry {json.dumps(info)[:120]}")
        if end > data_size:
            raise bad(f"tensor {name} ends at byte {8 + size + end}, past the end of the file "
                      f"({file_size} bytes): the file is truncated")
        if dtype in _ST_DTYPES:
            expected = math.prod(shape) * torch.empty((), dtype=_ST_DTYPES[dtype]).element_size()
            if end - begin != expected:
                raise bad(f"tensor {name}: {end - begin} bytes for shape {list(shape)} of {dtype} "
                          f"(expected {expected})")
    return header, 8 + size


class Checkpoint:
    """A lazy, memory-mapped view of one HF model directory."""

    def __init__(self, path: str | Path, allow_bin: bool = False):
        self.name = str(path)
        self.path = Path(path)
        if not self.path.exists():
            raise CheckpointError(f"model directory {self.name} does not exist")
        if not self.path.is_dir():
            raise CheckpointError(f"model path {self.name} is not a directory")
        config_file = self.path / "config.json"
        if not config_file.is_file():
            raise CheckpointError(f"{self.name} is not a Hugging Face model directory (no config.json)")
        try:
            self.config: dict = json.loads(config_file.read_text())
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"cannot parse {config_file}: {exc}") from None

        self._file_of: dict[str, Path] = {}
        self._shape: dict[str, tuple[int, ...]] = {}
        self._dtype: dict[str, torch.dtype] = {}
        self._offset: dict[str, int] = {}  # absolute byte offset of each tensor's data
        self._fds: dict[Path, int] = {}
        self._bin_tensors: dict[str, torch.Tensor] | None = None
        self._architecture: Architecture | None = None
        files = self._safetensors_files()
        if files:
            self._index_safetensors(files)
        else:
            self._load_bin(allow_bin)
        self.tensor_names: list[str] = list(self._file_of) if self._bin_tensors is None else list(self._bin_tensors)

    # -- discovery -------------------------------------------------------
    def _safetensors_files(self) -> list[Path]:
        index = self.path / SAFETENSORS_INDEX
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (OSError, ValueError, KeyError) as exc:
                raise CheckpointError(f"cannot parse {index}: {exc}") from None
            files = list(dict.fromkeys(weight_map.values()))
            for name in files:
                if not (self.path / name).is_file():
                    raise CheckpointError(f"{index} lists shard {name}, which is missing")
            return [self.path / name for name in files]
        return sorted(self.path.glob("*.safetensors"))

    def _index_safetensors(self, files: list[Path]) -> None:
        for file in files:
            header, data_start = read_safetensors_header(file)
            # Header keys are not in storage order; sort by offset to get file order.
            for name, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
                if name in self._file_of:
                    raise CheckpointError(f"tensor {name} appears twice in {self.name}")
                if info["dtype"] not in _ST_DTYPES:
                    raise CheckpointError(f"tensor {name} in {file} has unsupported dtype {info['dtype']}")
                self._file_of[name] = file
                self._offset[name] = data_start + info["data_offsets"][0]
                self._shape[name] = tuple(info["shape"])
                self._dtype[name] = _ST_DTYPES[info["dtype"]]

    def _load_bin(self, allow_bin: bool) -> None:
        index = self.path / BIN_INDEX
        if index.is_file():
            try:
                files = list(dict.fromkeys(json.loads(index.read_text())["weight_map"].values()))
            except (OSError, ValueError, KeyError) as exc:
                raise CheckpointError(f"cannot parse {index}: {exc}") from None
            files = [self.path / f for f in files]
        else:
            files = sorted(self.path.glob("*.bin"))
        if not files:
            raise CheckpointError(f"{self.name} has no weights (*.safetensors or *.bin)")
        if not allow_bin:
            raise CheckpointError(
                f"{self.name} has only pickled .bin weights, which can run code when loaded; "
                "pass --allow-bin (allow_bin=True) to load them anyway"
            )
        tensors: dict[str, torch.Tensor] = {}
        for file in files:
            try:
                part = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            except Exception as exc:  # noqa: BLE001 - any unpickling failure is the file's fault
                raise CheckpointError(f"cannot load {file}: {exc}".splitlines()[0]) from None
            tensors.update(part)
        self._bin_tensors = tensors
        for name, t in tensors.items():
            self._shape[name] = tuple(t.shape)
            self._dtype[name] = t.dtype

    # -- access ------------------------------------------------------------
    @property
    def architecture(self) -> Architecture:
        """This model's entry in the architecture registry (inferred for a Llama-like unknown one)."""
        if self._architecture is None:
            self._architecture = architecture_of(self.config, self.tensor_names, where=self.name)
        return self._architecture

    @property
    def num_layers(self) -> int:
        return self.architecture.num_layers(self.config, str(self.path / "config.json"))

    def __contains__(self, name: str) -> bool:
        return name in self._shape

    def shape(self, name: str) -> tuple[int, ...]:
        self._check(name)
        return self._shape[name]

    def dtype(self, name: str) -> torch.dtype:
        self._check(name)
        return self._dtype[name]

    def get(self, name: str, mapped: bool = False) -> torch.Tensor:
        """One tensor, read on demand into fresh memory that the caller owns.

        By default a positioned read (pread) into anonymous memory: right for
        tensors kept long (resident sources). ``mapped=True`` maps just this
        tensor's bytes from the page cache instead (pre-faulted): no copy and no
        page-by-page faults, and the mapping goes away with the tensor, so a
        streaming merge does not grow to the size of its sources. A mapped
        tensor is READ-ONLY (writing to it crashes the process): for callers
        that only read, like the merge engine.
        """
        self._check(name)
        if self._bin_tensors is not None:
            return self._bin_tensors[name]
        file = self._file_of[name]
        fd = self._fds.get(file)
        if fd is None:
            fd = self._fds[file] = os.open(file, os.O_RDONLY)
        if mapped:
            return self._mapped(fd, file, name)
        out = torch.empty(self._shape[name], dtype=self._dtype[name])
        nbytes = out.numel() * out.element_size()
        if nbytes:
            view = memoryview(out.reshape(-1).view(torch.uint8).numpy())
            offset, done = self._offset[name], 0
            while done < nbytes:
                n = os.preadv(fd, [view[done:]], offset + done)
                if n <= 0:
                    raise CheckpointError(f"{file} is truncated: tensor {name} ends past the end of the file")
                done += n
        return out

    def _mapped(self, fd: int, file: Path, name: str) -> torch.Tensor:
        shape, dtype = self._shape[name], self._dtype[name]
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        if nbytes == 0:
            return torch.empty(shape, dtype=dtype)
        start = self._offset[name]
        aligned = start - start % mmap.ALLOCATIONGRANULARITY
        if start + nbytes > os.fstat(fd).st_size:
            raise CheckpointError(f"{file} is truncated: tensor {name} ends past the end of the file")
        region = mmap.mmap(fd, start + nbytes - aligned, flags=mmap.MAP_PRIVATE | getattr(mmap, "MAP_POPULATE", 0),
                           prot=mmap.PROT_READ, offset=aligned)
        # The tensor holds the only reference to the mapping: it is unmapped when the tensor dies.
        with warnings.catch_warnings():  # read-only on purpose (see get)
            warnings.filterwarnings("ignore", message="The given buffer is not writable")
            flat = torch.frombuffer(region, dtype=torch.uint8, count=nbytes, offset=start - aligned)
        return flat.view(dtype).reshape(shape)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    def _check(self, name: str) -> None:
        if name not in self._shape:
            raise CheckpointError(f"model {self.name} has no tensor {name}")

    def __repr__(self) -> str:
        return f"Checkpoint({self.name!r}, {len(self.tensor_names)} tensors)"


def copy_tokenizer(src: str | Path, dst: Path) -> list[str]:
    """Copy the tokenizer / generation files that exist in ``src`` into ``dst``."""
    src = Path(src)
    if not src.is_dir():
        raise CheckpointError(f"tokenizer source {src} is not a directory")
    copied = []
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)
            copied.append(name)
    return copied


def _tensor_nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}
LayoutEntry = tuple[str, tuple[int, ...], torch.dtype]


def _split_shards(layout: Sequence[LayoutEntry], max_shard_size: int) -> list[list[LayoutEntry]]:
    shards: list[list[LayoutEntry]] = [[]]
    size = 0
    for name, shape, dtype in layout:
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        if shards[-1] and size + nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append((name, tuple(shape), dtype))
        size += nbytes
    return shards


def _header_bytes(entries: list[LayoutEntry]) -> tuple[bytes, int]:
    """The safetensors header (length prefix + JSON padded to 8 bytes) and the data size."""
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape, dtype in entries:
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": _ST_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text, offset


def _write_streaming(tmp: Path, tensors: Iterable[tuple[str, torch.Tensor]], layout: Sequence[LayoutEntry],
                     max_shard_size: int, out_dir: Path) -> None:
    """Write tensors straight into shards whose headers are known in advance: no buffering."""
    shards = _split_shards(layout, max_shard_size)
    n = len(shards)
    names = ["model.safetensors"] if n == 1 else [f"model-{k:05d}-of-{n:05d}.safetensors" for k in range(1, n + 1)]
    expected = iter([(k, entry) for k, shard in enumerate(shards) for entry in shard])
    current, f = -1, None
    try:
        for name, t in tensors:
            k, (want_name, want_shape, want_dtype) = next(expected, (None, (None, None, None)))
            if (name, tuple(t.shape), t.dtype) != (want_name, want_shape, want_dtype):
                raise CheckpointError(f"tensor {name} {list(t.shape)} {t.dtype} written to {out_dir} where "
                                      f"{want_name} {want_shape and list(want_shape)} {want_dtype} was announced")
            if k != current:
                if f is not None:
                    f.close()
                f = StreamedFile(tmp / names[k])
                f.write(_header_bytes(shards[k])[0])
                current = k
            t = t.detach()
            if t.device.type != "cpu":
                t = t.cpu()
            if t.numel():
                f.write(t.contiguous().reshape(-1).view(torch.uint8).numpy())
        missing = next(expected, None)
        if missing is not None:
            raise CheckpointError(f"tensor stream for {out_dir} ended before {missing[1][0]}")
    except BaseException:
        if f is not None:
            f.abandon()
        raise
    if f is not None:
        f.close()
    if n > 1:
        weight_map = {name: names[k] for k, shard in enumerate(shards) for name, _, _ in shard}
        total = sum(_header_bytes(shard)[1] for shard in shards)
        (tmp / SAFETENSORS_INDEX).write_text(json.dumps({"metadata": {"total_size": total},
                                                         "weight_map": weight_map}, indent=2) + "\n")


def write_checkpoint(
    out_dir: str | Path,
    tensors: Iterable[tuple[str, torch.Tensor]],
    config: dict,
    tokenizer_from: str | Path | None = None,
    max_shard_size: int = 2**30,
    extra_files: dict[str, str] | None = None,
    overwrite: bool = False,
    layout: Sequence[LayoutEntry] | None = None,
) -> Path:
    """Write an HF model directory atomically; returns ``out_dir``.

    Tensors arrive as a stream and are flushed into a shard once the next one
    would push it over ``max_shard_size`` bytes. One shard is written as
    ``model.safetensors``; several as ``model-0000k-of-0000n.safetensors`` plus
    ``model.safetensors.index.json``.

    With ``layout`` (every tensor's name, shape and dtype, in stream order) the
    shard headers are written first and each tensor goes straight to disk as
    it arrives, so no shard is ever held in memory.
    """
    out_dir = Path(out_dir)
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        if layout is not None:
            _write_streaming(tmp, tensors, layout, max_shard_size, out_dir)
        else:
            _write_buffered(tmp, tensors, max_shard_size, out_dir)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        if tokenizer_from is not None:
            copy_tokenizer(tokenizer_from, tmp)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
    return out_dir


def _write_buffered(tmp: Path, tensors: Iterable[tuple[str, torch.Tensor]], max_shard_size: int,
                    out_dir: Path) -> None:
    """Collect tensors into a shard until it is full, then write it (one shard in memory)."""
    from safetensors.torch import save_file

    shard_files: list[tuple[Path, list[str]]] = []
    shard: dict[str, torch.Tensor] = {}
    shard_storages: set[int] = set()
    shard_bytes = 0
    total = 0
    seen: set[str] = set()

    def flush() -> None:
        nonlocal shard, shard_bytes, shard_storages
        file = tmp / f"shard-{len(shard_files):05d}.partial"
        save_file(shard, str(file), metadata={"format": "pt"})
        shard_files.append((file, list(shard)))
        shard, shard_bytes, shard_storages = {}, 0, set()

    for name, t in tensors:
        if name in seen:
            raise CheckpointError(f"tensor {name} written twice to {out_dir}")
        seen.add(name)
        if t.device.type != "cpu":
            t = t.cpu()
        # safetensors refuses two names sharing storage (tied weights) and views.
        nbytes = _tensor_nbytes(t)
        if shard and shard_bytes + nbytes > max_shard_size:
            flush()
        if not t.is_contiguous() or t.untyped_storage().data_ptr() in shard_storages:
            t = t.contiguous().clone()
        shard_storages.add(t.untyped_storage().data_ptr())
        shard[name] = t
        shard_bytes += nbytes
        total += nbytes
    if shard or not shard_files:
        flush()

    if len(shard_files) == 1:
        shard_files[0][0].rename(tmp / "model.safetensors")
    else:
        n = len(shard_files)
        weight_map = {}
        for k, (file, names) in enumerate(shard_files, start=1):
            final_name = f"model-{k:05d}-of-{n:05d}.safetensors"
            file.rename(tmp / final_name)
            weight_map.update({name: final_name for name in names})
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (tmp / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n")
