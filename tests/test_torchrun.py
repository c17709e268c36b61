"""The README's torchrun command, end to end on 2 gloo ranks with timm's tiny test_vit."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(*args: str) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("prune-export")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PRUNE_EXPORT_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), "--no-python", str(exe), *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)


def test_torchrun_without_data_writes_the_model_and_resumes(tmp_path):
    # magnitude scoring has no collective: rank 0 used to write plan.json before rank 1 looked for
    # it, so rank 1 skipped the barrier, exited, and rank 0 died in gloo.
    out = tmp_path / "m.onnx"
    args = ("test_vit", "--random-init", "-o", str(out), "--latency-runs", "1", "--calib-images", "4", "--keep-work")
    first = _torchrun(*args)
    assert first.returncode == 0, first.stderr[-3000:]
    assert json.loads(out.with_suffix(".json").read_text())["search"]["ranks"] == 2
    again = _torchrun(*args)
    assert again.returncode == 0 and "resumed" in again.stderr, again.stderr[-3000:]
