#!/usr/bin/env python
# Reproduces artifacts/bench/int8_quality.json after `python -m exporter.bench.quality` (it reuses that run's acp @ 0.63 ONNX and k-NN sets).
"""int8 (dynamic and static calibrated on Fashion-MNIST train images) vs fp32 k-NN on dinov2_s, same bank/test as the quality bench."""
import os, json
from pathlib import Path
os.environ["PRUNE_EXPORT_OFFLINE"] = "1"
from exporter.bench.quality import knn_of, CACHE
from exporter.quantize import quantize_int8
from search.images.folders import image_folder, stack_images, balanced_subset
from search.models.load import load_model
lm = load_model("dinov2_s", img_size=112)
root = Path(".cache/fashion-mnist")
bank = stack_images(image_folder(root / "bank200", lm.data_config))
test = stack_images(image_folder(root / "test300", lm.data_config))
calib = stack_images(balanced_subset(image_folder(root / "train100", lm.data_config), 64, 0))[0].numpy()
src = CACHE / "acp___0_63.onnx"
out = {"fp32": knn_of(src, bank, test, 2)}
for mode in ("dynamic", "static"):
    q = quantize_int8(src, Path(f"/tmp/acp063_int8_{mode}.onnx"), mode, calib if mode == "static" else None)
    out[f"int8_{mode}"] = knn_of(q, bank, test, 2)
print(json.dumps(out))
