"""The stages' import layers (pyproject.toml's import-linter contract) and what each may load.

python -m pytest tests/test_layers.py
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINT = Path(sys.executable).with_name("lint-imports")


def lint(root: Path) -> subprocess.CompletedProcess:
    """lint-imports on the `replicate` package under `root`, with the project's contract."""
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run(
        [str(LINT), "--config", str(root / "pyproject.toml"), "--no-cache"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
    )


def test_the_layer_contract_is_kept_and_breaks_on_an_upward_import(tmp_path):
    shutil.copytree(
        ROOT / "replicate", tmp_path / "replicate", ignore=shutil.ignore_patterns("__pycache__")
    )
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    kept = lint(tmp_path)
    assert kept.returncode == 0, kept.stdout + kept.stderr
    assert "1 kept, 0 broken" in kept.stdout
    # The cycle this contract replaced ran through function-local imports: one is enough to break it.
    with open(tmp_path / "replicate" / "photos.py", "a") as f:
        f.write("\n\ndef _upward():\n    from .training.train import run  # noqa: F401\n")
    broken = lint(tmp_path)
    assert broken.returncode != 0
    assert "replicate.photos -> replicate.training.train" in broken.stdout


def test_the_onnx_engine_and_the_report_load_no_pytorch():
    code = (
        "import sys, replicate.tagging.predict, replicate.report.compare_report, replicate.photos\n"
        "import replicate.runtime, replicate.engine.model_set, replicate.serving.server\n"
        "print(sorted(m for m in ('torch', 'fastai', 'torchvision', 'timm') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_the_report_orders_the_study_archs_as_the_registry_does():
    """report reads the study's order from paper_results.csv (it may not import models): the same order."""
    from replicate.models import archs
    from replicate.report import compare_report

    study = list(archs.ARCHS)
    assert len(study) == 5 and sorted(reversed(study), key=compare_report._arch_order) == study
    assert compare_report._arch_order("convnext_tiny") == 5
