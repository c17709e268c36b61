"""The ONNX file describes itself: metadata written by a real run, read back, and enough to serve the file.

One CLI run on timm's tiny test_vit with an ImageFolder; the file's metadata alone then drives the
preprocessing (``exporter.serve``), which must give the same tensors as the pipeline's own
(timm's evaluation transform through ``search.images.folders.image_folder``), and the same outputs in ONNX
Runtime and OpenVINO.
"""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from PIL import Image

from exporter.cli import info_app, main
from exporter.metadata import TOOL, read_metadata, tool_version
from exporter.serve import ort_metadata, preprocess, run_images
from search.images.folders import image_folder
from typer.testing import CliRunner

from tests.test_cli import FAST, invoke

needs_openvino = pytest.mark.skipif(importlib.util.find_spec("openvino") is None, reason="openvino is not installed")


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("PRUNE_EXPORT_OFFLINE", "1")


def _photos(root: Path) -> Path:
    """Images of odd sizes and modes in two classes: resize, crop and RGB conversion all have work to do."""
    rng = np.random.default_rng(1)
    shapes = {"a": [(300, 200, "RGB"), (150, 257, "RGB"), (171, 171, "L")], "b": [(64, 90, "RGB"), (401, 233, "RGBA"), (200, 300, "RGB")]}
    for cls, items in shapes.items():
        (root / cls).mkdir(parents=True)
        for i, (w, h, mode) in enumerate(items):
            channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
            pixels = rng.integers(0, 255, (h, w, channels), dtype=np.uint8).squeeze()
            Image.fromarray(pixels, mode).save(root / cls / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> tuple[Path, Path]:
    """(the ONNX file of one run, its ImageFolder)."""
    root = tmp_path_factory.mktemp("meta")
    data = _photos(root / "photos")
    out = root / "m.onnx"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PRUNE_EXPORT_OFFLINE", "1")
        result = invoke("test_vit", "--random-init", "--data", data, "--budget", "0.5", "-o", out, *FAST, "--calib-images", "2")
    assert result.exit_code == 0, result.output
    return out, data


def test_metadata_carries_what_a_server_needs(written):
    out, _ = written
    model = onnx.load(str(out), load_external_data=False)
    assert model.producer_name == TOOL and model.producer_version == tool_version()
    keys = {p.key for p in model.metadata_props}
    assert not [k for k in keys if "onnxsim" in k.lower()]  # onnxsim's debug keys are gone
    report = json.loads(out.with_suffix(".json").read_text())
    meta = read_metadata(out)
    assert meta["model"] == "test_vit" and meta["timm_name"] == report["model"]["timm_name"]
    assert meta["weights"] == "random-init" and meta["random_weights"] is True
    for key in ("input_size", "mean", "std", "interpolation", "crop_pct"):
        assert meta[key] == report["preprocessing"][key], key
    assert meta["budget"] == 0.5 and meta["method"] == "magnitude" and meta["crop_mode"] == "center"
    assert meta["mac_ratio"] == report["macs"]["ratio"] and meta["latency_ratio"] == report["latency"][0]["ratio"]
    assert meta["parity"]["passed"] is True and meta["parity"]["max_abs_diff"] == report["artifact"]["parity"]["max_abs_diff"]
    assert meta["tool"] == TOOL and meta["tool_version"] == tool_version() and meta["precision"] == "fp32"
    assert "160" in model.doc_string and "bicubic" in model.doc_string and "test_vit" in model.doc_string
    # ONNX Runtime exposes the same keys to a server
    session, via_ort = ort_metadata(out)
    assert via_ort == meta and session.get_modelmeta().producer_name == TOOL


def test_preprocessing_from_the_metadata_alone_matches_the_pipeline(written):
    out, data = written
    meta = read_metadata(out)
    dataset = image_folder(data, {k: meta[k] for k in ("input_size", "mean", "std", "interpolation", "crop_pct")})
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    for path, _ in dataset.samples:
        expected = dataset.loader(path)
        theirs = dataset.transform(expected).numpy()[None]
        ours = preprocess(Image.open(path), meta)
        assert ours.shape == (1, 3, 160, 160) and ours.dtype == np.float32
        np.testing.assert_allclose(ours, theirs, atol=1e-6, rtol=0, err_msg=path)
        np.testing.assert_allclose(session.run(None, {"input": ours})[0], session.run(None, {"input": theirs})[0], atol=1e-5)


def test_serving_in_ort_reads_everything_from_the_file(written, tmp_path):
    out, data = written
    alone = tmp_path / "only.onnx"  # no JSON, no report beside it
    alone.write_bytes(out.read_bytes())
    paths = sorted(data.rglob("*.png"))
    outputs, meta = run_images(alone, paths, "ort")
    assert outputs.shape == (len(paths), 1000) and meta["input_size"] == [3, 160, 160]
    dataset = image_folder(data, {k: meta[k] for k in ("input_size", "mean", "std", "interpolation", "crop_pct")})
    batch = np.stack([dataset.transform(dataset.loader(str(p))).numpy() for p in paths])
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(outputs, session.run(None, {"input": batch})[0], atol=1e-5)


@needs_openvino
def test_serving_in_openvino_reads_the_same_metadata(written):
    out, data = written
    paths = sorted(data.rglob("*.png"))[:3]
    via_ov, meta_ov = run_images(out, paths, "openvino")
    via_ort, meta_ort = run_images(out, paths, "ort")
    assert meta_ov == meta_ort
    np.testing.assert_allclose(via_ov, via_ort, atol=1e-4, rtol=1e-4)


def test_info_prints_the_metadata(written, capsys, monkeypatch):
    out, _ = written
    result = CliRunner().invoke(info_app, [str(out)])
    assert result.exit_code == 0, result.output
    assert f"{TOOL} {tool_version()}" in result.output and "input [batch, 3, 160, 160]" in result.output
    assert "interpolation" in result.output and "bicubic" in result.output and "mac_ratio" in result.output
    as_json = CliRunner().invoke(info_app, [str(out), "--json"])
    assert json.loads(as_json.output) == read_metadata(out)
    # the console script dispatches `prune-export info` to the reader
    monkeypatch.setattr(sys, "argv", ["prune-export", "info", str(out)])
    with pytest.raises(SystemExit) as done:
        main()
    assert done.value.code in (0, None) and "crop_pct" in capsys.readouterr().out


def test_info_on_a_missing_or_foreign_file_is_one_line(tmp_path):
    missing = CliRunner().invoke(info_app, [str(tmp_path / "none.onnx")])
    assert missing.exit_code == 2 and missing.output.strip().count("\n") == 0 and "does not exist" in missing.output
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a protobuf at all" * 10)
    bad = CliRunner().invoke(info_app, [str(junk)])
    assert bad.exit_code == 2 and "cannot be read as ONNX" in bad.output and "Traceback" not in bad.output


def test_a_quantized_file_says_so(tmp_path):
    out = tmp_path / "q.onnx"
    result = invoke("test_vit", "--random-init", "--quantize", "int8", "-o", out, *FAST)
    assert result.exit_code == 0, result.output
    meta = read_metadata(out)
    assert meta["precision"] == "int8 dynamic" and "mean_cosine" in meta["parity"]


def test_the_readme_serving_snippet_gives_the_pipeline_outputs(written, tmp_path):
    out, data = written
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme[readme.index("## Serve it"):]
    code = section[section.index("```python") + len("```python"):section.index("```", section.index("```python") + 9)]
    image = sorted(data.rglob("*.png"))[1]  # 150 x 257: the shorter side is the width
    namespace: dict = {}
    exec(code.replace('"OUT.onnx"', repr(str(out))).replace('"cat.jpg"', repr(str(image))), namespace)
    meta = read_metadata(out)
    dataset = image_folder(data, {k: meta[k] for k in ("input_size", "mean", "std", "interpolation", "crop_pct")})
    expected = dataset.transform(dataset.loader(str(image))).numpy()[None]
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(namespace["output"], session.run(None, {"input": expected})[0], atol=1e-5)
