"""TEST-ONLY: real DeepSpeed (ZeRO-1/2/3, offload) and real FSDP1 on CPU processes over gloo.

Lightning's DeepSpeedStrategy refuses a non-CUDA accelerator, and DeepSpeed wants an integer
device rank; everything past those two checks is DeepSpeed's own code on its CPU accelerator
(`DS_ACCELERATOR=cpu`). torch's FSDP1 runs on CPU when given `device_id=cpu`, which Lightning
never passes (it passes `root_device.index`, None on CPU). The overlays the tests use are the
shipped ones with only the class_path swapped (see `cpu_overlay`), so CI exercises the shipped
settings. Never used by the package.
"""

from __future__ import annotations

import functools
import os
import shutil
import sys
import time
from pathlib import Path

import pytest

import torch
import yaml
from lightning.fabric.utilities.seed import reset_seed
from lightning.pytorch.strategies.ddp import DDPStrategy

from gpt2dist.strategies import AtomicDeepSpeedStrategy, FSDP1Strategy

REPO = Path(__file__).resolve().parents[1]


class CPUDeepSpeedStrategy(AtomicDeepSpeedStrategy):
    runs_on_cpu = True  # read by gpt2dist.faults.check_strategy_accelerator

    def setup_environment(self) -> None:
        DDPStrategy.setup_environment(self)  # Lightning's CUDA-only check skipped; the rest as DeepSpeedStrategy

    def setup_distributed(self) -> None:
        reset_seed()
        self.set_world_ranks()
        self._init_deepspeed_distributed()  # without the CUDA device-index validation

    @property
    def root_device(self) -> torch.device:
        return torch.device("cpu", 0)  # DeepSpeed's engine needs an int device_rank; CPU has one device


class CPUFSDP1Strategy(FSDP1Strategy):
    runs_on_cpu = True  # read by gpt2dist.faults.check_strategy_accelerator

    def _setup_model(self, model):
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        real = FSDP.__init__

        def on_cpu(fsdp, *args, device_id=None, **kwargs):
            real(fsdp, *args, device_id=torch.device("cpu") if device_id is None else device_id, **kwargs)

        FSDP.__init__ = on_cpu  # for this wrapping only (the root and each GPT2Block)
        try:
            return super()._setup_model(model)
        finally:
            FSDP.__init__ = real


CPU_CLASSES = {"gpt2dist.strategies.AtomicDeepSpeedStrategy": "cpu_strategies.CPUDeepSpeedStrategy",
               "gpt2dist.strategies.FSDP1Strategy": "cpu_strategies.CPUFSDP1Strategy"}


def cpu_overlay(name: str, folder: Path) -> Path:
    """configs/strategy/<name>.yaml with the CPU class: the same settings as shipped. An overlay
    that already runs on CPU (ddp, fsdp) is returned as it is."""
    shipped = REPO / "configs" / "strategy" / f"{name}.yaml"
    cfg = yaml.safe_load(shipped.read_text())
    if cfg["trainer"]["strategy"]["class_path"] not in CPU_CLASSES:
        return shipped
    cfg["trainer"]["strategy"]["class_path"] = CPU_CLASSES[cfg["trainer"]["strategy"]["class_path"]]
    if "DeepSpeed" in cfg["trainer"]["strategy"]["class_path"] and not shutil.which(os.environ.get("CXX", "c++")):
        # DeepSpeed's CPU accelerator JIT-builds its shared-memory comm op (.ci/run installs g++).
        why = "no C++ compiler: DeepSpeed on CPU builds its comm op (apt-get install g++)"
        pytest.fail(why) if os.environ.get("CI") == "true" else pytest.skip(why)
    if "DeepSpeed" in cfg["trainer"]["strategy"]["class_path"]:
        build_deepspeed_comm_op()
    path = folder / f"{name}-cpu.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@functools.cache
def build_deepspeed_comm_op() -> None:
    """Build DeepSpeed's CPU shared-memory comm op once per test session, in a process of its own with
    a generous timeout, before any DeepSpeed run needs it. torch's cpp_extension builds under a lock
    file and every other process waits for that file forever: a run killed mid-build (the 300 s limit
    of a test's run, on a busy 2-core machine) left it behind and hung every later DeepSpeed run. A
    lock older than any build is such a dead build's, and is removed. Later loads only re-check."""
    from conftest import run_group

    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR", Path.home() / ".cache" / "torch_extensions"))
    for lock in root.glob("**/deepspeed_shm_comm/lock"):
        if time.time() - lock.stat().st_mtime > 900:
            print(f"removing {lock}: a dead build's (15+ minutes old; a build takes under 2)")
            lock.unlink(missing_ok=True)
    p = run_group([sys.executable, "-c", "from deepspeed.comm.torch import build_shm_op; build_shm_op()"], 1800,
                  env={**os.environ, "DS_ACCELERATOR": "cpu"})
    assert p.returncode == 0, f"building DeepSpeed's CPU comm op failed:\n{p.stderr[-3000:]}"
