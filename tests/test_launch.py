"""gpt2dist/launch.py: the submission check that slurm/submit.sh runs before sbatch."""

from __future__ import annotations

import pytest
import yaml

from conftest import REPO
from gpt2dist.errors import ConfigError
from gpt2dist.launch import check_submission


def cfg(tmp_path, **sections):
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(sections))
    return str(p)


def test_global_batch_arithmetic():
    line = check_submission(2, 8, ["--config", str(REPO / "configs/gpt2-large.yaml"), "--trainer.num_nodes=2"])
    # 4 seqs x 4 accum x 16 GPUs = 256 seqs x 1024 tokens
    assert line.endswith("= 256 seqs x 1024 tokens = 262,144 tokens/step"), line


@pytest.mark.parametrize("nodes, tasks, trainer, extra, needle", [
    (2, 8, {"num_nodes": 1}, [], "sets trainer.num_nodes=1 but the job asks for --nodes 2"),
    (1, 4, {"devices": 8}, [], "sets trainer.devices=8 but the job runs 4 task(s) per node"),
    (1, 4, {"devices": [0, 1]}, [], "sets trainer.devices=[0, 1]"),
    (1, 4, {}, ["--trainer.devices", "2"], "sets trainer.devices=2"),
    (2, 4, {"strategy": {"class_path": "x", "init_args": {"data_parallel_size": 4, "tensor_parallel_size": 1}}}, [],
     "= 4, but the job has 2 node(s) x 4 = 8 processes"),
])
def test_world_size_mismatch_is_refused(tmp_path, nodes, tasks, trainer, extra, needle):
    with pytest.raises(ConfigError, match=None) as e:
        check_submission(nodes, tasks, ["--config", cfg(tmp_path, trainer=trainer), *extra])
    assert needle in str(e.value)


def test_matching_world_size_and_missing_config(tmp_path):
    assert "8 processes" in check_submission(1, 8, ["--config", str(REPO / "configs/gpt2-large.yaml")])
    with pytest.raises(ConfigError, match="config file 'nope.yaml' does not exist"):
        check_submission(1, 1, ["--config", "nope.yaml"])
    with pytest.raises(ConfigError, match="no --config given"):
        check_submission(1, 1, ["--trainer.max_steps=3"])


def test_torchrun_launch_without_slurm(tmp_path, corpus_dir, tokenizer_dir):
    """The documented torchrun command for clusters without SLURM: 2 processes, one process group."""
    import os
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    from test_slurm import write_config

    config = write_config(tmp_path, corpus_dir, tokenizer_dir, max_steps=4)
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
    r = subprocess.run([torchrun, "--nnodes", "1", "--nproc-per-node", "2", "--rdzv-backend", "c10d",
                        "--rdzv-endpoint", "127.0.0.1:0", "-m", "gpt2dist", "fit", "--config", str(config),
                        "--trainer.num_nodes", "1", "--trainer.devices", "2", "--ckpt_path", "auto"],
                       env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    assert "GLOBAL_RANK: 0, MEMBER: 1/2" in out and "GLOBAL_RANK: 1, MEMBER: 2/2" in out
    assert "cluster environment: TorchElasticEnvironment (world size 2)" in out
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()
