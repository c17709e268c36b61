"""OpenVINO as a second runtime: parity, latency and the CLI's --runtimes, on tiny real ViTs.

Tests that run OpenVINO skip where it is not installed (``make test`` installs it through the dev
extra); the tests of a missing OpenVINO hide it from ``import`` and run everywhere.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from timm.models.vision_transformer import VisionTransformer
from typer.testing import CliRunner

from exporter.cli import app
from search.core.errors import (
    UserError,
    NonFiniteReferenceError,
    OutputShapeMismatch,
    OutputValuesMismatch,
    RuntimeLoadError,
    RuntimeUnavailableError,
    UnknownRuntimeError,
)
from exporter.timing import measure_latency
from exporter.onnx_export import export_onnx
from exporter.report import markdown
from exporter.runtimes import RUNTIMES, get_runtime, parse_runtimes, require_runtimes
from exporter.runtimes import openvino as ov_runtime
from exporter.parity import check_parity
from tests.conftest import tiny_vit
from tests.test_cli import FAST, assert_clean_failure

needs_openvino = pytest.mark.skipif(
    not ov_runtime.is_available(), reason="OpenVINO is not installed; pip install 'prune-export[openvino]'"
)
BOTH = ["ort", pytest.param("openvino", marks=needs_openvino)]
INSTALL_HINT = "pip install 'prune-export[openvino]'"


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("PRUNE_EXPORT_OFFLINE", "1")


@pytest.fixture
def no_openvino(monkeypatch):
    """Make ``import openvino`` fail, as on a machine without the package."""
    monkeypatch.setitem(sys.modules, "openvino", None)


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[VisionTransformer, Path]:
    model = tiny_vit()
    return model, export_onnx(model, tmp_path_factory.mktemp("ov") / "tiny.onnx", (3, 32, 32))


def _inputs(n: int = 11) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def _corrupted(src: Path, dst: Path, value: float) -> Path:
    """``src`` with half of its largest initializer shifted by ``value`` (NaN poisons it)."""
    graph = onnx.load(str(src))
    largest = max(graph.graph.initializer, key=lambda t: int(np.prod(t.dims)))
    weights = numpy_helper.to_array(largest).copy()
    weights.flat[: weights.size // 2] += value
    largest.CopyFrom(numpy_helper.from_array(weights, largest.name))
    onnx.save(graph, str(dst))
    return dst


@needs_openvino
def test_openvino_parity_passes(exported: tuple[VisionTransformer, Path]) -> None:
    model, path = exported
    result = check_parity(path, model, _inputs(), classifier=True, batch_size=4, runtime="openvino")
    assert result.passed and result.runtime == "openvino"
    assert result.num_samples == 11 and result.top1_agreement == 1.0
    assert result.max_abs_diff < 1e-4 and result.min_cosine > 0.9999


@needs_openvino
def test_openvino_parity_fails_on_a_wrong_export(exported: tuple[VisionTransformer, Path], tmp_path: Path) -> None:
    model, path = exported
    bad = _corrupted(path, tmp_path / "bad.onnx", 5.0)
    with pytest.raises(OutputValuesMismatch, match="in OpenVINO differs") as info:
        check_parity(bad, model, _inputs(), classifier=True, runtime="openvino")
    assert isinstance(info.value, UserError)
    assert info.value.result.runtime == "openvino" and info.value.max_abs_diff > info.value.tolerance
    with pytest.raises(OutputShapeMismatch, match="in OpenVINO") as shape:
        check_parity(path, tiny_vit(num_classes=7), _inputs(2), classifier=True, runtime="openvino")
    assert shape.value.expected == (2, 7) and shape.value.actual == (2, 10)


class _PoisonSecondCall:
    """Forward hook that writes a NaN into the model's output on its second call only.

    The NaN then sits in the second batch, where Python's max() and min() would skip it.
    """

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, module, args, output: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls == 2:
            output = output.clone()
            output[-1, 0] = float("nan")
        return output


@pytest.mark.parametrize("runtime", BOTH)
def test_nan_in_the_pytorch_output_fails(exported: tuple[VisionTransformer, Path], runtime: str) -> None:
    model, path = exported
    handle = model.register_forward_hook(_PoisonSecondCall())
    try:
        with pytest.raises(NonFiniteReferenceError, match="PyTorch model produced non-finite") as info:
            check_parity(path, model, _inputs(8), classifier=True, batch_size=4, runtime=runtime)
    finally:
        handle.remove()
    assert info.value.bad == 1
    assert check_parity(path, model, _inputs(8), classifier=True, batch_size=4, runtime=runtime).passed


@pytest.mark.parametrize("runtime", BOTH)
def test_nan_in_the_onnx_output_fails(exported: tuple[VisionTransformer, Path], tmp_path: Path, runtime: str) -> None:
    model, path = exported
    poisoned = _corrupted(path, tmp_path / "nan.onnx", float("nan"))
    with pytest.raises(OutputValuesMismatch) as info:
        check_parity(poisoned, model, _inputs(4), classifier=True, runtime=runtime)
    assert math.isnan(info.value.result.max_abs_diff)


@needs_openvino
def test_openvino_session_settings(exported: tuple[VisionTransformer, Path]) -> None:
    _, path = exported
    session = get_runtime("openvino").load(path, threads=1)
    assert session.output_names == ["output"]
    assert session.settings["INFERENCE_NUM_THREADS"] == 1
    assert session.settings["PERFORMANCE_HINT"] == "LATENCY"
    assert session.settings["INFERENCE_PRECISION_HINT"] == "f32"  # not the bf16 some CPUs default to
    assert session.run(_inputs(3).numpy()).shape == (3, 10)


@needs_openvino
def test_openvino_cannot_load_an_unknown_op(tmp_path: Path) -> None:
    node = helper.make_node("NoSuchOp", ["input"], ["output"], domain="example.unknown")
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1])],
    )
    path = tmp_path / "unknown.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("example.unknown", 1)]), str(path))
    with pytest.raises(RuntimeLoadError, match="NoSuchOp") as info:
        get_runtime("openvino").load(path, threads=1)
    assert "\n" not in str(info.value) and "OpenVINO cannot load unknown.onnx" in str(info.value)


@pytest.fixture(scope="module")
def two_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("ov-latency")
    return {
        "pruned": export_onnx(tiny_vit(depth=1), folder / "small.onnx", (3, 32, 32)),
        "dense": export_onnx(tiny_vit(depth=3), folder / "large.onnx", (3, 32, 32)),
    }


@needs_openvino
def test_openvino_latency_gives_medians_and_a_ratio(two_models: dict[str, Path]) -> None:
    result = measure_latency(
        two_models, batch=2, threads=1, runs=5, warmup=1, input_size=(3, 32, 32), progress=False, runtime="openvino"
    )
    assert (result.runtime, result.provider, result.runs, result.batch, result.threads) == ("openvino", "CPU", 5, 2, 1)
    assert set(result.median_ms) == {"pruned", "dense"} and all(ms > 0 for ms in result.median_ms.values())
    assert all(len(times) == 5 for times in result.samples_ms.values())
    assert result.ratio("pruned", "dense") == result.median_ms["pruned"] / result.median_ms["dense"]
    assert result.settings["INFERENCE_NUM_THREADS"] == 1 and result.settings["PERFORMANCE_HINT"] == "LATENCY"
    assert result.machine["openvino"] and result.machine["onnxruntime"]


def test_ort_latency_is_unchanged_by_default(two_models: dict[str, Path]) -> None:
    result = measure_latency(two_models, batch=1, threads=1, runs=2, warmup=0, input_size=(3, 32, 32), progress=False)
    assert (result.runtime, result.provider) == ("ort", "CPUExecutionProvider")
    assert result.settings["allow_spinning"] == "0" and result.settings["intra_op_num_threads"] == 1
    assert "openvino" not in result.machine


def test_runtime_names_are_parsed_and_checked() -> None:
    assert parse_runtimes("ort") == ("ort",)
    assert parse_runtimes(" ort, OpenVINO ,ort") == ("ort", "openvino")
    for text, needle in (("bogus", "unknown runtime 'bogus'"), ("ort,", None), ("", "no runtime given")):
        if needle is None:
            assert parse_runtimes(text) == ("ort",)
            continue
        with pytest.raises(UnknownRuntimeError, match=needle) as info:
            parse_runtimes(text)
        assert "ort, openvino" in str(info.value) and isinstance(info.value, UserError)
    assert set(RUNTIMES) == {"ort", "openvino"}
    with pytest.raises(UnknownRuntimeError):
        measure_latency({"a": Path("a.onnx")}, batch=1, threads=1, runtime="tensorrt")


def test_missing_openvino_is_a_user_error_naming_the_extra(no_openvino, exported) -> None:
    assert not ov_runtime.is_available() and ov_runtime.version() is None
    with pytest.raises(RuntimeUnavailableError) as info:
        require_runtimes(("ort", "openvino"))
    assert str(info.value) == f"OpenVINO is not installed; {INSTALL_HINT}" and info.value.exit_code == 2
    model, path = exported
    with pytest.raises(RuntimeUnavailableError):
        check_parity(path, model, _inputs(2), classifier=True, runtime="openvino")
    assert require_runtimes(("ort",))[0].NAME == "ort"


def invoke(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args])


def _one_line(output: str) -> str:
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == 1, output
    return lines[0]


@needs_openvino
def test_cli_reports_both_runtimes(tmp_path: Path) -> None:
    out = tmp_path / "m.onnx"
    result = invoke("test_vit", "--random-init", "--runtimes", "ort,openvino", "-o", out, *FAST)
    assert result.exit_code == 0, result.output
    assert out.is_file()
    report = json.loads(out.with_suffix(".json").read_text())
    assert list(report["runtimes"]) == ["ort", "openvino"]
    for name, section in report["runtimes"].items():
        assert section["parity"]["passed"] and section["parity"]["runtime"] == name
        assert section["parity"]["max_abs_diff"] < 1e-4 and section["version"]
        assert section["latency"] and all(e["runtime"] == name and e["ratio"] > 0 for e in section["latency"])
    assert report["runtimes"]["openvino"]["latency"][0]["provider"] == "CPU"
    assert report["runtimes"]["openvino"]["latency"][0]["settings"]["INFERENCE_PRECISION_HINT"] == "f32"
    # The top-level keys stay ONNX Runtime's, as before --runtimes existed.
    assert report["parity"]["runtime"] == "ort" and report["parity"] == report["runtimes"]["ort"]["parity"]
    assert report["latency"] == report["runtimes"]["ort"]["latency"]
    assert report["latency"][0]["provider"] == "CPUExecutionProvider"
    assert report["machine"]["openvino"] == report["runtimes"]["openvino"]["version"]
    md = out.with_suffix(".md").read_text()
    assert "parity (OpenVINO vs PyTorch" in md and "latency OpenVINO CPU batch 1" in md
    assert "parity (ONNX Runtime vs PyTorch" in md and "latency CPUExecutionProvider batch 1" in md


def test_cli_default_is_ort_only(tmp_path: Path) -> None:
    out = tmp_path / "m.onnx"
    result = invoke("test_vit", "--random-init", "-o", out, *FAST)
    assert result.exit_code == 0, result.output
    report = json.loads(out.with_suffix(".json").read_text())
    assert list(report["runtimes"]) == ["ort"] and "openvino" not in report["machine"]


def test_cli_unknown_runtime_exits_2_with_one_line(tmp_path: Path) -> None:
    out = tmp_path / "m.onnx"
    result = invoke("test_vit", "--random-init", "--runtimes", "ort,bogus", "-o", out, *FAST)
    assert_clean_failure(result, out, "unknown runtime 'bogus'", "ort, openvino")
    assert _one_line(result.output).startswith("error:")


def test_cli_without_openvino_exits_2_naming_the_extra(no_openvino, tmp_path: Path) -> None:
    out = tmp_path / "m.onnx"
    result = invoke("test_vit", "--random-init", "--runtimes", "ort,openvino", "-o", out, *FAST)
    assert_clean_failure(result, out, "OpenVINO is not installed", INSTALL_HINT)
    assert _one_line(result.output).startswith("error:")
    assert not list(tmp_path.iterdir())


def test_markdown_of_a_report_without_runtimes_still_renders() -> None:
    parity = {"num_samples": 4, "inputs": "x", "max_abs_diff": 1e-7, "min_cosine": 1.0, "top1_agreement": None}
    latency = [{"provider": "CPUExecutionProvider", "batch": 1, "threads": 2, "runs": 3,
                "median_ms": {"dense": 2.0, "pruned": 1.0}, "ratio": 0.5}]
    report = {"model": {"name": "m", "weights": "w", "random_weights": False}, "plan": {"budget": 0.5, "method": "magnitude", "align": 8},
              "macs": {"dense": 2e9, "pruned": 1e9, "ratio": 0.5}, "params": {"dense": 2e6, "pruned": 1e6},
              "parity": parity, "latency": latency, "blocks": []}
    md = markdown(report)
    assert "parity (ONNX Runtime vs PyTorch" in md and "ratio **0.500**" in md
