"""Bad input, command by command: each case is one line `error: ...`, exit status 2, and
nothing left behind (no output, no run directory, an existing run unchanged)."""

from __future__ import annotations

import os
import socket
import struct
from pathlib import Path

import pytest
import torch
import yaml

from evomerge.cli import main

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SYNTHETIC = {"seed": 1, "genome": {"kind": "box", "dim": 3},
             "objectives": [{"name": "a", "task": "synthetic/a"}, {"name": "b", "task": "synthetic/b"}],
             "evaluator": {"kind": "synthetic"}, "optimizer": {"name": "random", "population": 3, "generations": 2}}


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """Two tiny Llamas with a tokenizer, and damaged copies of one."""
    import shutil

    from evomerge.io.synthetic import make_tiny_llama
    from evomerge.zoo.tokenizer import build_tokenizer, save_tokenizer

    root = tmp_path_factory.mktemp("models")
    save_tokenizer(root / "tok")
    vocab = build_tokenizer().get_vocab_size()
    base = make_tiny_llama(root / "base", vocab_size=vocab, tokenizer_from=root / "tok")
    tuned = make_tiny_llama(root / "tuned", base=base, noise=0.1, seed=1, tokenizer_from=root / "tok")
    huge = Path(shutil.copytree(tuned, root / "huge-header"))
    weights = huge / "model.safetensors"
    weights.write_bytes(struct.pack("<Q", 2**40) + weights.read_bytes()[8:])   # header "length" of a terabyte
    truncated = Path(shutil.copytree(tuned, root / "truncated"))
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) * 2 // 3])
    pickled = Path(shutil.copytree(tuned, root / "pickled"))
    from safetensors.torch import load_file

    torch.save(load_file(pickled / "model.safetensors"), pickled / "pytorch_model.bin")
    (pickled / "model.safetensors").unlink()
    return {"base": base, "tuned": tuned, "huge": huge, "truncated": truncated, "pickled": pickled}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("run")
    (root / "c.yaml").write_text(yaml.safe_dump(SYNTHETIC))
    assert main(["search", str(root / "c.yaml"), "--run-dir", str(root / "run"), "--no-progress"]) == 0
    return root / "run"


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]     # nothing listens there once the socket is closed


def merge_search(tmp: Path, models, **changes) -> list[str]:
    cfg = {"seed": 0, "sources": {"base": str(models["base"]), "tuned": str(models["tuned"])}, "base": "base",
           "genome": {"kind": "parameter", "method": "task_arithmetic", "granularity": "model"},
           "objectives": [{"name": "calc", "task": "zoo/calc:search", "scoring": "likelihood",
                           "estimator": "subset"}],
           "evaluator": {"threads": 1}, "optimizer": {"name": "random", "population": 2, "generations": 1}}
    for key, value in changes.items():
        cfg[key] = {**cfg[key], **value} if isinstance(value, dict) and isinstance(cfg.get(key), dict) else value
    (tmp / "search.yaml").write_text(yaml.safe_dump(cfg))
    return ["search", str(tmp / "search.yaml"), "--run-dir", str(tmp / "run"), "--no-progress"]


def recipe(tmp: Path, *paths: Path) -> Path:
    (tmp / "recipe.yaml").write_text(yaml.safe_dump(
        {"merge_method": "linear", "models": [{"model": str(p), "parameters": {"weight": 1.0}} for p in paths]}))
    return tmp / "recipe.yaml"


def damage_archive(run: Path, tmp: Path, how: str) -> Path:
    import shutil

    copy = Path(shutil.copytree(run, tmp / "damaged"))
    path = copy / "archive.sqlite"
    data = path.read_bytes()
    path.write_bytes(b"\x00garbage\xff" * 100 if how == "garbage" else data[: len(data) // 2])
    for side in ("archive.sqlite-wal", "archive.sqlite-shm"):
        (copy / side).unlink(missing_ok=True)
    return copy


# Each case: (inputs made in tmp) -> (argv, message regex); `tmp / "out"` and `tmp / "run"` must not appear.
CASES = {
    "search: a binary config file": lambda tmp, m, r: (
        ["search", str(write(tmp / "c.yaml", os.urandom(64) + b"\xff\xfe")), "--run-dir", str(tmp / "run")],
        r"c.yaml: not a text file"),
    "merge: a binary recipe": lambda tmp, m, r: (
        ["merge", str(write(tmp / "r.yaml", b"\x89PNG\r\n\x1a\n\xff\xfe" * 8)), str(tmp / "out")],
        r"r.yaml: not a text file"),
    "merge: a safetensors header length of 2**40": lambda tmp, m, r: (
        ["merge", str(recipe(tmp, m["base"], m["huge"])), str(tmp / "out")],
        r"huge-header/model.safetensors: header length 1099511627776 exceeds the file's \d+ bytes"),
    "search: a safetensors header length of 2**40": lambda tmp, m, r: (
        merge_search(tmp, m, sources={"base": str(m["base"]), "tuned": str(m["huge"])}),
        r"huge-header/model.safetensors: header length 1099511627776 exceeds"),
    "search: device cuda on a machine without CUDA": lambda tmp, m, r: (
        merge_search(tmp, m, evaluator={"device": "cuda"}), r"evaluator.device: 'cuda' asked for, but this machine"),
    "search: an unknown inference backend": lambda tmp, m, r: (
        merge_search(tmp, m, evaluator={"backend": "tensorrt"}), r"evaluator.backend: unknown backend 'tensorrt'"),
    "search: an unreachable Ray cluster": lambda tmp, m, r: (
        merge_search(tmp, m)[:-1] + ["--address", f"127.0.0.1:{closed_port()}", "--no-progress"],
        r"cannot reach the Ray cluster at 127.0.0.1:\d+ \(Connection refused\)"),
    "search: an objective name that is a path": lambda tmp, m, r: (
        merge_search(tmp, m, objectives=[{"name": "../../escaped", "task": "zoo/calc:search"}]),
        r"objectives.0.name: '../../escaped' is not a plain name"),
    "resume: an archive.sqlite that is not SQLite": lambda tmp, m, r: (
        ["resume", str(damage_archive(r, tmp, "garbage"))], r"damaged/archive.sqlite: the archive cannot be read"),
    "resume: a truncated archive.sqlite": lambda tmp, m, r: (
        ["resume", str(damage_archive(r, tmp, "truncated"))], r"damaged/archive.sqlite"),
    "status: an archive.sqlite that is not SQLite": lambda tmp, m, r: (
        ["status", str(damage_archive(r, tmp, "garbage"))], r"damaged/archive.sqlite: the archive cannot be read"),
    "status: a truncated archive.sqlite": lambda tmp, m, r: (
        ["status", str(damage_archive(r, tmp, "truncated"))], r"damaged/archive.sqlite"),
    "export: into a path that is a file": lambda tmp, m, r: (
        ["export", str(r), str(write(tmp / "a-file", b"keep me")), "--top", "1"],
        r"a-file: exists and is not a directory"),
    "eval: a truncated model": lambda tmp, m, r: (
        ["eval", str(m["truncated"]), "--tasks", "zoo/calc:heldout", "--limit", "2"],
        r"truncated/model.safetensors: tensor .* past the end of the file .*: the file is truncated"),
    "eval: --device cuda without CUDA": lambda tmp, m, r: (
        ["eval", str(m["base"]), "--tasks", "zoo/calc:heldout", "--device", "cuda"],
        r"--device: 'cuda' asked for, but this machine cannot use CUDA"),
    "merge: --device cuda without CUDA": lambda tmp, m, r: (
        ["merge", str(recipe(tmp, m["base"], m["tuned"])), str(tmp / "out"), "--device", "cuda"],
        r"--device cuda: CUDA is not available"),
    "eval: an lm-eval task YAML with !function": lambda tmp, m, r: (
        ["eval", str(m["base"]), "--tasks", str(lm_eval_yaml_with_code(tmp))],
        r"task.yaml uses !function \(Python from the task's folder\); evomerge runs it only when asked"),
    "eval: pickled weights without --allow-bin": lambda tmp, m, r: (
        ["eval", str(m["pickled"]), "--tasks", "zoo/calc:heldout"], r"only pickled .bin weights.*--allow-bin"),
}


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def lm_eval_yaml_with_code(tmp: Path) -> Path:
    (tmp / "utils.py").write_text(f"import pathlib\npathlib.Path({str(tmp / 'code-ran')!r}).touch()\n"
                                  "def text(doc):\n    return doc['q']\n")
    (tmp / "task.yaml").write_text("task: mine\ndataset_path: json\noutput_type: multiple_choice\n"
                                   "doc_to_text: !function utils.text\ndoc_to_target: a\n")
    return tmp / "task.yaml"


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_exit_2_and_leaves_nothing_behind(case, models, finished_run, tmp_path, capsys):
    if "cuda" in case and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    import re

    work = tmp_path / "work"
    work.mkdir()
    argv, message = CASES[case](work, models, finished_run)
    before = snapshot(work)
    run_before = snapshot(finished_run)
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert re.search(message, err[0]), err[0]
    assert not (work / "out").exists() and not (work / "run").exists()
    assert not (work / "code-ran").exists()
    strip = lambda snap: {k: v for k, v in snap.items() if not k.endswith(("-wal", "-shm"))}  # noqa: E731
    assert strip(snapshot(work)) == strip(before)               # nothing written, nothing changed
    assert strip(snapshot(finished_run)) == strip(run_before)
    assert not list(tmp_path.parent.glob("escaped"))


def test_eval_allow_bin_loads_pickled_weights_when_asked(models, capsys):
    capsys.readouterr()
    assert main(["eval", str(models["pickled"]), "--tasks", "zoo/calc:heldout", "--limit", "2", "--allow-bin"]) == 0
    assert "zoo/calc:heldout" in capsys.readouterr().out


def full_disk(path="shard"):
    import errno

    def write(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", path)
    return write


def test_a_full_disk_during_a_merge_is_one_line_and_leaves_no_partial_model(models, tmp_path, capsys, monkeypatch):
    import evomerge.io.checkpoint as checkpoint

    monkeypatch.setattr(checkpoint, "_write_streaming", full_disk(str(tmp_path / "out" / "model.safetensors")))
    monkeypatch.setattr(checkpoint, "_write_buffered", full_disk(str(tmp_path / "out" / "model.safetensors")))
    capsys.readouterr()
    assert main(["merge", str(recipe(tmp_path, models["base"], models["tuned"])), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: no space left on the device (writing "), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recipe.yaml"]     # no temporary left either


def test_a_full_disk_during_a_search_is_one_line_and_the_run_resumes_later(tmp_path, capsys, monkeypatch):
    import sqlite3

    from evomerge.search.archive import Archive

    (tmp_path / "c.yaml").write_text(yaml.safe_dump(SYNTHETIC))
    real_add = Archive.add
    calls = []

    def add(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 4:
            raise sqlite3.OperationalError("database or disk is full")
        return real_add(self, *args, **kwargs)

    monkeypatch.setattr(Archive, "add", add)
    capsys.readouterr()
    assert main(["search", str(tmp_path / "c.yaml"), "--run-dir", str(tmp_path / "run"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: no space left on the device"], err
    monkeypatch.setattr(Archive, "add", real_add)            # space freed: the run continues where it was
    assert main(["resume", str(tmp_path / "run"), "--no-progress"]) == 0
    assert "evaluations:  6 (6 ok" in capsys.readouterr().out


def test_main_parses_the_arguments_it_is_given_and_leaves_sys_argv_alone(monkeypatch, capsys):
    import sys

    from evomerge.cli import main

    monkeypatch.setattr(sys, "argv", ["pytest", "--some-flag-of-the-caller"])
    monkeypatch.delenv("EVOMERGE_ZOO_DIR", raising=False)
    assert main(["zoo", "path"]) == 0
    assert sys.argv == ["pytest", "--some-flag-of-the-caller"]
    assert "checksums match" in capsys.readouterr().out
