"""The README is a user guide that stays true: its Python example runs, and it stays short."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_the_readme_is_a_short_guide_with_one_python_example():
    text = README.read_text()
    assert len(text.splitlines()) < 350
    assert len(python_blocks(text)) == 1
    # the user guide comes first; the measured results have their own page
    assert text.index("## Two commands") < text.index("## In Python") < text.index("## Results")
    assert "(docs/results.md)" in text and (ROOT / "docs" / "results.md").is_file()


@pytest.mark.slow
def test_the_readme_python_example_searches_and_exports_a_loadable_model(tmp_path, monkeypatch, capsys):
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("EVOMERGE_ZOO_DIR", raising=False)
    monkeypatch.chdir(ROOT)                      # the example names configs/demo.yaml as a user in the repo would
    code = python_blocks(README.read_text())[0]
    code = code.replace('"runs/example"', repr(str(tmp_path / "run"))).replace('"out/example"',
                                                                                 repr(str(tmp_path / "out")))
    exec(compile(code, str(README), "exec"), {"__name__": "readme_example"})
    printed = capsys.readouterr().out
    exported = [p for p in (tmp_path / "out").iterdir() if p.is_dir()]
    assert len(exported) == 1 and str(exported[0]) in printed
    assert (exported[0] / "mergekit.yaml").is_file() and (exported[0] / "README.md").is_file()
    assert AutoModelForCausalLM.from_pretrained(exported[0]).config.num_hidden_layers == 4
    assert os.path.isfile(tmp_path / "run" / "archive.sqlite")
