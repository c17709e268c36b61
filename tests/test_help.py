"""The command line's help: panels, choices, every model named, fast, and in step with the README's usage."""
from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import typer
from typer.testing import CliRunner

from exporter.cli import MODELS_HELP, app
from exporter.options import PANELS, PRECISIONS, QUANTIZE, QUANTIZE_MODES, RUNTIME_NAMES, TARGETS
from search.core.choices import DEVICE_FORMS, HEAD_SCOPES, INDICATORS, METHOD_NAMES, OPTIMISERS, WIDTHS

ROOT = Path(__file__).resolve().parents[1]
FIXED = {
    "--method": METHOD_NAMES, "--indicator": INDICATORS, "--widths": WIDTHS, "--gate-optimiser": OPTIMISERS,
    "--heads-scope": HEAD_SCOPES, "--target": TARGETS, "--precision": PRECISIONS, "--quantize": QUANTIZE,
    "--quantize-mode": QUANTIZE_MODES, "--device": DEVICE_FORMS, "--runtimes": RUNTIME_NAMES,
}


def _params() -> list:
    return [p for p in typer.main.get_command(app).params if p.name != "help"]


def _flag(param) -> str:
    return next((o for o in param.opts if o.startswith("--")), param.opts[0]) if param.opts else param.name


def cli_panels() -> dict[str, set[str]]:
    """Panel → the long option names in it (the MODEL argument as ``MODEL``)."""
    panels: dict[str, set[str]] = {}
    for p in _params():
        name = "MODEL" if p.param_type_name == "argument" else _flag(p)
        panels.setdefault(p.rich_help_panel, set()).add(name)
    return panels


def readme_panels() -> dict[str, set[str]]:
    """Panel → the options the README's usage block lists under it."""
    text = (ROOT / "README.md").read_text()
    usage = text[text.index("## Usage"):]
    block = re.search(r"\n\n((?:    .*\n|\n)+)", usage).group(1)
    panels: dict[str, set[str]] = {}
    current = None
    for line in block.splitlines():
        head = next((name for name in PANELS if line.strip().startswith(name)), None)
        if head is not None:
            current = head
            line = line.strip()[len(head):]
        elif not line.startswith("     ") and not line.strip().startswith("--"):
            current = None  # a command line or a blank: no panel
        if current is not None:
            found = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", line))
            found |= {"MODEL"} if re.search(r"\bMODEL\b", line) else set()
            found |= {"--output"} if re.search(r"(?<![\w-])-o\b", line) else set()
            panels.setdefault(current, set()).update(found)
    return panels


def test_every_option_is_in_one_of_the_agreed_panels():
    for p in _params():
        assert p.rich_help_panel in PANELS, f"{_flag(p)} has panel {p.rich_help_panel!r}"
    assert set(cli_panels()) == set(PANELS)


def test_the_help_shows_the_panels_and_lists_every_choice(monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    result = CliRunner().invoke(app, ["--help"])
    assert result.exit_code == 0, result.output
    for panel in PANELS:
        assert panel in result.output
    by_flag = {_flag(p): p for p in _params()}
    for flag, choices in FIXED.items():
        for choice in choices:
            assert choice in by_flag[flag].help, f"{flag}'s help does not list {choice}"
    assert "PRUNE_EXPORT_DEBUG" in result.output and "prune-export info" in result.output


def test_the_model_help_names_every_bundled_model_and_alias():
    from search.models.load import known_names

    for name in known_names():
        assert re.search(rf"\b{re.escape(name)}\b", MODELS_HELP), name
    assert "timm" in MODELS_HELP


def test_the_torch_free_choices_match_the_modules_that_use_them():
    from exporter.runtimes import RUNTIMES
    from search.methods.acp import AcpConfig
    from search.methods.dsp import DspConfig
    from search.methods.registry import METHODS

    assert set(METHOD_NAMES) == set(METHODS) and tuple(RUNTIME_NAMES) == tuple(RUNTIMES)
    d = AcpConfig(budget=0.5)
    assert d.indicator in INDICATORS and d.widths in WIDTHS and d.optimiser in OPTIMISERS
    assert DspConfig().lr > 0


def test_readme_usage_lists_every_option_in_its_panel():
    readme, cli = readme_panels(), cli_panels()
    for panel in PANELS:
        missing = cli.get(panel, set()) - readme.get(panel, set())
        extra = readme.get(panel, set()) - cli.get(panel, set())
        assert not missing, f"README usage, panel {panel!r}, lacks {sorted(missing)}"
        assert not extra, f"README usage, panel {panel!r}, lists {sorted(extra)}, which the CLI has not there"


def test_help_and_bad_values_answer_without_importing_torch():
    code = (
        "import sys, time\n"
        "from exporter.cli import main\n"
        "sys.argv = ['prune-export', 'deit_b', '--budget', '2', '-o', 'x.onnx']\n"
        "try:\n    main()\nexcept SystemExit as e:\n    code = e.code\n"
        "heavy = [m for m in ('torch', 'timm', 'onnx', 'onnxruntime') if m in sys.modules]\n"
        "print(code, heavy)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.stdout.strip() == "2 []", proc.stdout + proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and "--budget" in proc.stderr
    exe = Path(sys.executable).with_name("prune-export")
    start = time.perf_counter()
    help_run = subprocess.run([str(exe), "--help"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    elapsed = time.perf_counter() - start
    assert help_run.returncode == 0 and "Budget and method" in help_run.stdout
    assert elapsed < 10, f"--help took {elapsed:.1f} s"  # about 0.5 s idle; the bound leaves room for a loaded machine


def test_usage_errors_are_one_line_with_exit_2(tmp_path):
    out = tmp_path / "m.onnx"
    for args, needle in ((["deit_b", "--align", "0", "-o", out], "--align"), (["deit_b", "-o", out, "--bogus"], "--bogus"),
                         ([], "model"), (["deit_b", "--seed", "x", "-o", out], "--seed"),
                         (["deit_b", "--method", "best", "-o", out], "acp, magnitude")):
        result = CliRunner().invoke(app, [str(a) for a in args])
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert result.exit_code == 2 and len(lines) == 1, result.output
        assert lines[0].startswith("error:") and needle in lines[0]
        assert not out.exists() and not out.with_suffix(".work").exists()
