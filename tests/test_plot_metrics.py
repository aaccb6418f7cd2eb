"""tools/plot_metrics.py on real runs: a CSVLogger folder and a W&B offline run."""

from __future__ import annotations

import subprocess
import sys

from PIL import Image

from conftest import REPO
from run_fixtures import csv_run, wandb_run  # noqa: F401 (fixtures)


def _plot(run_dir, out):
    proc = subprocess.run([sys.executable, str(REPO / "tools/plot_metrics.py"), str(run_dir), "--out", str(out)],
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    with Image.open(out) as im:
        im.verify()  # a valid PNG, not just bytes
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size == (800, 800)
        # Three panels with lines: many distinct colours, not a blank canvas.
        assert len(im.convert("RGB").getcolors(maxcolors=1 << 20)) > 50
    assert out.stat().st_size > 20_000


def test_plot_from_csv_run(csv_run, tmp_path):
    _plot(csv_run.root, tmp_path / "csv.png")


def test_plot_from_wandb_offline_run(wandb_run, tmp_path):
    _plot(wandb_run.root / "wandb", tmp_path / "wb.png")


def test_plot_names_a_folder_without_runs(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "tools/plot_metrics.py"), str(tmp_path)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "no metrics.csv or W&B *.wandb run under" in proc.stderr
