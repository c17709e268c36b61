"""The README's "From Python" example runs as written (on its tiny model), in a fresh folder."""
from __future__ import annotations

import os
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_the_from_python_example_runs(tmp_path):
    text = README.read_text()
    section = text[text.index("## From Python"):text.index("## Serve it")]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    here = os.getcwd()
    os.chdir(tmp_path)
    try:
        scope: dict = {}
        exec(compile(code, "README.md", "exec"), scope)
    finally:
        os.chdir(here)
    assert (tmp_path / "out" / "model.onnx").is_file() and (tmp_path / "out" / "tuned.pt").is_file()
    assert scope["result"].report["macs"]["onnx_ratio"] <= 0.6 + 1e-6
    assert type(scope["again"]) is type(scope["pruned"])
    assert (tmp_path / "out" / "tuned.onnx").is_file() and scope["report"]["parity"]["max_abs_diff"] < 1e-4
