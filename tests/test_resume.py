"""gpt2dist/resume.py: which checkpoint a (re)started job loads. Real checkpoint files on disk."""

from __future__ import annotations

import pytest
import torch

from gpt2dist.errors import CheckpointError
from gpt2dist.resume import (checkpoint_progress, newest_checkpoint, prune_requeue_checkpoints, resolve_ckpt_path,
                             set_aside_other_runs)


def save(path, step: int, batches: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    loops = {"fit_loop": {"epoch_loop.batch_progress": {"total": {"completed": batches}}}}
    torch.save({"global_step": step, "loops": loops, "state_dict": {"w": torch.zeros(3)}}, path)


@pytest.fixture
def root(tmp_path):
    return tmp_path / "run"


def test_set_aside_what_last_would_choose_over_this_fit(root, tmp_path):
    ck = root / "checkpoints"
    for step in (3, 4, 5):
        save(ck / f"step{step:07d}.ckpt", step, 2 * step)
    save(ck / "last.ckpt", 5, 10)
    save(ck / "best-step0000004.ckpt", 4, 8)
    save(root / "hpc_ckpt_1.ckpt", 3, 7)  # same step as the start, more batches: `last` would prefer it
    (ck / "torn.ckpt").write_bytes(b"cut short")  # unreadable: never chosen, stays
    # Nothing ahead of the newest checkpoint (a plain resume): nothing moves.
    assert set_aside_other_runs(str(ck / "last.ckpt"), root, ck) is None
    # Rollback to step 3: everything `last` would rank above it moves, together.
    dest, moved = set_aside_other_runs(str(ck / "step0000003.ckpt"), root, ck)
    assert dest.parent == ck and dest.name.startswith("set-aside-")
    assert sorted(p.name for p in dest.iterdir()) == sorted(p.name for p in moved) == [
        "best-step0000004.ckpt", "hpc_ckpt_1.ckpt", "last.ckpt", "step0000004.ckpt", "step0000005.ckpt"]
    assert sorted(p.name for p in ck.glob("*.ckpt")) == ["step0000003.ckpt", "torn.ckpt"]
    assert resolve_ckpt_path("last", root, ck, slurm=False) == str(ck / "step0000003.ckpt")
    # A fresh start (or one from another folder's checkpoint): every readable checkpoint moves.
    other = tmp_path / "other.ckpt"
    save(other, 9, 18)
    dest2, moved = set_aside_other_runs(str(other), root, ck)
    assert [p.name for p in moved] == ["step0000003.ckpt"] and not (root / "hpc_ckpt_1.ckpt").exists()
    save(ck / "step0000001.ckpt", 1, 2)
    dest3, moved = set_aside_other_runs(None, root, ck)
    assert [p.name for p in moved] == ["step0000001.ckpt"]
    assert [p.name for p in ck.glob("*.ckpt")] == ["torn.ckpt"]
    # Each set-aside has its own folder, also within one second: the first one's files are all still there.
    assert len({dest, dest2, dest3}) == 3 and len(list(dest.iterdir())) == 5
    assert [p.name for p in dest2.iterdir()] == ["step0000003.ckpt"]


def test_newest_by_stored_progress_not_name_or_mtime(root):
    ck = root / "checkpoints"
    save(ck / "last.ckpt", 30, 60)
    save(root / "hpc_ckpt_2.ckpt", 20, 40)  # highest hpc number, written last, but less progress
    assert resolve_ckpt_path("auto", root, ck, slurm=True) == str(ck / "last.ckpt")
    assert resolve_ckpt_path("last", root, ck, slurm=False) == str(ck / "last.ckpt")
    # Lightning alone would load hpc_ckpt_2 for ckpt_path=None under SLURM: we pick the newest too.
    assert resolve_ckpt_path(None, root, ck, slurm=True) == str(ck / "last.ckpt")
    save(root / "hpc_ckpt_3.ckpt", 35, 70)
    assert resolve_ckpt_path("auto", root, ck, slurm=True) == str(root / "hpc_ckpt_3.ckpt")


def test_mid_accumulation_and_ties_are_deterministic(root):
    ck = root / "checkpoints"
    save(ck / "last.ckpt", 10, 20)
    save(root / "hpc_ckpt_1.ckpt", 10, 21)  # same optimizer step, one more micro-batch seen
    assert newest_checkpoint(root, ck)[0].name == "hpc_ckpt_1.ckpt"
    save(root / "hpc_ckpt_1.ckpt", 10, 19)  # same step, saved before the batch counter moved: still wins
    assert newest_checkpoint(root, ck) == (root / "hpc_ckpt_1.ckpt", (10, 19))
    save(ck / "step0000011.ckpt", 11, 22)  # a later step beats any requeue checkpoint
    assert newest_checkpoint(root, ck)[0].name == "step0000011.ckpt"


def test_truncated_checkpoint_is_skipped(root):
    ck = root / "checkpoints"
    save(ck / "step0000010.ckpt", 10, 20)
    save(root / "hpc_ckpt_1.ckpt", 15, 30)
    data = (root / "hpc_ckpt_1.ckpt").read_bytes()
    (root / "hpc_ckpt_1.ckpt").write_bytes(data[: len(data) // 2])  # killed while writing
    assert checkpoint_progress(root / "hpc_ckpt_1.ckpt") is None
    assert resolve_ckpt_path("auto", root, ck, slurm=True) == str(ck / "step0000010.ckpt")
    (ck / "step0000010.ckpt").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="step0000010.ckpt: not a complete checkpoint"):
        resolve_ckpt_path(str(ck / "step0000010.ckpt"), root, ck, slurm=True)
    with pytest.raises(CheckpointError, match="no readable checkpoint among"):
        resolve_ckpt_path("auto", root, ck, slurm=True)


class _RunsCode:
    """A pickle that runs code when fully unpickled: looking at a checkpoint must never do that."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_choosing_a_checkpoint_never_unpickles_code(root, tmp_path):
    ck = root / "checkpoints"
    save(ck / "step0000004.ckpt", 4, 8)
    marker = tmp_path / "ran"
    # Newer by its step, but only a full unpickle reads it: Lightning (weights_only=True) could not resume it.
    torch.save({"global_step": 9, "loops": {}, "x": _RunsCode(marker)}, ck / "last.ckpt")
    assert checkpoint_progress(ck / "last.ckpt") is None
    assert resolve_ckpt_path("auto", root, ck, slurm=False) == str(ck / "step0000004.ckpt")
    with pytest.raises(CheckpointError, match="last.ckpt"):
        resolve_ckpt_path(str(ck / "last.ckpt"), root, ck, slurm=False)
    assert not marker.exists()


def test_requeued_job_continues_past_its_explicit_start_checkpoint(tmp_path, root, monkeypatch):
    """`submit.sh ... --ckpt_path FILE` is run again on every requeue: it must not restart from FILE."""
    ck = root / "checkpoints"
    start = tmp_path / "pretrained" / "last.ckpt"
    save(start, 2, 4)
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    assert resolve_ckpt_path(str(start), root, ck, slurm=True) == str(start)  # first run of the job: as asked
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    assert resolve_ckpt_path(str(start), root, ck, slurm=True) == str(start)  # requeued, nothing newer yet
    save(root / "hpc_ckpt_1.ckpt", 21, 42)  # preempted at step 21
    assert resolve_ckpt_path(str(start), root, ck, slurm=True) == str(root / "hpc_ckpt_1.ckpt")
    save(ck / "last.ckpt", 30, 60)  # a later periodic save (e.g. a node failure requeued the job)
    assert resolve_ckpt_path(str(start), root, ck, slurm=True) == str(ck / "last.ckpt")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "0")  # a new submission with the same command line: as asked
    assert resolve_ckpt_path(str(start), root, ck, slurm=True) == str(start)
    assert resolve_ckpt_path(str(start), root, ck, slurm=False, restarts=1) == str(start)  # not under SLURM
    save(start, 40, 80)  # the given file has more progress than the run folder: it stays
    assert resolve_ckpt_path(str(start), root, ck, slurm=True, restarts=1) == str(start)


def test_a_requeued_job_with_no_ckpt_path_continues_the_run(root):
    """A requeue that left no hpc_ckpt_* (SIGTERM preemption, a node failure, `scontrol requeue`) runs the
    same command line again: with no ckpt_path it started over, setting the run's checkpoints aside."""
    ck = root / "checkpoints"
    save(ck / "last.ckpt", 30, 60)
    assert resolve_ckpt_path(None, root, ck, slurm=True, restarts=0) is None  # a new job: fresh, as asked
    assert resolve_ckpt_path(None, root, ck, slurm=True, restarts=1) == str(ck / "last.ckpt")
    assert resolve_ckpt_path(None, root, ck, slurm=False, restarts=1) is None  # not under SLURM


def test_a_fresh_start_asked_for_in_a_requeued_run_folder_loads_no_hpc_checkpoint(root, monkeypatch):
    """`GPT2DIST_DEFAULT_CKPT_PATH= sbatch fit.sbatch` (README: a fresh start) in a folder that was ever
    requeued (pruning keeps the newest hpc_ckpt_*) resumed it: resolved as auto, and Lightning itself makes
    a None ckpt_path under SLURM "hpc". A requeue of that job still goes on from the run's newest."""
    import lightning.pytorch as pl
    from lightning.fabric.plugins.environments import SLURMEnvironment
    from lightning.pytorch.trainer.states import TrainerFn

    from gpt2dist.resume import no_hpc_autoload

    ck = root / "checkpoints"
    save(root / "hpc_ckpt_3.ckpt", 100, 200)
    save(ck / "last.ckpt", 120, 240)
    assert resolve_ckpt_path(None, root, ck, slurm=True, restarts=0) == str(ck / "last.ckpt")  # unset: auto
    assert resolve_ckpt_path(None, root, ck, slurm=True, restarts=0, fresh=True) is None
    assert resolve_ckpt_path(None, root, ck, slurm=True, restarts=1, fresh=True) == str(ck / "last.ckpt")
    trainer = pl.Trainer(default_root_dir=root, accelerator="cpu", logger=False)
    monkeypatch.setattr(SLURMEnvironment, "detect", staticmethod(lambda: True))
    parse = lambda: trainer._checkpoint_connector._parse_ckpt_path(TrainerFn.FITTING, None, True, True)  # noqa: E731
    assert parse() == str(root / "hpc_ckpt_3.ckpt")  # what Lightning did with the fresh start's None
    no_hpc_autoload(trainer)
    assert parse() is None


def test_fresh_start_and_passthrough(root):
    ck = root / "checkpoints"
    assert resolve_ckpt_path("auto", root, ck, slurm=True) is None  # first run of a job
    assert resolve_ckpt_path(None, root, ck, slurm=True) is None
    with pytest.raises(CheckpointError, match="--ckpt_path last: no checkpoint"):
        resolve_ckpt_path("last", root, ck, slurm=False)
    save(root / "hpc_ckpt_1.ckpt", 5, 10)
    assert resolve_ckpt_path(None, root, ck, slurm=False) is None  # not under SLURM: fresh, as asked
    assert resolve_ckpt_path(str(root / "hpc_ckpt_1.ckpt"), root, ck, slurm=True) == str(root / "hpc_ckpt_1.ckpt")
    # An explicit path must exist and load (gpt2dist/faults.py, the bad-input catalogue runs the CLI).
    with pytest.raises(CheckpointError, match="/some/file.ckpt: no such file or folder"):
        resolve_ckpt_path("/some/file.ckpt", root, ck, slurm=True)
    assert resolve_ckpt_path("hpc", root, ck, slurm=True) == "hpc"


def test_a_new_requeue_checkpoint_replaces_the_older_ones(root):
    """One full checkpoint per preemption used to stay forever (a week on 24 h slots: 7 copies)."""
    ck = root / "checkpoints"
    save(ck / "last.ckpt", 25, 50)
    save(root / "hpc_ckpt_1.ckpt", 10, 20)
    save_deepspeed_folder(root / "hpc_ckpt_2.ckpt", 20, 40)  # a sharded folder
    (root / "hpc_ckpt_3.ckpt").write_bytes(b"cut short")  # killed while writing: useless
    save(root / "hpc_ckpt_4.ckpt", 30, 60)
    gone = prune_requeue_checkpoints(root, root / "hpc_ckpt_4.ckpt")
    assert sorted(p.name for p in gone) == ["hpc_ckpt_1.ckpt", "hpc_ckpt_2.ckpt", "hpc_ckpt_3.ckpt"]
    assert sorted(p.name for p in root.iterdir()) == ["checkpoints", "hpc_ckpt_4.ckpt"]
    assert (ck / "last.ckpt").is_file()  # ModelCheckpoint's files are not touched
    assert resolve_ckpt_path("auto", root, ck, slurm=True) == str(root / "hpc_ckpt_4.ckpt")
    save(root / "hpc_ckpt_5.ckpt", 40, 80)  # more progress than the one just saved: not superseded
    (root / "hpc_ckpt_6.ckpt").write_bytes(b"cut short")
    assert prune_requeue_checkpoints(root, root / "hpc_ckpt_6.ckpt") == []  # a new one that does not load: keep all
    assert prune_requeue_checkpoints(root, root / "hpc_ckpt_4.ckpt") == [root / "hpc_ckpt_6.ckpt"]
    assert (root / "hpc_ckpt_5.ckpt").is_file()


def save_deepspeed_folder(path, step: int, batches: int, tag: str = "checkpoint", zero3: bool = False) -> None:
    """The layout Lightning's DeepSpeedStrategy writes: `latest` names the tag folder, whose
    *model_states.pt holds Lightning's client state (global_step, loops, ...)."""
    name = "zero_pp_rank_0_mp_rank_00_model_states.pt" if zero3 else "mp_rank_00_model_states.pt"
    save(path / tag / name, step, batches)
    (path / "latest").write_text(tag)


def test_deepspeed_folders_are_candidates_by_their_stored_step(root):
    ck = root / "checkpoints"
    save(ck / "step0000010.ckpt", 10, 20)
    save_deepspeed_folder(ck / "last.ckpt", 12, 24, zero3=True)
    assert checkpoint_progress(ck / "last.ckpt") == (12, 24)
    assert resolve_ckpt_path("last", root, ck, slurm=False) == str(ck / "last.ckpt")
    save_deepspeed_folder(root / "hpc_ckpt_1.ckpt", 14, 28)
    assert newest_checkpoint(root, ck)[0].name == "hpc_ckpt_1.ckpt"
    # Without its states file (a half-written folder) it is skipped, not loaded.
    (root / "hpc_ckpt_1.ckpt" / "checkpoint" / "mp_rank_00_model_states.pt").unlink()
    assert checkpoint_progress(root / "hpc_ckpt_1.ckpt") is None
    assert newest_checkpoint(root, ck)[0].name == "last.ckpt"


def test_a_deepspeed_folder_is_read_weights_only_allowing_deepspeeds_own_classes(root, tmp_path):
    """DeepSpeed's state files were read with a full unpickle to rank them, so an older folder nobody
    resumed could run code just by lying in the run folder. Now weights-only, allowing DeepSpeed's own
    classes (its loss scaler, the ZeRO stage enum); anything else makes the folder unreadable, unread."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    ck = root / "checkpoints"
    save(ck / "step0000010.ckpt", 10, 20)
    states = ck / "last.ckpt" / "checkpoint" / "mp_rank_00_model_states.pt"
    states.parent.mkdir(parents=True)
    (ck / "last.ckpt" / "latest").write_text("checkpoint")
    loops = {"fit_loop": {"epoch_loop.batch_progress": {"total": {"completed": 24}}}}
    torch.save({"global_step": 12, "loops": loops, "param_shapes": [{"w": torch.Size([3])}], "ds_version": "0.19.8",
                "stage": ZeroStageEnum.gradients, "scaler": DynamicLossScaler(2.0**16, 2, 1000, 1, False, False)}, states)
    assert checkpoint_progress(ck / "last.ckpt") == (12, 24)
    marker = tmp_path / "ran"
    torch.save({"global_step": 14, "loops": loops, "x": _RunsCode(marker)}, states)
    assert checkpoint_progress(ck / "last.ckpt") is None and not marker.exists()
    assert resolve_ckpt_path("auto", root, ck, slurm=False) == str(ck / "step0000010.ckpt") and not marker.exists()
    with pytest.raises(CheckpointError, match=r"last.ckpt: mp_rank_00_model_states.pt needs (builtins|io)\.open to load, "
                                              "which neither gpt2dist nor DeepSpeed saves and which could run code"):
        resolve_ckpt_path(str(ck / "last.ckpt"), root, ck, slurm=False)
    # Every file of the tag is checked (DeepSpeed's resume reads them all in full), not only the one read.
    torch.save({"global_step": 14, "loops": loops}, states)
    assert checkpoint_progress(ck / "last.ckpt") == (14, 24)
    torch.save({"x": _RunsCode(marker)}, states.parent / "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt")
    assert checkpoint_progress(ck / "last.ckpt") is None and not marker.exists()
    assert not marker.exists()


def test_best_is_the_lowest_stored_score_and_eval_needs_a_checkpoint(root):
    from gpt2dist.resume import resolve_eval_ckpt_path

    ck = root / "checkpoints"
    best = {"dirpath": ck, "filename": "best-step{step:07d}", "monitor": "val/loss", "mode": "min"}
    with pytest.raises(CheckpointError, match="--ckpt_path last: no checkpoint"):
        resolve_eval_ckpt_path("validate", "last", root, ck, best)
    with pytest.raises(CheckpointError, match="--ckpt_path best: no best-"):
        resolve_eval_ckpt_path("validate", "best", root, ck, best)
    # A resume can leave an older best file the restored callback no longer tracks: scores decide, not names.
    for step, score in ((50, 2.5), (75, 2.1), (100, 2.3)):
        cbs = {"ModelCheckpoint{'monitor': 'val/loss'}": {"monitor": "val/loss", "best_model_score": torch.tensor(score)},
               "ModelCheckpoint{'monitor': 'step'}": {"monitor": "step", "best_model_score": torch.tensor(float(step))}}
        torch.save({"global_step": step, "callbacks": cbs}, ck.mkdir(parents=True, exist_ok=True) or ck / f"best-step{step:07d}.ckpt")
    assert resolve_eval_ckpt_path("test", "best", root, ck, best) == str(ck / "best-step0000075.ckpt")
    assert resolve_eval_ckpt_path("test", "best", root, ck, {**best, "mode": "max"}) == str(ck / "best-step0000050.ckpt")
    assert resolve_eval_ckpt_path("test", "last", root, ck, best) == str(ck / "best-step0000100.ckpt")
    assert resolve_eval_ckpt_path("test", None, root, ck, best) is None


def test_checkpoint_the_strategy_cannot_load_is_one_line(tmp_path):
    """Resuming under another strategy family (or, for DeepSpeed, another ZeRO layout or world size) stops
    before launch with one line naming the checkpoint and the fix, instead of each rank's traceback."""
    from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, SingleDeviceStrategy

    from gpt2dist.resume import check_checkpoint_fits_strategy
    from gpt2dist.strategies import FSDP2Strategy

    single = tmp_path / "single.ckpt"
    save(single, 5, 5)
    sharded = tmp_path / "fsdp.ckpt"  # FSDP2's torch.distributed.checkpoint folder
    sharded.mkdir()
    (sharded / ".metadata").write_bytes(b"x")
    (sharded / "__0_0.distcp").write_bytes(b"x")
    save(sharded / "meta.pt", 5, 5)
    ds = tmp_path / "ds.ckpt"  # DeepSpeed ZeRO-2 folder written by 2 processes
    (ds / "checkpoint").mkdir(parents=True)
    (ds / "latest").write_text("checkpoint")
    torch.save({"global_step": 5, "dp_world_size": 2, "ds_config": {"zero_optimization": {"stage": 2}}},
               ds / "checkpoint" / "mp_rank_00_model_states.pt")
    one, ddp, fsdp = SingleDeviceStrategy("cpu"), DDPStrategy(), FSDP2Strategy()
    zero2, zero3 = DeepSpeedStrategy(stage=2), DeepSpeedStrategy(stage=3)
    cases = [(sharded, one, 1, "sharded (torch.distributed.checkpoint) folder, which SingleDeviceStrategy cannot load"),
             (sharded, ddp, 2, "configs/strategy/fsdp.yaml"),
             (ds, ddp, 2, "DeepSpeed checkpoint folder, which DDPStrategy cannot load"),
             (ds, zero3, 2, "written by DeepSpeed ZeRO-2, and DeepSpeed cannot resume it under ZeRO-3"),
             (ds, zero2, 1, "written by 2 DeepSpeed processes and this run has 1"),
             (single, zero2, 2, "single-file checkpoint, and DeepSpeed resumes only its own checkpoint folders")]
    for path, strategy, world, needle in cases:
        with pytest.raises(CheckpointError) as err:
            check_checkpoint_fits_strategy(str(path), strategy, world)
        msg = str(err.value)
        assert needle in msg and f"tools/export_hf.py {path} OUT" in msg and "\n" not in msg, (path, msg)
    with pytest.raises(CheckpointError) as err:  # evaluation reads a DeepSpeed folder anywhere but under FSDP
        check_checkpoint_fits_strategy(str(ds), fsdp, 2, "validate")
    assert "evaluate it under one process, DDP or a configs/strategy/deepspeed_* overlay" in str(err.value)
    # What loads: each its own kind, FSDP2 any file or folder, a DeepSpeed folder evaluated under any ZeRO
    # stage and world size, one process or DDP (its consolidated weights).
    for path, strategy, world, sub in [(single, one, 1, "fit"), (single, ddp, 2, "fit"), (single, fsdp, 2, "fit"),
                                       (sharded, fsdp, 1, "fit"), (ds, zero2, 2, "fit"), (ds, zero2, 1, "validate"),
                                       (ds, zero3, 1, "test"), (ds, one, 1, "validate"), (ds, ddp, 2, "predict")]:
        check_checkpoint_fits_strategy(str(path), strategy, world, sub)


def _share_check(rank: int, world: int, init_file: str, folders: list, ckpts: list, out) -> None:
    import torch.distributed as dist

    from gpt2dist.resume import check_ranks_share_the_run

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        check_ranks_share_the_run([folders[rank]], ckpts[rank], wait_s=1.0)
        out.put((rank, "ok"))
    except Exception as e:  # every rank must raise the same line (none may be left in a collective)
        out.put((rank, f"{type(e).__name__}: {e}"))
    finally:
        dist.destroy_process_group()


def _run_two_ranks(tmp_path, folders, ckpts) -> list:
    from conftest import spawn_ranks

    init = tmp_path / f"init-{len(list(tmp_path.glob('init-*')))}"  # a new rendezvous file per group
    results = spawn_ranks(_share_check, 2, str(init), [str(f) for f in folders], ckpts, timeout=120)
    return [msg for _, msg in sorted(results)]


def test_ranks_must_see_one_run_folder_and_resume_the_same_step(tmp_path, root):
    import socket

    host = socket.gethostname()
    save(root / "checkpoints" / "last.ckpt", 40, 80)
    last = str(root / "checkpoints" / "last.ckpt")
    # One shared folder, the same checkpoint: passes, and the token file is gone afterwards.
    assert _run_two_ranks(tmp_path, [root, root], [last, last]) == ["ok", "ok"]
    assert sorted(p.name for p in root.iterdir()) == ["checkpoints"]
    # Node-local disks: rank 1's folder of the same name is another one (here: another path).
    local = tmp_path / "node2-local" / "run"
    local.mkdir(parents=True)
    msgs = _run_two_ranks(tmp_path, [root, local], [last, None])
    assert msgs[0] == msgs[1] and msgs[0] == (
        f"ConfigError: {root} is not one folder for all ranks: rank 1 ({host}) cannot see the file rank 0 ({host}) "
        "wrote there; checkpoints and requeue need storage every node shares: put trainer.default_root_dir (and the "
        "checkpoint dirpath) on a shared filesystem, not /tmp or a local disk")
    assert not any(p.name.startswith(".gpt2dist-shared") for p in [*root.iterdir(), *local.iterdir()])
    # A shared folder, but rank 1 resolved no checkpoint (e.g. it looked before rank 0's job wrote one).
    msgs = _run_two_ranks(tmp_path, [root, root], [last, None])
    assert msgs[0] == msgs[1] and msgs[0] == (
        f"CheckpointError: ranks disagree on the checkpoint: rank 0 ({host}) resumes {last} (step 40), rank 1 ({host}) "
        "starts fresh; each rank resolves --ckpt_path in the run folder it sees: check that every node sees the same "
        "trainer.default_root_dir, and that no other job writes there")
    # The Python API (no CLI resolution): only the folder is checked.
    assert _run_two_ranks(tmp_path, [root, root], ["unknown", None]) == ["ok", "ok"]
    # Rank 0 cannot write there (here: a file where a folder should be): every rank says so, none hangs.
    (tmp_path / "a-file").write_text("")
    bad = tmp_path / "a-file" / "run"
    msgs = _run_two_ranks(tmp_path, [bad, bad], ["unknown", "unknown"])
    assert msgs[0] == msgs[1] and msgs[0] == (
        f"ConfigError: rank 0 ({host}) cannot write in {bad} (Not a directory): the run folder must be writable; "
        "fix its permissions or pick another trainer.default_root_dir")


def test_lightning_hpc_checkpoint_is_the_largest_number_not_the_newest_name(root):
    from gpt2dist.resume import lightning_hpc_checkpoint

    assert lightning_hpc_checkpoint(root) is None
    for n in (2, 10, 9):
        save(root / f"hpc_ckpt_{n}.ckpt", n, n)
    (root / "hpc_ckpt_x.ckpt").write_text("")  # not Lightning's name
    assert lightning_hpc_checkpoint(root) == root / "hpc_ckpt_10.ckpt"  # 10 > 9, though "9" sorts after "10"


def test_one_fit_per_run_folder_and_no_stale_lock_after_a_kill(tmp_path, monkeypatch):
    """A second process locking a run folder another holds gets one line naming the holder (pid, host,
    SLURM job); a holder killed with SIGKILL leaves no lock behind; a second call in the holding process
    keeps the lock (a POSIX lock drops when any descriptor of the file closes), and release frees it
    and removes the file (a failed fit leaves its folder as it was)."""
    import os
    import signal
    import socket
    import subprocess
    import sys

    from gpt2dist.errors import ConfigError
    from gpt2dist.resume import hold_run_folder, release_run_folders

    folder = tmp_path / "run"
    script = ("import sys, time\nfrom gpt2dist.resume import hold_run_folder\n"
              "try:\n    hold_run_folder(sys.argv[1])\nexcept Exception as e:\n    print(e, flush=True); sys.exit(2)\n"
              "print('held', flush=True)\ntime.sleep(float(sys.argv[2]))\n")

    def other(wait_s: float) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-c", script, str(folder), str(wait_s)], stdout=subprocess.PIPE, text=True,
                                env={**os.environ, "SLURM_JOB_ID": "777", "SLURM_RESTART_COUNT": "0"})

    holder = other(120)
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(ConfigError) as refused:
            hold_run_folder(folder)
        assert str(refused.value).startswith(f"run folder {folder.resolve()} is in use by another fit "
                                             f"(pid {holder.pid} on {socket.gethostname()}, SLURM job 777, since ")
        assert f"set trainer.default_root_dir to another folder (if it is no longer running, its node crashed: " \
               f"remove {folder.resolve() / '.gpt2dist-lock'})" in str(refused.value)
        # The same SLURM job, requeued: the holder is its own earlier run, which SLURM ended (a lock a
        # crashed node left on NFS): taken over on a fresh file. Not on the job's first start.
        monkeypatch.setenv("SLURM_JOB_ID", "777")
        with pytest.raises(ConfigError, match="is in use by another fit"):
            hold_run_folder(folder)
        monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
        hold_run_folder(folder)
        p = other(0)
        assert p.communicate(timeout=60)[0].startswith(f"run folder {folder.resolve()} is in use by another fit "
                                                       f"(pid {os.getpid()} on {socket.gethostname()}, SLURM job 777, ")
        release_run_folders()
        assert not (folder / ".gpt2dist-lock").exists()  # the holder removes it as it ends
        monkeypatch.delenv("SLURM_RESTART_COUNT")
        monkeypatch.delenv("SLURM_JOB_ID")
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    hold_run_folder(folder)  # the killed holder's lock went with it
    try:
        hold_run_folder(folder)  # again in this process: a no-op that must not drop the lock
        p = other(0)
        assert p.communicate(timeout=60)[0].startswith(f"run folder {folder.resolve()} is in use by another fit (pid {os.getpid()}")
        assert p.returncode == 2
    finally:
        release_run_folders()
    assert not (folder / ".gpt2dist-lock").exists()
    p = other(0)
    assert p.communicate(timeout=60)[0] == "held\n" and p.returncode == 0


def test_a_fit_that_opened_the_lock_file_as_its_holder_removed_it_locks_the_name_again(tmp_path, monkeypatch):
    """The holder removes the lock file as it ends. A fit that opened the file just before (a new start
    racing the end of the old fit) then locks the removed file: without a check of the name it would hold
    a lock nobody sees, and a third fit would start beside it. It takes the name again."""
    import fcntl
    import os
    import subprocess
    import sys

    from gpt2dist.resume import hold_run_folder, release_run_folders

    folder = tmp_path / "run"
    script = ("import sys\nfrom gpt2dist.resume import hold_run_folder, release_run_folders\n"
              "try:\n    hold_run_folder(sys.argv[1])\nexcept Exception as e:\n    print(e, flush=True); sys.exit(2)\n"
              "print('held', flush=True)\nsys.stdin.readline()\nrelease_run_folders()\nprint('released', flush=True)\n")

    def other() -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-c", script, str(folder)], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True)

    old = other()
    assert old.stdout.readline() == "held\n"
    real_lockf, raced = fcntl.lockf, []

    def lockf_after_the_holder_ended(fd, flags):
        if not raced:  # this fit has opened the old file: now its holder ends and removes it
            raced.append(1)
            old.stdin.write("\n")
            old.stdin.flush()
            assert old.stdout.readline() == "released\n"
        return real_lockf(fd, flags)

    monkeypatch.setattr(fcntl, "lockf", lockf_after_the_holder_ended)
    try:
        hold_run_folder(folder)
        monkeypatch.undo()
        third = other()
        out = third.communicate("\n", timeout=60)[0]
        assert out.startswith(f"run folder {folder.resolve()} is in use by another fit (pid {os.getpid()}") and raced, out
    finally:
        release_run_folders()
        old.wait(timeout=60)
