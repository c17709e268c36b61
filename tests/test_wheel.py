"""The public API from an installed wheel, not from the checkout: what a user who runs `pip install prune-export` gets."""
from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.timeout(600)
def test_the_built_wheel_installs_and_imports_prune_export_from_site_packages(tmp_path):
    # built from a copy: setuptools leaves build/ beside the sources, and a stale build/lib there would ship
    # modules the checkout no longer has in the next wheel
    source = tmp_path / "source"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".git", ".venv", ".cache", "build", "dist", "*.egg-info",
                                                                 "artifacts", "__pycache__", "*.work"))
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist), str(source)],
                   check=True, cwd=tmp_path)
    wheel = next(dist.glob("prune_export-*.whl"))
    env = tmp_path / "env"
    subprocess.run([sys.executable, "-m", "venv", str(env)], check=True)
    python = env / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    # the dependencies come from this environment (no download), the project only from the wheel
    Path(site, "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], check=True)
    probe = ("import prune_export, exporter, search, torch; "
             "print(prune_export.__file__); print(exporter.__file__); print(torch.__version__); "
             "print(sorted(prune_export.__all__))")
    out = subprocess.run([str(python), "-c", probe], check=True, capture_output=True, text=True, cwd=tmp_path).stdout.split("\n")
    assert out[0].startswith(site) and out[1].startswith(site), out  # imported from the installed wheel
    assert out[2] == __import__("torch").__version__  # the environment's torch, left in place
    assert "prune" in out[3] and "load_pruned" in out[3]
    cli = env / "bin" / "prune-export"
    assert cli.is_file()
    help_out = subprocess.run([str(cli), "--help"], check=True, capture_output=True, text=True, cwd=tmp_path).stdout
    assert "--num-classes" in help_out
