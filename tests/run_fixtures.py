"""Real tiny `gpt2dist fit` runs shared by test_tracking.py and test_plot_metrics.py (session scope):
a W&B offline run, its resume from `last.ckpt`, and a CSV run in a process where wandb cannot import."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, TINY, run_cli

SECRET = "sk-SENTINEL-0123456789abcdef"  # set as WANDB_API_KEY and HF_TOKEN: must never reach a file


def fit_args(root: Path, corpus_dir: Path, tokenizer_dir: Path, max_steps: int = 6) -> list[str]:
    overrides = json.dumps({**TINY, "vocab_size": 512})
    return ["fit", f"--trainer.default_root_dir={root}", "--trainer.accelerator=cpu", "--trainer.devices=1",
            f"--trainer.max_steps={max_steps}", "--trainer.val_check_interval=6",
            "--trainer.check_val_every_n_epoch=null", "--trainer.limit_val_batches=2",
            "--trainer.log_every_n_steps=1", "--trainer.accumulate_grad_batches=2",
            "--trainer.enable_progress_bar=false", "--seed_everything=1",
            "--model.from_scratch=true", f"--model.config_overrides={overrides}", "--model.dropout=0.0",
            "--model.warmup_steps=2", "--model.lr=1e-3",
            f"--data.train_files=[{corpus_dir}/*.txt]", f"--data.tokenizer={tokenizer_dir}", "--data.val_fraction=0.2",
            "--data.block_size=32", "--data.batch_size=4", "--data.num_workers=0", f"--data.cache_dir={root.parent / 'cache'}",
            "--export.enabled=false", "--samples.sample_every_n_steps=3", '--samples.prompts=["def ", "import"]',
            "--samples.max_new_tokens=8"]


def inspect(run_dir: Path, summary: bool = True):
    """W&B's own reader of an offline run (see ../shared/notes/findings.md)."""
    exe = Path(sys.executable).with_name("wandb")
    cmd = [str(exe), "leet", "inspect", *(["--summary"] if summary else []), "--json", str(run_dir)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True).stdout
    return json.loads(out) if summary else [json.loads(line) for line in out.splitlines()]


def offline_runs(root: Path) -> list[Path]:
    return sorted((root / "wandb").glob("offline-run-*"))


@pytest.fixture(scope="session")
def wandb_run(tmp_path_factory, corpus_dir, tokenizer_dir):
    root = tmp_path_factory.mktemp("wb") / "run"
    env = {"WANDB_API_KEY": SECRET, "HF_TOKEN": SECRET, "WANDB_MODE": "offline"}
    first = run_cli(*fit_args(root, corpus_dir, tokenizer_dir), "--config", str(REPO / "configs/logging/wandb.yaml"),
                    env=env, timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    runs = offline_runs(root)
    assert len(runs) == 1, runs
    return SimpleRun(root, first, runs[0])


@pytest.fixture(scope="session")
def wandb_resumed(wandb_run, corpus_dir, tokenizer_dir):
    root = wandb_run.root
    env = {"WANDB_API_KEY": SECRET, "HF_TOKEN": SECRET, "WANDB_MODE": "offline"}
    second = run_cli(*fit_args(root, corpus_dir, tokenizer_dir, max_steps=9), "--config",
                     str(REPO / "configs/logging/wandb.yaml"), "--ckpt_path=last", env=env, timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]
    new = [r for r in offline_runs(root) if r != wandb_run.run_dir]
    assert len(new) == 1, offline_runs(root)
    return SimpleRun(root, second, new[0])


@pytest.fixture(scope="session")
def csv_run(tmp_path_factory, corpus_dir, tokenizer_dir):
    root = tmp_path_factory.mktemp("csv") / "run"
    blocker = tmp_path_factory.mktemp("nowandb")
    (blocker / "wandb.py").write_text("raise ImportError('wandb is not installed (blocked by the test)')\n")
    # A token pasted into a config value (here a prompt): redacted in config.yaml as in what is logged.
    proc = run_cli(*fit_args(root, corpus_dir, tokenizer_dir), "--trainer.logger=lightning.pytorch.loggers.CSVLogger",
                   f"--trainer.logger.save_dir={root}", "--trainer.logger.name=logs", f'--data.predict_prompts=["{SECRET}"]',
                   env={"PYTHONPATH": f"{blocker}:{REPO}", "HF_TOKEN": SECRET}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return SimpleRun(root, proc, None)


class SimpleRun:
    def __init__(self, root: Path, proc, run_dir: Path | None):
        self.root, self.proc, self.run_dir = root, proc, run_dir
