"""gpt2dist/faults.py end to end: SIGKILL + `--ckpt_path last` gives bitwise the uninterrupted weights
(single process, DDP x2, FSDP2 x2; kill mid-accumulation, during a checkpoint write, between the renames
of a sharded folder), FSDP2 x2 -> 1 process resume, NaN skip/stop, disk full, OOM message, atomic IO."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import REPO, TINY, run_group

# One rerun, on a "resume not bitwise" failure only (see assert_bitwise); pytest -ra lists it as RERUN.
pytestmark = pytest.mark.flaky(reruns=1, only_rerun=["resume not bitwise"])
TESTS = Path(__file__).resolve().parent
STEPS = 6
GLOBAL_BATCH = 4  # sequences per optimizer step = batch_size x processes x accumulate


def write_config(tmp: Path, corpus_dir: Path, tokenizer_dir: Path, name: str, devices: int = 1, num_workers: int = 0,
                 dropout: float = 0.1, keep: bool = False, **model) -> Path:
    """The run's config, and an empty run folder (a rerun starts clean; the earlier one is moved to NAME.failed-attempt)
    unless `keep`: another test's finished run."""
    root = tmp / name
    if root.exists() and not keep:  # a rerun: the failed attempt's run is kept beside it, for a post-mortem
        shutil.rmtree(tmp / f"{name}.failed-attempt", ignore_errors=True)
        root.rename(tmp / f"{name}.failed-attempt")
    accumulate = 2
    cfg = {
        "seed_everything": 3,
        "trainer": {"accelerator": "cpu", "devices": devices, "precision": "32-true", "max_steps": STEPS,
                    "accumulate_grad_batches": accumulate, "val_check_interval": 6, "check_val_every_n_epoch": None,
                    "limit_val_batches": 2, "num_sanity_val_steps": 0, "log_every_n_steps": 1,
                    "enable_progress_bar": False, "enable_model_summary": False, "deterministic": True,
                    "default_root_dir": str(root), "logger": False},
        "model": {"from_scratch": True, "config_overrides": TINY, "dropout": dropout, "lr": 1e-3, "warmup_steps": 2, **model},
        "data": {"train_files": [str(corpus_dir / "*.txt")], "tokenizer": str(tokenizer_dir), "block_size": 32,
                 "batch_size": GLOBAL_BATCH // (devices * accumulate), "num_workers": num_workers,
                 "val_fraction": 0.1, "cache_dir": str(tmp / "cache")},
        # A checkpoint every optimizer step, the last 2 kept (plus last.ckpt and the best by val/loss).
        "checkpoint": {"every_n_train_steps": 1, "save_top_k": 2},
        "export": {"sample_prompt": None},
    }
    root.mkdir(parents=True, exist_ok=True)
    path = tmp / f"{name}.yaml"  # not in root: the run saves its merged config (with any overlay) there
    path.write_text(yaml.safe_dump(cfg))
    return path


def run_dir(config: Path) -> Path:
    return config.with_suffix("")


def overlay(root: Path, *callbacks: dict, **sections) -> Path:
    path = root.parent / f"{root.name}-overlay{len(list(root.parent.glob(root.name + '-overlay*.yaml')))}.yaml"
    cfg = {"trainer": {"callbacks": list(callbacks)}, **sections} if callbacks else sections
    path.write_text(yaml.safe_dump(cfg))
    return path


def cli(config: Path, *args: str, timeout: int = 300, sub: str = "fit", env: dict | None = None) -> subprocess.CompletedProcess:
    """The real CLI in its own session (so a plugin's SIGKILL takes the whole process group)."""
    env = {**os.environ, "PYTHONPATH": f"{TESTS}:{REPO}", "PYTHONUNBUFFERED": "1", **(env or {})}
    return run_group([sys.executable, "-m", "gpt2dist", sub, "--config", str(config), *args], timeout, cwd=REPO, env=env)


def ok(p: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    return p


def weights(root: Path) -> dict[str, torch.Tensor]:
    return load_file(root / "hf_model" / "model.safetensors")


def assert_bitwise(a: dict, b: dict, where: str = "") -> None:
    """Resumed weights equal the uninterrupted run's: bitwise in almost every run. Not in all: now and then one
    of ~15 ends 5e-6 to 4e-4 off (CI about one suite in ten; each of three local runs on 2026-12-03, three times
    8.56e-5 in one tensor). A kept failed run showed its first leg, a fresh run to the fault, had already
    parted from the reference: a rare per-process path in torch's CPU training itself (bare torch parts
    too, tools/determinism.py; see README).
    So each test here gets one rerun on this failure only (pytestmark): a real resume fault (another dropout
    stream, batch or optimizer state) fails every time, e.g. without the RNG state
    (test_a_resume_without_the_rng_state_is_caught, 2e-3)."""
    assert a.keys() == b.keys()
    diff = {k: (a[k].double() - b[k].double()).abs().max().item() for k in a if not torch.equal(a[k], b[k])}
    if diff:
        worst = max(diff.values())
        warnings.warn(f"resume not bitwise: {len(diff)} of {len(a)} tensors differ, max |diff| {worst:.3g} "
                      f"({max(diff, key=diff.get)})")
        assert worst < 1e-6, (f"resume not bitwise: {len(diff)} tensors differ, max |diff| {worst:.3g}: "
                              f"{sorted(diff, key=diff.get)[-3:]}{where}")


def first_parting(resumed: Path, ref: Path) -> str:
    """Where a run leg's trace (fault_plugins.RecordBatches; a resumed leg, or the leg up to the fault) first
    parts from the uninterrupted run's: the micro-batch, and which of its loss, weights (after it), torch RNG
    state (after it) and threads differ."""
    ours = [line.split() for line in resumed.read_text().splitlines()]
    theirs = [line.split() for line in ref.read_text().splitlines()]
    if not ours:
        return "; the leg traced no micro-batch"
    start = next((i for i, t in enumerate(theirs) if t[:3] == ours[0][:3]), None)
    if start is None:
        return f"; the leg's first micro-batch {ours[0][:3]} is not in the reference's trace"
    for a, b in zip(ours, theirs[start:]):
        if a != b:
            parts = [name for name, x, y in zip(("step", "epoch", "batch", "loss", "weights", "rng", "threads"), a, b) if x != y]
            return f"; first parted at step {b[0]} epoch {b[1]} batch {b[2]} (of {len(ours)} traced), in: {parts}"
    return f"; every one of the {len(ours)} traced micro-batches equal (loss, weights, RNG after each)"


def recorder(config: Path, leg: str = "") -> dict:
    """fault_plugins.RecordBatches for a run's leg: batches{leg}.txt and trace{leg}.txt (for first_parting)."""
    root = run_dir(config)
    return {"class_path": "fault_plugins.RecordBatches",
            "init_args": {"path": str(root / f"batches{leg}.txt"), "trace": str(root / f"trace{leg}.txt")}}


def traced(config: Path) -> list[str]:
    """CLI args adding `recorder(config)` to a run."""
    return ["--config", str(overlay(run_dir(config), recorder(config)))]


def kill(config: Path, kill: dict, *strategy: str) -> subprocess.CompletedProcess:
    root = run_dir(config)
    killed = cli(config, *strategy, "--config", str(overlay(root, {"class_path": "fault_plugins.KillAt", "init_args": kill})))
    assert killed.returncode == -signal.SIGKILL, (killed.returncode, killed.stderr[-3000:])
    assert not (root / "hf_model").exists()
    return killed


def resume(config: Path, *strategy: str) -> subprocess.CompletedProcess:
    p = ok(cli(config, *strategy, "--ckpt_path", "last"))
    assert "the training data is not the checkpoint's" not in p.stderr, p.stderr[-3000:]  # same data: no false alarm
    assert "optimizer settings are the config's" not in p.stderr, p.stderr[-3000:]  # same settings: none either
    return p


@pytest.fixture(scope="module")
def tmp(tmp_path_factory):
    return tmp_path_factory.mktemp("faults")


@pytest.fixture(scope="module")
def reference(tmp, corpus_dir, tokenizer_dir):
    """Uninterrupted single-process run (dropout 0.1: the RNG stream matters), traced."""
    config = write_config(tmp, corpus_dir, tokenizer_dir, "reference")
    ok(cli(config, *traced(config)))
    return weights(tmp / "reference")


def slurm_env(job_id: str) -> dict:
    """What SLURM sets for a 1-task job (Lightning's SLURMEnvironment detects it), without a cluster."""
    return {"SLURM_NTASKS": "1", "SLURM_JOB_NAME": "gpt2dist", "SLURM_JOB_ID": job_id, "SLURM_PROCID": "0",
            "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_NODELIST": "localhost"}


def _copy_of_reference(tmp: Path, corpus_dir, tokenizer_dir, name: str) -> Path:
    """A config whose run folder holds the finished reference run's checkpoints (no export)."""
    import shutil

    config = write_config(tmp, corpus_dir, tokenizer_dir, name)
    shutil.copytree(tmp / "reference", run_dir(config), dirs_exist_ok=True)
    shutil.rmtree(run_dir(config) / "hf_model")
    return config


@pytest.mark.parametrize("start", ["rollback", "fresh"])
def test_killed_rollback_or_fresh_start_resumes_itself_not_the_earlier_checkpoints(tmp, corpus_dir, tokenizer_dir,
                                                                                   reference, start):
    """A fit from an older checkpoint of the run (rollback to step 5), or a fresh fit, in a folder
    holding the finished run's checkpoints (up to step 6), is killed before it saves anything past
    them: `--ckpt_path last` must continue it, not load the earlier run's step 6 (it did: `last`
    goes by stored step). The files it would have chosen were moved aside, not deleted."""
    config = _copy_of_reference(tmp, corpus_dir, tokenizer_dir, start)
    ck = run_dir(config) / "checkpoints"
    before = sorted(p.name for p in ck.glob("*.ckpt"))
    args = ["--ckpt_path", str(ck / "step0000005.ckpt")] if start == "rollback" else []
    killed = kill(config, {"step": 6 if start == "rollback" else 3, "when": "mid_accumulation"}, *args)
    resumed = resume(config)
    assert f"global_step {5 if start == 'rollback' else 2}" in resumed.stderr
    assert "--ckpt_path last|auto would have chosen over this run's" in killed.stderr
    assert (f"fit starts from {ck / 'step0000005.ckpt'}: moved" if start == "rollback" else "fit starts fresh: moved") in killed.stderr
    (aside,) = ck.glob("set-aside-*")
    expected = {"step0000006.ckpt", "last.ckpt"} if start == "rollback" else set(before)
    assert {p.name for p in aside.iterdir()} == {p for p in before if p in expected or p.startswith("best-step0000006")}
    assert_bitwise(weights(run_dir(config)), reference)
    assert not list(ck.glob("*-v1.ckpt"))  # the moved names were free again: no last-v1.ckpt


def test_a_job_requeued_before_train_start_starts_as_first_asked(tmp, corpus_dir, tokenizer_dir, reference):
    """A fresh start (GPT2DIST_DEFAULT_CKPT_PATH set empty) in a folder holding a finished run, requeued
    before train start (preempted while preparing data): the requeue resolved like auto and resumed the
    other run's step 6, which was not set aside yet. The job's start is recorded until it is."""
    config = _copy_of_reference(tmp, corpus_dir, tokenizer_dir, "requeued_early")
    root = run_dir(config)
    ck = root / "checkpoints"
    before = sorted(p.name for p in ck.glob("*.ckpt"))
    slurm = {**slurm_env("4242"), "GPT2DIST_DEFAULT_CKPT_PATH": ""}
    killed = cli(config, "--config", str(overlay(root, {"class_path": "fault_plugins.KillAt",
                                                        "init_args": {"step": 0, "when": "before_train"}})),
                 env={**slurm, "SLURM_RESTART_COUNT": "0"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert (root / ".gpt2dist-start.json").is_file() and sorted(p.name for p in ck.glob("*.ckpt")) == before
    requeued = ok(cli(config, env={**slurm, "SLURM_RESTART_COUNT": "1"}))
    assert "SLURM requeue 1 of a job that stopped before train start: it starts as first asked (fresh)" in requeued.stderr
    assert "fit starts fresh: moved" in requeued.stderr
    assert_bitwise(weights(root), reference)  # this run from its own start, as the reference ran
    assert not (root / ".gpt2dist-start.json").exists()


def test_a_resume_without_the_rng_state_is_caught(tmp, corpus_dir, tokenizer_dir, reference):
    """The bound in assert_bitwise is far below what a real resume fault does: resumed without its
    dropout stream (RNG state not restored), the weights move by more than 1e-4."""
    config = write_config(tmp, corpus_dir, tokenizer_dir, "no_rng")
    kill(config, {"step": 4, "when": "mid_accumulation"})
    ok(cli(config, "--ckpt_path", "last", "--faults.save_rng_state", "false"))
    got = weights(run_dir(config))
    assert max((got[k].double() - reference[k].double()).abs().max().item() for k in got) > 1e-4
    with pytest.raises(AssertionError, match="tensors differ"):
        assert_bitwise(got, reference)


@pytest.mark.parametrize("name, kill_at, num_workers, resumed_at", [
    # Killed inside step 4's accumulation window: resumed from step 3.
    ("mid_accum", {"step": 4, "when": "mid_accumulation"}, 0, 3),
    # Killed with step 3 written under its temporary name: the name never existed, resumed from step 2.
    ("during_save", {"step": 3, "when": "during_save", "name": "step0000003.ckpt"}, 1, 2),
    # Killed writing last.ckpt at step 3, before that step's validation (val_check_interval 6 batches):
    # resumed from step0000003.ckpt, saved before the validation the resumed run skips.
    ("before_val", {"step": 3, "when": "during_save", "name": "last.ckpt"}, 0, 3),
])
def test_single_process_kill_resume_is_bitwise_exact(tmp, corpus_dir, tokenizer_dir, reference, name, kill_at, num_workers,
                                                     resumed_at):
    config = write_config(tmp, corpus_dir, tokenizer_dir, name, num_workers=num_workers)
    kill(config, kill_at)
    ck = run_dir(config) / "checkpoints"
    if name == "during_save":
        assert list(ck.glob(".step0000003.ckpt.tmp-*")) and not (ck / "step0000003.ckpt").exists()
    if name == "before_val":
        assert not list(ck.glob("best-*"))  # the validation of step 3 never ran
    saves = run_dir(config) / "saves.txt"
    resumed = ok(cli(config, "--ckpt_path", "last", "--config",
                     str(overlay(run_dir(config), {"class_path": "fault_plugins.RecordSaves", "init_args": {"path": str(saves)}}))))
    assert f"global_step {resumed_at}" in resumed.stderr
    assert_bitwise(weights(run_dir(config)), reference)
    # Keep the last 2 by step; Lightning never deletes the checkpoint a run resumed from (kept as well).
    resumed_from = Path(resumed.stderr.split("resume: ", 1)[1].split(" (global_step")[0]).name
    assert {p.name for p in ck.glob("step*.ckpt")} - {resumed_from} == {"step0000005.ckpt", "step0000006.ckpt"}
    # Every save of the resumed run at an optimizer-step boundary: Lightning's ModelCheckpoint forgets it
    # saved the resumed step and would save it again after the next micro-batch, mid-accumulation.
    recorded = [tuple(map(int, line.split())) for line in saves.read_text().splitlines()]
    assert recorded and all(accumulating == 0 for _, accumulating, _ in recorded), recorded
    # The resumed step is not saved again, but for the validation redone there (before_val): its
    # best-by-val/loss is saved, as the uninterrupted run saved it.
    assert all(validating for step, _, validating in recorded if step <= resumed_at), recorded
    if name == "before_val":  # the redone validation reached best-by-val/loss: its file, then replaced, as in the reference
        assert sorted(p.name for p in ck.glob("best-*")) == sorted(p.name for p in (tmp / "reference" / "checkpoints").glob("best-*"))
    assert not list(ck.glob(".*tmp*"))  # the resumed run's own writes left no temporary behind


def recorded_batches(path: Path) -> list[tuple[int, int, int, str]]:
    return [(int(s), int(e), int(i), d) for s, e, i, d in (line.split() for line in path.read_text().splitlines())]


@pytest.mark.parametrize("devices, num_workers, steps_into_epoch1, reload, max_epochs", [
    (1, 0, 2, 0, None), (1, 1, 2, 0, None), (2, 0, 2, 0, None), (1, 0, 1, 0, None), (1, 1, 2, 1, None),
    # max_epochs with max_steps: the lr schedule's length once came from Lightning's estimated_stepping_batches,
    # which built the train loader before the resume restored its position (the epoch replayed from block 0).
    (1, 0, 2, 0, 3)])
def test_resume_mid_second_epoch_sees_that_epochs_data(tmp, corpus_dir, tokenizer_dir, devices, num_workers,
                                                       steps_into_epoch1, reload, max_epochs):
    """Killed in epoch 1 (a few blocks per epoch), resumed with --ckpt_path last: the resumed run sees
    epoch 1's shuffle from where it stopped, not epoch 0's order (rank 0's batches under DDP), and
    ends bitwise equal. steps_into_epoch1=1: resumed from the checkpoint saved after the validation at
    epoch 0's end (val_check_interval 4 divides it), which starts epoch 1 at its first batch. reload=1:
    with trainer.reload_dataloaders_every_n_epochs=1 (a new loader each epoch, as Lightning builds it)."""
    name = f"epoch1_d{devices}_w{num_workers}_s{steps_into_epoch1}_r{reload}_e{max_epochs}"
    ddp = ["--config", str(REPO / "configs/strategy/ddp.yaml")] if devices > 1 else []
    small = [*ddp, "--data.train_files", f"[{corpus_dir / 'keyword.txt'}, {corpus_dir / 'bisect.txt'}]",
             "--data.val_files", f"[{corpus_dir / 'colorsys.txt'}]", "--data.block_size", "64",
             "--trainer.max_steps", "12", "--trainer.val_check_interval", "4",
             *(["--trainer.reload_dataloaders_every_n_epochs", str(reload)] if reload else []),
             *(["--trainer.max_epochs", str(max_epochs)] if max_epochs else [])]

    def recording(config: Path) -> tuple[Path, list[str]]:
        return run_dir(config) / "batches.txt", traced(config)

    ref = write_config(tmp, corpus_dir, tokenizer_dir, f"{name}_ref", devices=devices, num_workers=num_workers)
    ref_log, record = recording(ref)
    ok(cli(ref, *small, *record))
    seen = recorded_batches(ref_log)
    # Kill mid-accumulation in the 2nd optimizer step of epoch 1: resumed from a checkpoint inside epoch 1.
    first_step_of_epoch1 = next(step for step, epoch, _, _ in seen if epoch == 1)
    assert 2 <= first_step_of_epoch1 <= 8, seen  # a handful of steps per epoch
    kill_step = first_step_of_epoch1 + steps_into_epoch1
    config = write_config(tmp, corpus_dir, tokenizer_dir, f"{name}_kill", devices=devices, num_workers=num_workers)
    kill(config, {"step": kill_step, "when": "mid_accumulation"}, *small)
    log, record = recording(config)
    resumed = ok(cli(config, *small, *record, "--ckpt_path", "last"))
    assert f"global_step {kill_step - 1}" in resumed.stderr
    after = recorded_batches(log)
    assert after[0][1] == 1 and (after[0][2] > 0) == (steps_into_epoch1 > 1), after[:2]  # in epoch 1, where it stopped
    assert after == [b for b in seen if b[0] >= kill_step - 1]
    assert_bitwise(weights(run_dir(config)), weights(run_dir(ref)),
                   first_parting(run_dir(config) / "trace.txt", run_dir(ref) / "trace.txt"))


@pytest.mark.parametrize("how, devices, num_workers", [
    ("sigterm", 1, 0), ("sigterm", 1, 1), ("sigterm", 2, 0),
    ("limited", 1, 0),  # trainer.limit_train_batches: the epoch ends before the data does
    ("extend", 1, 0),  # a run whose max_steps ended epoch 0, continued with a larger max_steps
    ("extend_mid", 1, 0),  # ... ended one step before epoch 0's end: Lightning counted epoch 0 done
    ("epochs", 1, 0),  # max_epochs 2, no max_steps: Lightning restores no loader position at an epoch's end
    ("reload", 1, 1),  # a SIGTERM save, with trainer.reload_dataloaders_every_n_epochs=1 (a new loader per epoch)
    ("workers", 1, 0),  # a SIGTERM save of a run with data.num_workers 1, resumed with 0 (epoch 1 was skipped)
    ("kill", 1, 0),  # killed mid-accumulation in epoch 1's first step: the step file of epoch 0's end
])
def test_resume_at_an_epochs_last_step_trains_the_next_epoch(tmp, corpus_dir, tokenizer_dir, how, devices, num_workers):
    """A checkpoint at the last step of epoch 0, with no validation there (a SIGTERM or SLURM requeue save,
    or the end of fit). Lightning resumed with the finished loader position: epoch 1 got no batches and
    training went on with epoch 2's order (epoch 1 never trained); with limit_train_batches, epoch 1 got
    the rest of epoch 0; extended, epoch 1 ended after one batch; under max_epochs 2 the resumed run
    trained nothing; extended from a fit that max_steps ended inside epoch 0, the rest of epoch 0 was
    trained as epoch 1, then epoch 2's order (epoch 1's never). Now batch for batch and bitwise the
    uninterrupted run."""
    name = f"epoch_end_{how}_d{devices}_w{num_workers}"
    ddp = ["--config", str(REPO / "configs/strategy/ddp.yaml")] if devices > 1 else []
    small = [*ddp, "--data.train_files", f"[{corpus_dir / 'keyword.txt'}, {corpus_dir / 'bisect.txt'}]",
             "--data.val_files", f"[{corpus_dir / 'colorsys.txt'}]", "--data.block_size", "64",
             "--trainer.val_check_interval", "6", *(["--trainer.limit_train_batches", "10"] if how == "limited" else []),
             *(["--trainer.reload_dataloaders_every_n_epochs", "1"] if how == "reload" else []),
             "--model.decay_steps", "12"]  # the LR schedule of 12 steps, also in a first leg of max_steps `end`
    length = ["--trainer.max_steps", "-1", "--trainer.max_epochs", "2"] if how == "epochs" else ["--trainer.max_steps", "12"]
    ref = write_config(tmp, corpus_dir, tokenizer_dir, f"{name}_ref", devices=devices, num_workers=num_workers)
    ok(cli(ref, *small, *length, *traced(ref)))
    seen = recorded_batches(run_dir(ref) / "batches.txt")
    end = next(step for step, epoch, _, _ in seen if epoch == 1)  # the step that ends epoch 0
    assert 3 <= end <= 8 and (2 * end) % 6, seen  # a few steps per epoch; no validation at its end
    config = write_config(tmp, corpus_dir, tokenizer_dir, f"{name}_cut", devices=devices, num_workers=num_workers)
    log = run_dir(config) / "batches.txt"
    first_workers = ["--data.num_workers", "1"] if how == "workers" else []
    stop = end  # the step the first leg ends at; extend_mid: inside epoch 0, with no validation there
    if how == "extend_mid":  # (a validation at fit's last step leaves another state, which Lightning resumes well)
        stop = next(s for s in (end - 1, end - 2) if (2 * s) % 6)
    if how.startswith("extend"):
        # extend_mid: no checkpoint every step, so last.ckpt is fit's end-of-epoch save, as in a default run
        every = ["--checkpoint.every_n_train_steps", "null"] if how == "extend_mid" else []
        ok(cli(config, *small, "--trainer.max_steps", str(stop), *every, *traced(config)))
    elif how == "kill":
        # The step callback saves every step; at epoch 0's last batch Lightning deferred its save to a validation
        # that never ran there, and saved one micro-batch into epoch 1 instead, mid-accumulation.
        killed = cli(config, *small, *length, "--config", str(overlay(
            run_dir(config), {"class_path": "fault_plugins.KillAt", "init_args": {"step": end + 1}}, recorder(config))))
        assert killed.returncode == -signal.SIGKILL, (killed.returncode, killed.stderr[-3000:])
    else:
        term = {"class_path": "fault_plugins.TermAt", "init_args": {"step": end}}
        p = cli(config, *small, *first_workers, *length, "--config", str(overlay(run_dir(config), term, recorder(config))))
        assert p.returncode == 143 and f"last.ckpt (step {end})" in p.stderr, (p.returncode, p.stderr[-3000:])
    first_leg = len(recorded_batches(log))
    resumed = ok(cli(config, *small, *length, *traced(config), "--ckpt_path", "last"))
    assert f"global_step {stop}" in resumed.stderr
    after = recorded_batches(log)[first_leg:]
    assert (after[0][1] == 0 and after[0][2] > 0) if how == "extend_mid" else after[0][1:3] == (1, 0), after[:3]
    assert after == [b for b in seen if b[0] >= stop], (after[:3], [b for b in seen if b[0] >= stop][:3])
    assert_bitwise(weights(run_dir(config)), weights(run_dir(ref)),
                   first_parting(run_dir(config) / "trace.txt", run_dir(ref) / "trace.txt"))


def test_a_resume_with_a_larger_micro_batch_trains_the_rest_of_the_epoch(tmp, corpus_dir, tokenizer_dir):
    """Resumed one step into epoch 0 with data.batch_size 2 -> 4 (accumulate 2 -> 1: the same 4 blocks per
    step): Lightning counted the epoch's micro-batches done in the old size (2) and ended the epoch at the new
    count, so the resumed epoch stopped one batch (4 blocks) short, silently; doubled half-way, it lost the
    whole second half. It now takes the batches from the loader's position: batch for batch what a run at
    batch_size 4 trains from its step 1, into epoch 1."""
    small = ["--data.train_files", f"[{corpus_dir / 'keyword.txt'}, {corpus_dir / 'bisect.txt'}]", "--data.val_files",
             f"[{corpus_dir / 'colorsys.txt'}]", "--data.block_size", "64", "--trainer.val_check_interval", "100",
             "--trainer.max_steps", "10"]
    larger = ["--data.batch_size", "4", "--trainer.accumulate_grad_batches", "1"]
    ref = write_config(tmp, corpus_dir, tokenizer_dir, "larger_batch_ref")
    ok(cli(ref, *small, *larger, *traced(ref)))
    seen = recorded_batches(run_dir(ref) / "batches.txt")
    per_epoch = sum(1 for b in seen if b[1] == 0)
    assert 3 <= per_epoch < 10 and seen[per_epoch][1:3] == (1, 0), seen  # epoch 0 ends within the run
    config = write_config(tmp, corpus_dir, tokenizer_dir, "larger_batch")
    ok(cli(config, *small, "--trainer.max_steps", "1"))  # 2 micro-batches of 2 blocks
    p = ok(cli(config, *small, *larger, *traced(config), "--ckpt_path", "last"))
    after = recorded_batches(run_dir(config) / "batches.txt")
    assert after == seen[1:], (after[:per_epoch + 1], seen[:per_epoch + 1])
    assert ("resume: the global batch was 2 x 1 processes x 2 accumulated = 4 sequences per optimizer step, now 4 x 1 "
            "processes x 1 accumulated = 4") in " ".join(p.stderr.split()), p.stderr[-3000:]


def test_ddp_kill_resume_is_bitwise_exact(tmp, corpus_dir, tokenizer_dir):
    ddp = ["--config", str(REPO / "configs/strategy/ddp.yaml")]  # as shipped (accumulation must work)
    ref = write_config(tmp, corpus_dir, tokenizer_dir, "ddp_ref", devices=2)
    ok(cli(ref, *ddp))
    config = write_config(tmp, corpus_dir, tokenizer_dir, "ddp_kill", devices=2)
    kill(config, {"step": 4, "when": "during_save", "name": "last.ckpt"}, *ddp)
    resumed = resume(config, *ddp)
    assert "step0000004.ckpt (global_step 4" in resumed.stderr  # last.ckpt still held step 3
    assert_bitwise(weights(run_dir(config)), weights(tmp / "ddp_ref"))


def test_fsdp2_kill_resume_is_bitwise_exact_and_world_size_change(tmp, corpus_dir, tokenizer_dir):
    fsdp = ["--config", str(REPO / "configs/strategy/fsdp.yaml")]
    ref = write_config(tmp, corpus_dir, tokenizer_dir, "fsdp_ref", devices=2, dropout=0.0)
    ok(cli(ref, *fsdp))
    ck = run_dir(ref) / "checkpoints"
    assert (ck / "last.ckpt").is_dir() and (ck / "last.ckpt" / ".metadata").is_file()
    config = write_config(tmp, corpus_dir, tokenizer_dir, "fsdp_kill", devices=2, dropout=0.0)
    # Killed after the old last.ckpt folder was moved away at step 4: no last.ckpt on disk at all.
    kill(config, {"step": 4, "when": "between_renames", "name": "last.ckpt"}, *fsdp)
    assert not (run_dir(config) / "checkpoints" / "last.ckpt").exists()
    resumed = resume(config, *fsdp)
    assert "step0000004.ckpt (global_step 4" in resumed.stderr  # the newest complete sharded folder
    assert_bitwise(weights(run_dir(config)), weights(tmp / "fsdp_ref"))

    # World size 2 -> 1: the step-4 sharded checkpoint of the reference, resumed by one process with the
    # same global batch (4 x 1 x 1); data position mapped by global samples consumed.
    one = write_config(tmp, corpus_dir, tokenizer_dir, "fsdp_to_1", devices=1, dropout=0.0)
    r = ok(cli(one, *fsdp, "--ckpt_path", str(ck / "step0000005.ckpt")))
    assert "RNG states for 2 ranks" in r.stderr
    a, b = weights(run_dir(one)), weights(tmp / "fsdp_ref")
    # Same samples per step, summed in another order: equal to float rounding, not bitwise.
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5


@pytest.mark.parametrize("strategy, marker", [("deepspeed_zero3", "latest"), ("fsdp1", ".metadata")])
def test_gpu_only_strategy_kill_resume_twice_is_bitwise_exact(tmp, corpus_dir, tokenizer_dir, strategy, marker):
    """Real DeepSpeed ZeRO-3 / FSDP1 on CPU (tests/cpu_strategies.py), sharded folders: killed while
    renaming the new last.ckpt folder in at step 3, resumed, killed again mid-accumulation in step 5,
    resumed to the end."""
    from cpu_strategies import cpu_overlay

    ds = ["--config", str(cpu_overlay(strategy, tmp))]
    ref = write_config(tmp, corpus_dir, tokenizer_dir, f"{strategy}_ref", devices=2)
    ok(cli(ref, *ds))
    last = run_dir(ref) / "checkpoints" / "last.ckpt"
    assert last.is_dir() and (last / marker).is_file()  # a DeepSpeed / distcp folder
    config = write_config(tmp, corpus_dir, tokenizer_dir, f"{strategy}_kill", devices=2)
    ck = run_dir(config) / "checkpoints"
    kill(config, {"step": 3, "when": "during_save", "name": "last.ckpt"}, *ds)
    # Step 3's folder complete under its temporary name; step 2's moved aside; no half-written last.ckpt.
    assert (ck / ".last.ckpt.tmp" / marker).is_file() and not (ck / "last.ckpt").exists()
    resumed = cli(config, *ds, "--ckpt_path", "last", "--config",
                  str(overlay(run_dir(config), {"class_path": "fault_plugins.KillAt", "init_args": {"step": 5}})))
    assert resumed.returncode == -signal.SIGKILL, resumed.stderr[-3000:]
    assert "step0000003.ckpt (global_step 3" in resumed.stderr
    final = resume(config, *ds)
    assert "(global_step 4" in final.stderr  # killed inside step 5's accumulation window
    assert_bitwise(weights(run_dir(config)), weights(run_dir(ref)))
    assert not list(ck.glob(".*tmp*")) and not list(ck.glob(".*old*"))


def test_first_parting_names_the_first_micro_batch_and_field_that_differ(tmp_path):
    """The diagnosis a not-bitwise resume failure prints: it aligns the resumed trace on the reference's
    and names the first micro-batch where they part, and which fields part there."""
    ref = tmp_path / "ref.txt"
    rows = [f"{step} {step // 4} {step % 4} l{step} w{step} r{step} 2" for step in range(8)]
    ref.write_text("\n".join(rows) + "\n")
    resumed = tmp_path / "resumed.txt"
    resumed.write_text("\n".join(rows[5:]) + "\n")
    assert first_parting(resumed, ref) == "; every one of the 3 traced micro-batches equal (loss, weights, RNG after each)"
    resumed.write_text("\n".join([rows[5], "6 1 2 l6 wX rX 2", "7 1 3 lY wY rY 1"]) + "\n")
    assert first_parting(resumed, ref) == "; first parted at step 6 epoch 1 batch 2 (of 3 traced), in: ['weights', 'rng']"
    resumed.write_text("99 9 9 l w r 2\n")
    assert "is not in the reference's trace" in first_parting(resumed, ref)
    resumed.write_text("")
    assert first_parting(resumed, ref) == "; the leg traced no micro-batch"


def test_sampler_position_maps_across_world_sizes():
    from gpt2dist.data import BlockSampler

    n, consumed_steps = 40, 3
    two = [BlockSampler(n, True, 5, 2, r) for r in (0, 1)]
    its = [iter(s) for s in two]
    for _ in range(consumed_steps * 2):  # 3 steps of 2 samples per rank
        for it in its:
            next(it)
    state = its[0].state_dict()
    assert state == {"global_samples": 12, "epoch": 0}
    one = iter(BlockSampler(n, True, 5, 1, 0))
    one.load_state_dict(state)
    full = list(iter(BlockSampler(n, True, 5, 1, 0)))
    assert list(one) == full[12:]  # the single process continues exactly where the pair stopped


def test_nan_skip_counts_and_stop(tmp, corpus_dir, tokenizer_dir):
    config = write_config(tmp, corpus_dir, tokenizer_dir, "nan_skip", dropout=0.0)
    inject = {"class_path": "fault_plugins.InjectNaN", "init_args": {"steps": [3], "target": "grad"}}
    p = ok(cli(config, "--config", str(overlay(run_dir(config), inject)), "--faults.nan_policy", "skip"))
    assert "step 3: non-finite loss or gradient, update skipped (1 in a row, 1 in total)" in p.stderr
    ck = run_dir(config) / "checkpoints"
    final = torch.load(ck / "last.ckpt", weights_only=False)
    assert final["global_step"] == STEPS
    assert all(torch.isfinite(v).all() for v in final["state_dict"].values())
    # AdamW stepped 5 times, not 6: the skipped step left moments and step count untouched.
    assert {int(s["step"]) for s in final["optimizer_states"][0]["state"].values()} == {STEPS - 1}
    # Three in a row with max_consecutive_nan=2: stops, naming the last good checkpoint.
    inject = {"class_path": "fault_plugins.InjectNaN", "init_args": {"steps": [2, 3, 4], "target": "loss"}}
    config2 = write_config(tmp, corpus_dir, tokenizer_dir, "nan_stop", dropout=0.0)
    p = cli(config2, "--config", str(overlay(run_dir(config2), inject)), "--faults.nan_policy", "skip",
            "--faults.max_consecutive_nan", "2")
    assert p.returncode == 2, p.stderr[-3000:]
    line = [l for l in p.stderr.splitlines() if l.startswith("gpt2dist: error:")][0]
    assert "non-finite loss or gradient norm at step 3" in line and "2 consecutive" in line
    assert "step0000002.ckpt (step 2)" in line  # the newest checkpoint, finite (step 2's update was skipped)
    ck2 = run_dir(config2) / "checkpoints"
    s1, s2 = (torch.load(ck2 / f"step000000{i}.ckpt", weights_only=False)["state_dict"] for i in (1, 2))
    assert all(torch.equal(s1[k], s2[k]) for k in s1)  # skipped: the weights did not move
    assert not (run_dir(config2) / "hf_model").exists()


def test_nan_stop_policy(tmp, corpus_dir, tokenizer_dir):
    config = write_config(tmp, corpus_dir, tokenizer_dir, "nan_policy_stop", dropout=0.0)
    inject = {"class_path": "fault_plugins.InjectNaN", "init_args": {"steps": [3], "target": "loss"}}
    p = cli(config, "--config", str(overlay(run_dir(config), inject)))  # default policy: stop
    assert p.returncode == 2
    assert "non-finite loss or gradient norm at step 3; stopped by faults.nan_policy=stop" in p.stderr
    last = torch.load(run_dir(config) / "checkpoints" / "last.ckpt", weights_only=False)
    assert last["global_step"] == 2 and all(torch.isfinite(v).all() for v in last["state_dict"].values())


def test_nan_policy_holds_under_deepspeed(tmp, corpus_dir, tokenizer_dir):
    """DeepSpeed keeps the gradients (no norm for the guard) and skips an overflowing step itself, silently:
    five inf-loss steps in a row went by with exit 0 and an export of a model trained 1 step of 6. The loss
    is checked there: skipped steps are counted and warned, and max_consecutive_nan stops the run. Once per
    optimizer step: DeepSpeed accumulates (here 2 micro-batches), Lightning steps its engine every micro-batch,
    and the last window's loss was counted again on each (one bad step 2 stopped the run "at step 3")."""
    from cpu_strategies import cpu_overlay

    config = write_config(tmp, corpus_dir, tokenizer_dir, "nan_deepspeed", dropout=0.0)
    inject = {"class_path": "fault_plugins.InjectNaN", "init_args": {"steps": [2, 4, 5], "target": "loss"}}
    p = cli(config, "--config", str(cpu_overlay("deepspeed_zero2", tmp)), "--config",
            str(overlay(run_dir(config), inject)), "--faults.nan_policy", "skip", "--faults.max_consecutive_nan", "2")
    assert p.returncode == 2, p.stderr[-3000:]
    assert "step 2: non-finite loss or gradient, update skipped (1 in a row, 1 in total)" in p.stderr
    assert "step 4: non-finite loss or gradient, update skipped (1 in a row, 2 in total)" in p.stderr
    assert "step 3: non-finite" not in p.stderr
    line = [l for l in p.stderr.splitlines() if l.startswith("gpt2dist: error:")][0]
    assert "non-finite loss or gradient norm at step 5" in line and "2 consecutive" in line, line
    assert not (run_dir(config) / "hf_model").exists()


def test_a_folder_that_refuses_fsync_after_the_rename_is_a_warning(tmp_path, monkeypatch, caplog):
    """fsync of the folder sat inside the write's try: its EINVAL (some FUSE / network mounts) came after the
    rename, and stopped the run saying "nothing was replaced", while last.ckpt already held the new step."""
    import errno
    import logging

    import gpt2dist.faults as faults

    io, ck = faults.AtomicCheckpointIO(), tmp_path / "last.ckpt"
    io.save_checkpoint({"global_step": 3}, ck)

    def refuse(path):
        raise OSError(errno.EINVAL, "Invalid argument")

    monkeypatch.setattr(faults, "fsync_dir", refuse)
    with caplog.at_level(logging.WARNING, logger="gpt2dist.faults"):
        io.save_checkpoint({"global_step": 4}, ck)
    assert torch.load(ck, weights_only=True)["global_step"] == 4 and [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]
    assert f"saved {ck}, but could not fsync its folder ([Errno 22] Invalid argument)" in caplog.text


def test_disk_full_keeps_previous_checkpoint(tmp, corpus_dir, tokenizer_dir):
    config = write_config(tmp, corpus_dir, tokenizer_dir, "disk_full", dropout=0.0)
    ck = run_dir(config) / "checkpoints"
    p = cli(config, "--config", str(overlay(run_dir(config), {"class_path": "fault_plugins.DiskFullAt", "init_args": {"step": 3}})))
    assert p.returncode == 2, p.stderr[-3000:]
    line = [l for l in p.stderr.splitlines() if l.startswith("gpt2dist: error:")][0]
    assert "could not save checkpoint" in line and "disk full" in line and "previous checkpoints are intact" in line
    assert torch.load(ck / "last.ckpt", weights_only=False)["global_step"] == 2  # intact, loadable
    assert not list(ck.glob(".*tmp*")) and "Traceback" not in p.stderr


def test_oom_message(tmp, corpus_dir, tokenizer_dir):
    config = write_config(tmp, corpus_dir, tokenizer_dir, "oom")
    p = cli(config, "--config", str(overlay(run_dir(config), {"class_path": "fault_plugins.RaiseOOM"})))
    assert p.returncode == 3
    line = [l for l in p.stderr.splitlines() if l.startswith("gpt2dist: error: out of memory")][0]
    for needle in ("data.batch_size=2", "data.block_size=32", "accumulate_grad_batches=2", "SingleDeviceStrategy",
                   "tools/plan.py", "--micro-batch 2", "activation checkpointing (model.activation_checkpointing=true)"):
        assert needle in line, needle
    # test and predict say what those stages hold, and name their own knobs (before: "batch_size=None").
    oom = ["--config", str(overlay(run_dir(config), {"class_path": "fault_plugins.RaiseOOM"}))]
    for sub, needles in (("test", ["out of memory evaluating (data.batch_size=2 x data.block_size=32 tokens per process",
                                   "lower data.batch_size"]),
                         ("predict", ["out of memory generating (data.predict_batch_size=3 prompts x model.samples_per_prompt=2 "
                                      "rows per generate call, each up to model.max_new_tokens=5 new tokens",
                                      "lower data.predict_batch_size"])):
        p = cli(config, *oom, "--data.predict_prompts", '["def "]', "--data.predict_batch_size", "3",
                "--model.do_sample", "true", "--model.samples_per_prompt", "2", "--model.max_new_tokens", "5", sub=sub)
        assert p.returncode == 3, p.stderr[-3000:]
        [line] = [l for l in p.stderr.splitlines() if l.startswith("gpt2dist: error: out of memory")]
        assert all(n in line for n in needles) and "None" not in line, line


def test_sigterm_saves_at_the_next_step_exits_143_and_resumes_bitwise(tmp, corpus_dir, tokenizer_dir, reference):
    """SIGTERM after step 3 (a checkpoint only every 4 steps): the run saves last.ckpt at that optimizer-step
    boundary, exits 143 naming it, and `--ckpt_path last` ends equal to the uninterrupted run.
    Before, the work since the last periodic checkpoint (step 0) was lost."""
    config = write_config(tmp, corpus_dir, tokenizer_dir, "sigterm")
    root = run_dir(config)
    term = {"class_path": "fault_plugins.TermAt", "init_args": {"step": 3}}
    p = cli(config, "--checkpoint.every_n_train_steps", "4", "--config", str(overlay(root, term, recorder(config, "-leg1"))))
    assert p.returncode == 143, (p.returncode, p.stderr[-3000:])  # not 0: the run did not finish
    line = [l for l in p.stderr.splitlines() if l.startswith("gpt2dist: error: stopped by SIGTERM")][0]
    # Saved at the first optimizer-step boundary after the signal (3, if the callbacks see it in the same batch).
    assert "last.ckpt (step 3)" in line and "--ckpt_path last" in line and "Traceback" not in p.stderr, line
    assert torch.load(root / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 3
    assert not (root / "hf_model").exists()
    # Finishing at max_steps 6, not a multiple of 4: last.ckpt is saved at step 6 too, and holds the
    # weights that were exported.
    ok(cli(config, "--checkpoint.every_n_train_steps", "4", "--ckpt_path", "last", *traced(config)))
    last = torch.load(root / "checkpoints" / "last.ckpt", weights_only=False)
    assert last["global_step"] == STEPS
    assert not list((root / "checkpoints").glob("last-v*"))  # the resumed run replaced last.ckpt, no second one
    exported = weights(root)
    assert torch.equal(last["state_dict"]["model.transformer.h.0.mlp.c_fc.weight"],
                       exported["transformer.h.0.mlp.c_fc.weight"])
    # Once (2026-12-03, a local run of this file) 8.6e-5 off; the reconstructed step-3 weights say the
    # first leg, a fresh run to the SIGTERM, had already parted from the reference: both legs are traced.
    ref = tmp / "reference" / "trace.txt"
    assert_bitwise(exported, reference, f"{first_parting(root / 'trace-leg1.txt', ref)} (leg to the SIGTERM)"
                                        f"{first_parting(root / 'trace.txt', ref)} (resumed leg)")


def test_a_checkpoint_of_an_unfused_adamw_resumes_with_this_runs_kernel(tmp, corpus_dir, tokenizer_dir, reference):
    """AdamW's load_state_dict took the saved groups whole, `fused` too: a checkpoint of a 16-mixed run (unfused,
    for its GradScaler) resumed where the fused kernel runs stepped unfused, while the NaN guard still handed it
    `found_inf` (it asks the optimizer's construction): AssertionError at the first step. The kernel is this run's."""
    config = write_config(tmp, corpus_dir, tokenizer_dir, "unfused_ckpt")
    root = run_dir(config)
    kill(config, {"step": 4, "when": "mid_accumulation"})
    for path in (root / "checkpoints").glob("*.ckpt"):  # whichever of step 3's files the resume takes
        ckpt = torch.load(path, weights_only=False)
        groups = ckpt["optimizer_states"][0]["param_groups"]
        assert all(g["fused"] for g in groups)  # CPU, 32-true: the fused kernel
        for g in groups:
            g["fused"] = False  # as a 16-mixed run saves it
        torch.save(ckpt, path)
    resume(config)
    assert_bitwise(weights(root), reference)


def test_save_last_link_ends_with_a_last_checkpoint_of_the_final_step(tmp, corpus_dir, tokenizer_dir):
    """checkpoint.save_last=link (last.ckpt a link to the newest step file, to save disk): the end-of-fit save
    re-linked last.ckpt to the step-4 file, and the steps to max_steps 6 were lost to a resume. It is a file of
    the final step, written without touching the step file it linked to."""
    config = write_config(tmp, corpus_dir, tokenizer_dir, "save_last_link", dropout=0.0)
    ck = run_dir(config) / "checkpoints"
    ok(cli(config, "--checkpoint.every_n_train_steps", "4", "--checkpoint.save_last", "link"))
    assert not (ck / "last.ckpt").is_symlink()
    assert torch.load(ck / "last.ckpt", weights_only=False)["global_step"] == STEPS
    assert torch.load(ck / "step0000004.ckpt", weights_only=False)["global_step"] == 4


def test_ddp_sigterm_to_one_rank_stops_both_at_a_step_saves_and_resumes_bitwise(tmp, corpus_dir, tokenizer_dir):
    """DDP x2, SIGTERM to rank 1 only (a `kill` of one process): the ranks agree at the next optimizer
    step (a CPU all-reduce, not Lightning's per-batch GPU broadcast from rank 0, which ignored rank 1's
    signal while rank 1 alone raised and left rank 0 waiting), save last.ckpt, and both exit; the
    resume is bitwise the uninterrupted run."""
    ddp = ["--config", str(REPO / "configs/strategy/ddp.yaml")]
    ref = write_config(tmp, corpus_dir, tokenizer_dir, "ddp_ref", devices=2, keep=True)
    if not (run_dir(ref) / "hf_model").exists():  # shared with test_ddp_kill_resume_is_bitwise_exact
        ok(cli(ref, *ddp))
    config = write_config(tmp, corpus_dir, tokenizer_dir, "ddp_sigterm", devices=2)
    root = run_dir(config)
    p = cli(config, *ddp, "--checkpoint.every_n_train_steps", "4", "--config",
            str(overlay(root, {"class_path": "fault_plugins.TermAt", "init_args": {"step": 3, "rank": 1}})), timeout=180)
    assert p.returncode == 143, (p.returncode, p.stderr[-3000:])
    step = torch.load(root / "checkpoints" / "last.ckpt", weights_only=False)["global_step"]
    assert step in (3, 4) and f"last.ckpt (step {step})" in p.stderr and "Traceback" not in p.stderr, p.stderr[-3000:]
    resumed = resume(config, *ddp)
    assert f"(global_step {step}" in resumed.stderr
    assert_bitwise(weights(root), weights(run_dir(ref)))


@pytest.mark.parametrize("sub, devices, rank", [("validate", 1, None), ("predict", 1, None), ("test", 2, 1),
                                               ("predict", 2, 1)])
def test_sigterm_stops_an_evaluation_after_a_batch_on_every_rank_with_no_partial_result(
        tmp, corpus_dir, tokenizer_dir, reference, sub, devices, rank):
    """validate / test / predict, SIGTERM after the first batch (under DDP to rank 1 only, as a `kill` of one
    process): every rank stops after that batch, exit 143 with one line, and nothing is reported for the
    unfinished split (no metric line, no predictions file). Before, Lightning's handler broadcast from
    inside the signal handler (DDP could hang) and its prediction loop never looked at the signal."""
    config = tmp / "reference.yaml"  # the `reference` fixture's run: its last.ckpt is evaluated
    root, out = run_dir(config), tmp / f"eval_{sub}_{devices}"
    args = ["--ckpt_path", str(root / "checkpoints" / "last.ckpt"), "--trainer.default_root_dir", str(out),
            "--trainer.devices", str(devices), "--trainer.limit_val_batches", "4", "--trainer.limit_test_batches", "4",
            "--data.predict_prompts", '["def ", "import ", "class ", "x = "]', "--model.max_new_tokens", "4",
            "--data.predict_batch_size", "1",  # 4 batches: the signal comes after the first, not the last
            "--config", str(overlay(out, {"class_path": "fault_plugins.TermAtEval", "init_args": {"batch": 0, "rank": rank}}))]
    ddp = ["--config", str(REPO / "configs/strategy/ddp.yaml")] if devices > 1 else []
    p = cli(config, *ddp, *args, sub=sub, timeout=180)
    assert p.returncode == 143, (p.returncode, p.stdout[-2000:], p.stderr[-3000:])
    # One line per rank (counted, not split: two ranks' writes to the shared pipe can land on one line).
    msg = "gpt2dist: error: stopped by SIGTERM before the end"
    assert p.stderr.count("gpt2dist: error:") == p.stderr.count(msg) == devices, p.stderr[-3000:]
    assert "Traceback" not in p.stderr
    assert "val/loss" not in p.stdout and "test/loss" not in p.stdout  # no report of a partial split
    assert not (out / "predictions.jsonl").exists()
    # Without the signal the same command finishes (the check above can fail).
    if devices == 1:
        done = cli(config, *args[:-2], sub=sub, timeout=180)
        assert done.returncode == 0, done.stderr[-3000:]
        assert (out / "predictions.jsonl").exists() if sub == "predict" else "val/loss" in done.stdout


def test_oom_plan_command_describes_the_run():
    from gpt2dist.faults import plan_command

    base = {"model": "gpt2-large", "world_size": 8, "block_size": 1024, "batch_size": 4}
    assert plan_command({**base, "precision": "bf16-mixed", "compile": True, "pad_vocab": 1}) == (
        "python tools/plan.py --model gpt2-large --gpus 8 --seq 1024 --micro-batch 4 --pad-vocab 1 --compile on")
    cmd = plan_command({**base, "precision": "bf16-true", "compile": False, "pad_vocab": 128, "accumulate": 2})
    assert cmd.endswith("--micro-batch 4 --accumulate 2 --precision bf16-true --pad-vocab 128 --compile off")
    # The card that ran out (not plan.py's default 80 GB); what plan.py does not model is said, not hidden.
    cmd40 = plan_command({**base, "precision": "32-true", "gpu_mem_gb": 42.4, "config_overrides": {"n_layer": 12}})
    assert cmd40.endswith("--gpu-mem-gb 42.4  # not modelled: precision 32-true (planned as bf16-mixed); "
                          "model.config_overrides {'n_layer': 12} (planned as the base model)"), cmd40
    # A model folder with a space stays one argument of the command to copy.
    assert "--model '/data/my models/gpt2 ft' --gpus 8" in plan_command({**base, "model": "/data/my models/gpt2 ft"})
    sys.path.insert(0, str(REPO / "tools"))
    import plan as plan_tool  # tools/plan.py accepts what the message tells users to run

    p = plan_tool.main(cmd.split()[2:] + ["--gpu-mem-gb", "80"])
    assert p["precision"] == "bf16-true" and p["vocab_rows"] == 50304 and p["world"] == 8 and p["accumulate"] == 2
    assert not any(r["compiled"] for r in p["rows"])
    # Padded as asked, but for ZeRO-3, which refuses padding (its rows say so).
    assert {r["strategy"]: r["vocab_rows"] for r in p["rows"]} == {
        s: 50257 if s.startswith("ZeRO-3") else 50304 for s in ("DDP", "FSDP2", "FSDP1", "ZeRO-1", "ZeRO-2", "ZeRO-3", "ZeRO-3 offload")}


def test_atomic_checkpoint_io_never_exposes_a_partial_file(tmp_path, monkeypatch):
    from gpt2dist.errors import CheckpointError
    from gpt2dist.faults import AtomicCheckpointIO

    io, path = AtomicCheckpointIO(), tmp_path / "last.ckpt"
    io.save_checkpoint({"w": torch.ones(3)}, path)
    mask = os.umask(0o022)
    os.umask(mask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~mask  # a plain new file's mode: readable on shared storage
    seen = []
    real = os.replace
    monkeypatch.setattr(os, "replace", lambda s, d: (seen.append((Path(s).name, torch.load(s)["w"].sum().item())), real(s, d)))
    io.save_checkpoint({"w": torch.full((3,), 2.0)}, path)
    assert seen == [(f".last.ckpt.tmp-{os.getpid()}", 6.0)]  # complete before it gets the name
    monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(28, "No space left on device")))
    with pytest.raises(CheckpointError, match="disk full"):
        io.save_checkpoint({"w": torch.zeros(3)}, path)
    assert torch.load(path)["w"].sum().item() == 6.0 and [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


WRITE_PAST_A_LIMIT = """
import resource, signal, sys, torch
from pathlib import Path
from gpt2dist.errors import CheckpointError
from gpt2dist.faults import AtomicCheckpointIO
path = Path(sys.argv[1])
AtomicCheckpointIO().save_checkpoint({"w": torch.ones(3)}, path)
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails (EFBIG), as on a full disk
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, resource.RLIM_INFINITY))
try:
    AtomicCheckpointIO().save_checkpoint({"w": torch.zeros(1 << 20)}, path)
except CheckpointError as e:
    print(e)
"""


def test_a_write_that_fails_inside_torch_save_is_one_line_and_leaves_no_partial_file(tmp_path, monkeypatch):
    """A real failed write (a file-size limit: the kernel refuses it as it refuses a full disk): torch.save's
    writer raises RuntimeError('unexpected pos'), not OSError; it was a traceback, and the partial
    temporary file (a model's size) stayed on the full disk. ENOSPC or a quota in its chain is named."""
    from gpt2dist.faults import _save_failed

    path = tmp_path / "last.ckpt"
    p = subprocess.run([sys.executable, "-c", WRITE_PAST_A_LIMIT, str(path)], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and p.stdout.startswith(f"could not save checkpoint {path} (OSError: [Errno 27] File too large)"), \
        (p.stdout, p.stderr[-2000:])
    assert "the previous checkpoints are intact (last.ckpt)" in p.stdout
    assert [q.name for q in tmp_path.iterdir()] == ["last.ckpt"] and torch.load(path)["w"].sum().item() == 3.0
    for code, said in [(28, "disk full in"), (122, "disk quota exceeded in")]:
        try:
            try:
                raise OSError(code, os.strerror(code))
            except OSError:
                raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
        except RuntimeError as e:
            assert said in str(_save_failed(path, e))
    # Any other error (a CUDA error while serializing) is not the disk's: it stays itself, named as it is.
    from gpt2dist.faults import AtomicCheckpointIO

    def cuda_error(obj, f, *args, **kwargs):
        f.write(b"partial")
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(torch, "save", cuda_error)
    with pytest.raises(RuntimeError, match="^CUDA error"):
        AtomicCheckpointIO().save_checkpoint({"w": torch.zeros(3)}, path)
    assert [q.name for q in tmp_path.iterdir()] == ["last.ckpt"]


def test_distributed_atomic_save_handles_nested_folders(tmp_path):
    """DeepSpeed writes <folder>/<tag>/*.pt: the atomic folder save must fsync and rename nested
    folders too, and a failed write must leave the previous folder as it was."""
    from types import SimpleNamespace

    from gpt2dist.errors import CheckpointError
    from gpt2dist.faults import save_distributed_atomically

    one_rank = SimpleNamespace(broadcast=lambda x, src=0: x, global_rank=0, barrier=lambda name=None: None,
                               reduce_boolean_decision=lambda decision, all=True: decision)

    def deepspeed_like(checkpoint, folder):
        (Path(folder) / "checkpoint").mkdir(parents=True)
        torch.save(checkpoint, Path(folder) / "checkpoint" / "mp_rank_00_model_states.pt")
        (Path(folder) / "latest").write_text("checkpoint")

    target = tmp_path / "last.ckpt"
    save_distributed_atomically(one_rank, deepspeed_like, {"global_step": 1}, target)
    save_distributed_atomically(one_rank, deepspeed_like, {"global_step": 2}, target)
    assert torch.load(target / "checkpoint" / "mp_rank_00_model_states.pt")["global_step"] == 2
    mask = os.umask(0o022)
    os.umask(mask)
    assert [p.stat().st_mode & 0o777 for p in (target, target / "checkpoint", target / "latest")] == [
        0o777 & ~mask, 0o777 & ~mask, 0o666 & ~mask]  # plain new folders' and files' modes

    def dies_half_way(checkpoint, folder):
        (Path(folder) / "checkpoint").mkdir(parents=True)
        raise OSError(28, "No space left on device")

    with pytest.raises(CheckpointError, match="disk full"):
        save_distributed_atomically(one_rank, dies_half_way, {"global_step": 3}, target)
    assert torch.load(target / "checkpoint" / "mp_rank_00_model_states.pt")["global_step"] == 2
    mask = os.umask(0o022)
    os.umask(mask)
    assert [p.stat().st_mode & 0o777 for p in (target, target / "checkpoint", target / "latest")] == [
        0o777 & ~mask, 0o777 & ~mask, 0o666 & ~mask]  # plain new folders' and files' modes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]
    # save_last=link: last.ckpt a link to a step folder. The link is replaced; the folder it named is kept
    # whole (it was renamed to .last.ckpt.old, a link rmtree cannot remove, and left behind).
    step = tmp_path / "step4.ckpt"
    target.rename(step)
    target.symlink_to(step.name)
    save_distributed_atomically(one_rank, deepspeed_like, {"global_step": 6}, target)
    assert not target.is_symlink() and torch.load(target / "checkpoint" / "mp_rank_00_model_states.pt")["global_step"] == 6
    assert torch.load(step / "checkpoint" / "mp_rank_00_model_states.pt")["global_step"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt", "step4.ckpt"]


def _nan_fit(tmp_path, policy: str, log_every: int, checkpoint_every: int | None = None, nan_steps=(2,)):
    """A real in-process fit (fused AdamW on CPU, as on GPUs) with NaN gradients at `nan_steps`;
    returns (module, FaultTolerance, pending flags seen after each optimizer step)."""
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import ModelCheckpoint

    from fault_plugins import InjectNaN
    from gpt2dist.faults import FaultTolerance
    from gpt2dist.model import GPT2Module

    torch.manual_seed(0)
    module = GPT2Module(from_scratch=True, config_overrides={**TINY, "vocab_size": 512}, dropout=0.0, warmup_steps=2)
    guard = FaultTolerance(nan_policy=policy, max_consecutive_nan=2)
    seen = []

    class Pending(pl.Callback):  # after FaultTolerance's hook: how many flags it has not read yet
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append(len(guard._pending))

    ids = torch.randint(0, 512, (8 * 4, 16), generator=torch.Generator().manual_seed(0))
    loader = torch.utils.data.DataLoader([{"input_ids": x} for x in ids], batch_size=4)
    callbacks = [InjectNaN(steps=list(nan_steps), target="grad"), guard, Pending()]
    if checkpoint_every:
        callbacks.append(ModelCheckpoint(dirpath=tmp_path / "ck", every_n_train_steps=checkpoint_every, save_top_k=-1))
    trainer = pl.Trainer(accelerator="cpu", max_steps=8, log_every_n_steps=log_every, logger=False,
                         enable_checkpointing=bool(checkpoint_every), enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path, callbacks=callbacks)
    trainer.fit(module, train_dataloaders=loader)
    return module, guard, seen


def test_nan_guard_defers_the_host_read_and_changes_nothing(tmp_path, caplog):
    """With a fused AdamW the NaN guard does not read its flag every step (a host sync on a GPU):
    the kernel skips the bad update itself (`found_inf`), and the flags are read on logging steps.
    The weights and optimizer state equal those of a run that reads the flag every step."""
    deferred, guard, seen = _nan_fit(tmp_path / "a", "skip", log_every=4)
    assert seen == [1, 2, 3, 0, 1, 2, 3, 0]  # read only after steps 4 and 8 (the logging steps)
    assert guard.skipped == 1 and "step 2: non-finite loss or gradient, update skipped (1 in a row, 1 in total)" in caplog.text
    every, guard1, seen1 = _nan_fit(tmp_path / "b", "skip", log_every=1)
    assert seen1 == [0] * 8 and guard1.skipped == 1
    a, b = deferred.state_dict(), every.state_dict()
    assert all(torch.isfinite(v).all() and torch.equal(v, b[k]) for k, v in a.items())
    opt = deferred.trainer.optimizers[0]
    assert {int(s["step"]) for s in opt.state.values()} == {7}  # 8 steps, the NaN one skipped on the device


def test_nan_guard_stops_before_the_next_checkpoint(tmp_path):
    """Deferred, a stop still comes before any checkpoint is written after the bad step: NaN at step 4,
    checkpoints every 3 steps, no logging step in between: it stops at step 6, before its save."""
    from gpt2dist.errors import GPT2DistError

    with pytest.raises(GPT2DistError, match=r"non-finite loss or gradient norm at step 4; stopped by faults.nan_policy=stop"):
        _nan_fit(tmp_path, "stop", log_every=50, checkpoint_every=3, nan_steps=(4,))
    saved = sorted(p.name for p in (tmp_path / "ck").iterdir())
    assert saved == ["epoch=0-step=3.ckpt"], saved  # step 3 (good), and nothing after the bad step


def _fp16_fit(init_scale: float, nan_loss_steps=()):
    """A real in-process 16-mixed fit with a GradScaler (Lightning's MixedPrecision plugin; on CPU, where
    Trainer(precision="16-mixed") would switch to bf16); returns the scaler."""
    import lightning.pytorch as pl
    from lightning.pytorch.plugins.precision import MixedPrecision

    from fault_plugins import InjectNaN
    from gpt2dist.faults import FaultTolerance
    from gpt2dist.model import GPT2Module

    torch.manual_seed(0)
    module = GPT2Module(from_scratch=True, config_overrides={**TINY, "vocab_size": 512}, dropout=0.0, warmup_steps=2)
    ids = torch.randint(0, 512, (8 * 4, 16), generator=torch.Generator().manual_seed(0))
    loader = torch.utils.data.DataLoader([{"input_ids": x} for x in ids], batch_size=4)
    scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
    trainer = pl.Trainer(accelerator="cpu", max_steps=8, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)],
                         callbacks=[InjectNaN(steps=list(nan_loss_steps), target="loss"), FaultTolerance(nan_policy="stop")])
    trainer.fit(module, train_dataloaders=loader)
    return scaler


def test_fp16_overflow_is_the_grad_scalers_to_skip_but_a_nan_loss_stops():
    """Under 16-mixed the first steps overflow as a matter of course while the GradScaler lowers its scale:
    nan_policy=stop stopped the run at step 1. A non-finite loss is still a fault."""
    from gpt2dist.errors import GPT2DistError

    scaler = _fp16_fit(2.0 ** 70)  # every step overflows in fp16: the scaler skips each and halves the scale
    assert scaler.get_scale() == 2.0 ** 62
    with pytest.raises(GPT2DistError, match=r"non-finite loss or gradient norm at step 3; stopped by faults.nan_policy=stop"):
        _fp16_fit(2.0 ** 10, nan_loss_steps=(3,))


def _fault_tolerance_setup(rank: int, world: int, init_file: str, roots: list, ckpt_dirs: list, out) -> None:
    from types import SimpleNamespace

    import torch.distributed as dist

    from gpt2dist.faults import FaultTolerance

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        # What setup reads of the Trainer: its run folder and the checkpoint callback's folder.
        trainer = SimpleNamespace(default_root_dir=roots[rank], checkpoint_callback=SimpleNamespace(dirpath=ckpt_dirs[rank]))
        FaultTolerance().setup(trainer, None, "fit")
        out.put((rank, "ok"))
    except Exception as e:
        out.put((rank, f"{type(e).__name__}: {e}"))
    finally:
        dist.destroy_process_group()


def test_fit_setup_checks_that_all_ranks_see_the_run_and_checkpoint_folders(tmp_path):
    """The wiring of gpt2dist.resume.check_ranks_share_the_run (tested there) into every fit: the run
    folder, and the checkpoint folder too when it lies outside it (e.g. on another mount)."""
    from conftest import spawn_ranks

    def run(name, roots, ckpt_dirs):
        results = spawn_ranks(_fault_tolerance_setup, 2, str(tmp_path / f"init-{name}"),
                              [str(r) for r in roots], [str(c) for c in ckpt_dirs], timeout=120)
        return [msg for _, msg in sorted(results)]

    root, elsewhere = tmp_path / "run", tmp_path / "ckpts"
    assert run("same", [root, root], [root / "checkpoints"] * 2) == ["ok", "ok"]
    assert run("outside", [root, root], [elsewhere] * 2) == ["ok", "ok"]
    # Rank 1's checkpoint folder (outside the run folder) is another one: caught, named.
    msgs = run("split-ckpt", [root, root], [elsewhere, tmp_path / "node2" / "ckpts"])
    assert msgs[0] == msgs[1] and msgs[0].startswith(f"ConfigError: {elsewhere} is not one folder for all ranks: rank 1 ")
    # Rank 1's run folder is another one.
    msgs = run("split-root", [root, tmp_path / "node2" / "run"], [root / "checkpoints"] * 2)
    assert msgs[0] == msgs[1] and msgs[0].startswith(f"ConfigError: {root} is not one folder for all ranks: rank 1 ")


def _distributed_save_where_rank0_cannot_rename(rank: int, world: int, init_file: str, target: str, out) -> None:
    import datetime
    from types import SimpleNamespace

    import torch.distributed as dist

    from gpt2dist.faults import save_distributed_atomically

    # A short timeout: a rank left waiting for rank 0 fails here within seconds, not the suite's minutes.
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=20))

    def broadcast(obj, src=0):
        box = [obj]
        dist.broadcast_object_list(box, src)
        return box[0]

    def any_rank(decision, all=True):
        flag = torch.tensor(int(decision))
        dist.all_reduce(flag)
        return bool(flag) if not all else int(flag) == world

    strategy = SimpleNamespace(broadcast=broadcast, global_rank=rank, barrier=lambda name=None: dist.barrier(),
                               reduce_boolean_decision=any_rank)
    if rank == 0:  # a network filesystem's quota, reported when rank 0 renames the finished folder in
        os.replace = lambda *a: (_ for _ in ()).throw(OSError(122, "Disk quota exceeded"))

    def shard(checkpoint, folder):
        Path(folder).mkdir(parents=True, exist_ok=True)
        torch.save(checkpoint, Path(folder) / f"rank{rank}.pt")

    try:
        save_distributed_atomically(strategy, shard, {"global_step": 1}, target)
        out.put((rank, "saved"))
    except Exception as e:
        out.put((rank, f"{type(e).__name__}: {e}"))
    finally:
        dist.destroy_process_group()


def test_a_sharded_save_that_fails_on_rank_0_fails_on_every_rank(tmp_path):
    """Rank 0 alone fsyncs and renames the finished folder: when that failed it raised, and every other
    rank waited in the closing barrier until the collective timeout (30 minutes by default)."""
    from conftest import spawn_ranks

    results = dict(spawn_ranks(_distributed_save_where_rank0_cannot_rename, 2, str(tmp_path / "init"),
                               str(tmp_path / "last.ckpt"), timeout=120))
    said = f"CheckpointError: could not save checkpoint {tmp_path / 'last.ckpt'} (disk quota exceeded in {tmp_path})"
    assert results[0] == results[1] and results[0].startswith(said), results
    assert not (tmp_path / "last.ckpt").exists()


def test_checkpoints_to_a_url_are_written_there_or_refused_up_front(tmp_path, monkeypatch):
    """AtomicCheckpointIO made file:///x/last.ckpt a local ./file:/x/last.ckpt; a sharded strategy
    (one file per rank) cannot write to a URL at all: refused at setup, not at the first save."""
    from types import SimpleNamespace

    from gpt2dist.errors import ConfigError
    from gpt2dist.faults import AtomicCheckpointIO, FaultTolerance
    from gpt2dist.strategies import FSDP2Strategy

    monkeypatch.chdir(tmp_path)
    AtomicCheckpointIO().save_checkpoint({"w": torch.ones(3)}, f"file://{tmp_path}/ck/last.ckpt")
    assert torch.load(tmp_path / "ck" / "last.ckpt")["w"].sum() == 3 and not (tmp_path / "file:").exists()
    trainer = SimpleNamespace(default_root_dir=str(tmp_path), strategy=FSDP2Strategy(),
                              checkpoint_callback=SimpleNamespace(dirpath="s3://bucket/run/checkpoints"))
    with pytest.raises(ConfigError, match=r"^checkpoint.dirpath=s3://bucket/run/checkpoints is a URL, but "
                                          r"FSDP2Strategy writes sharded checkpoints"):
        FaultTolerance().setup(trainer, None, "fit")


# --- the validation of the step a run resumed at -------------------------------------------------
# A step's checkpoint is written before that step's validation: Lightning, resuming from it, skipped
# the validation for good (a SIGTERM at a validation step left no val/loss there; early stopping and
# the best checkpoint missed a check). FaultTolerance now runs it first.

EVERY_STEP = ["--trainer.val_check_interval", "2", "--checkpoint.every_n_train_steps", "2"]  # 2 micro-batches = 1 step
STOP_WHEN_NOT_RISING = ["--early_stopping.patience", "2", "--early_stopping.mode", "max"]  # val/loss falls here


def csv_logger(root: Path) -> list[str]:
    return ["--trainer.logger", "lightning.pytorch.loggers.CSVLogger", "--trainer.logger.save_dir", str(root),
            "--trainer.logger.name", "logs"]


def logged(root: Path, key: str, last_only: bool = False) -> list[tuple[int, float]]:
    """(logger step, value) of every row logging `key`, over the run's CSV logs in order (or the last one's)."""
    import csv

    files = sorted(root.glob("logs/version_*/metrics.csv"), key=lambda p: int(p.parent.name[8:]))
    return [(int(r["step"]), float(r[key])) for f in (files[-1:] if last_only else files)
            for r in csv.DictReader(f.open()) if r.get(key)]


def val_rows(root: Path, last_only: bool = False) -> list[tuple[int, float]]:
    return logged(root, "val/loss", last_only)


def token_rows(root: Path) -> list[tuple[int, int]]:
    return [(step, int(v)) for step, v in logged(root, "train/tokens")]


def stop_step(vals: list[float], patience: int, rising: bool) -> int:
    """The optimizer step (validation i after step i + 1) at which `patience` validations in a row
    have not beaten the best: early stopping's rule, recomputed from the logged values."""
    best, wait = None, 0
    for i, v in enumerate(vals):
        if best is None or (v > best if rising else v < best):
            best, wait = v, 0
        else:
            wait += 1
            if wait >= patience:
                return i + 1
    raise AssertionError(f"no stop in {vals}")


@pytest.fixture(scope="module")
def stopped_early(tmp, corpus_dir, tokenizer_dir):
    """Uninterrupted: validation and a checkpoint every step, early stopping with patience 2."""
    config = write_config(tmp, corpus_dir, tokenizer_dir, "stop_ref")
    root = run_dir(config)
    p = ok(cli(config, *EVERY_STEP, *STOP_WHEN_NOT_RISING, *csv_logger(root), *traced(config)))
    vals = val_rows(root)
    step = stop_step([v for _, v in vals], 2, rising=True)
    assert step < STEPS and len(vals) == step, vals  # it stopped, after the validation of that step
    assert f"early stopping at step {step}: val/loss has not improved on its best" in p.stderr + p.stdout
    assert torch.load(root / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == step
    # train/tokens: every rank's tokens so far, logged at each step (logger step k = after optimizer step k + 1).
    assert token_rows(root) == [(k, (k + 1) * GLOBAL_BATCH * 32) for k in range(step)]
    return step, vals, weights(root)


@pytest.mark.parametrize("fault", ["sigterm", "kill", "sigterm_in_validation", "usr1_in_validation"])
def test_resume_redoes_the_validation_of_its_step_so_early_stopping_and_logs_match(tmp, corpus_dir, tokenizer_dir,
                                                                                  stopped_early, fault):
    """sigterm: SIGTERM after step 2 saves last.ckpt before step 2's validation and exits; that
    validation never ran. kill: SIGKILL mid-step 3, after step 2's validation ran; the resume starts
    from step 2's checkpoint, written before it (the best checkpoint's mode is max, so no file of step 2
    was written after its validation: `last` would take that one and need no redo). *_in_validation:
    SIGTERM, or SLURM's SIGUSR1 under a (simulated) SLURM job, after the first of step 2's 2
    validation batches: saved and stopped there (before: after the validation and step 3), with no
    row of that validation; the USR1 job is requeued (exit 0) and its requeue resumes from
    hpc_ckpt_1.ckpt. Either way the resumed run validates step 2 first, so
    every validation row (logger step and value) equals the uninterrupted run's, early stopping stops
    at the same step, and the weights are the same. Without the redo it stopped a step later."""
    step, ref_vals, ref_weights = stopped_early
    config = write_config(tmp, corpus_dir, tokenizer_dir, f"stop_{fault}")
    root = run_dir(config)
    args = [*EVERY_STEP, *STOP_WHEN_NOT_RISING, *csv_logger(root)]
    env = None
    if fault == "usr1_in_validation":
        bin_dir = tmp / f"bin_{fault}"
        bin_dir.mkdir(exist_ok=True)
        (bin_dir / "scontrol").write_text(f"#!/bin/sh\necho \"$@\" >> {bin_dir}/calls\n")
        (bin_dir / "scontrol").chmod(0o755)
        env = {**slurm_env("4243"), "SLURM_RESTART_COUNT": "0", "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    if fault.endswith("_in_validation"):
        signal_in = {"class_path": "fault_plugins.SignalInValidation",
                     "init_args": {"step": 2, "batch": 0, "signum": "USR1" if env else "TERM"}}
        p = cli(config, *args, "--config", str(overlay(root, signal_in)), env=env)
        assert p.returncode == (0 if env else 143), p.stderr[-3000:]
        assert "stopped during the validation of step 2" in p.stderr and "Traceback" not in p.stderr, p.stderr[-3000:]
        assert val_rows(root) == ref_vals[:1] and not (root / "hf_model").exists()
        if env:
            assert (bin_dir / "calls").read_text() == "requeue 4243\n"
            assert torch.load(root / "hpc_ckpt_1.ckpt", weights_only=False)["global_step"] == 2
            p = ok(cli(config, *args, *traced(config), env={**env, "SLURM_RESTART_COUNT": "1"}))  # the requeued job
            assert f"resume: {root / 'hpc_ckpt_1.ckpt'} (global_step 2" in p.stderr, p.stderr[-3000:]
            rows = val_rows(root, last_only=True)
            assert rows == ref_vals[1:], (rows, ref_vals)
            assert f"early stopping at step {step}:" in p.stderr + p.stdout
            assert_bitwise(weights(root), ref_weights, first_parting(root / "trace.txt", tmp / "stop_ref" / "trace.txt"))
            return
    elif fault == "sigterm":
        p = cli(config, *args, "--config", str(overlay(root, {"class_path": "fault_plugins.TermAt", "init_args": {"step": 2}})))
        assert p.returncode == 143, p.stderr[-3000:]
        assert val_rows(root) == ref_vals[:1]  # step 1's only
    else:
        args += ["--best_checkpoint.mode", "max"]
        kill(config, {"step": 3}, *args)
        assert val_rows(root) == ref_vals[:2]
    assert torch.load(root / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 2
    p = resume(config, *args, *traced(config))
    rows = val_rows(root, last_only=True)  # the resumed run's own log
    assert rows == ref_vals[1:], (rows, ref_vals)  # step 2's validation first, then the rest, as uninterrupted
    assert f"early stopping at step {step}:" in p.stderr + p.stdout
    assert torch.load(root / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == step
    assert_bitwise(weights(root), ref_weights, first_parting(root / "trace.txt", tmp / "stop_ref" / "trace.txt"))
    # The token count is restored with the checkpoint: the resumed rows continue the uninterrupted run's.
    ref_tokens = token_rows(tmp / "stop_ref")
    assert token_rows(root)[-len(ref_tokens) + 1:] == ref_tokens[1:]


def test_an_early_stopped_run_stays_stopped_on_resume_unless_patience_is_raised(tmp, corpus_dir, tokenizer_dir,
                                                                               stopped_early):
    """`--ckpt_path last|auto` on a run that stopped early (a rerun of the same job script) trains no
    further: before, Lightning restored the counters but not the decision, and the run went on until
    the next validation. A larger `early_stopping.patience` in the config (not the checkpoint's) goes on."""
    import shutil

    step, ref_vals, ref_weights = stopped_early
    config = write_config(tmp, corpus_dir, tokenizer_dir, "stop_again")
    root = run_dir(config)
    shutil.copytree(tmp / "stop_ref", root, dirs_exist_ok=True)
    args = [*EVERY_STEP, "--early_stopping.mode", "max", *csv_logger(root)]
    p = resume(config, *args, "--early_stopping.patience", "2")
    assert f"resume: this run stopped early at step {step} (val/loss has not improved" in p.stderr, p.stderr[-3000:]
    assert torch.load(root / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == step
    assert val_rows(root) == ref_vals  # not one more validation
    assert_bitwise(weights(root), ref_weights)  # the export is the stopped run's weights

    p = resume(config, *args, "--early_stopping.patience", "3")
    assert "stopped early" not in p.stderr
    vals = val_rows(root)
    assert vals[: len(ref_vals)] == ref_vals and len(vals) > len(ref_vals)
    again = stop_step([v for _, v in vals], 3, rising=True)
    assert f"early stopping at step {again}: val/loss has not improved on its best" in p.stderr + p.stdout
    assert torch.load(root / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == again > step


@pytest.mark.parametrize("where", ["step", "validation"])
def test_ddp_sigterm_at_a_validation_step_resumes_with_that_validation(tmp, corpus_dir, tokenizer_dir, where):
    """DDP x2, SIGTERM to rank 1 after step 2 (step), or after the first of its batches of step 2's
    validation (validation): both ranks save before that step's validation (or stop it after that
    batch, as one) and exit; the resumed ranks validate that step first, together, and the run stops
    early where the uninterrupted DDP run did, with its validation rows and weights."""
    ddp = ["--config", str(REPO / "configs/strategy/ddp.yaml")]
    ref = write_config(tmp, corpus_dir, tokenizer_dir, "ddp_stop_ref", devices=2, keep=True)
    if not (run_dir(ref) / "hf_model").exists():  # one reference for both cases
        ok(cli(ref, *ddp, *EVERY_STEP, *STOP_WHEN_NOT_RISING, *csv_logger(run_dir(ref))))
    ref_vals = val_rows(run_dir(ref))
    stop = stop_step([v for _, v in ref_vals], 2, rising=True)
    assert len(ref_vals) == stop < STEPS
    config = write_config(tmp, corpus_dir, tokenizer_dir, f"ddp_stop_sigterm_{where}", devices=2)
    root = run_dir(config)
    args = [*ddp, *EVERY_STEP, *STOP_WHEN_NOT_RISING, *csv_logger(root)]
    plugin = ({"class_path": "fault_plugins.TermAt", "init_args": {"step": 2, "rank": 1}} if where == "step" else
              {"class_path": "fault_plugins.SignalInValidation", "init_args": {"step": 2, "rank": 1}})
    p = cli(config, *args, "--config", str(overlay(root, plugin)), timeout=180)
    assert p.returncode == 143, (p.returncode, p.stderr[-3000:])
    saved = torch.load(root / "checkpoints" / "last.ckpt", weights_only=False)["global_step"]
    assert saved in ((2, 3) if where == "step" else (2,)) and saved <= stop and val_rows(root) == ref_vals[: saved - 1]
    if where == "validation":
        assert "stopped during the validation of step 2" in p.stderr and "Traceback" not in p.stderr, p.stderr[-3000:]
    resume(config, *args)
    assert val_rows(root) == ref_vals  # the saved step's validation included, none twice
    # Tokens of both ranks: 4 sequences x 32 tokens per step, as with one process; counted on across the resume.
    assert token_rows(run_dir(ref)) == [(k, (k + 1) * GLOBAL_BATCH * 32) for k in range(stop)]
    assert token_rows(root)[-2:] == token_rows(run_dir(ref))[-2:]
    assert torch.load(root / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == stop
    assert_bitwise(weights(root), weights(run_dir(ref)))


def test_early_stopping_waits_for_min_steps_and_says_so(tmp, corpus_dir, tokenizer_dir, stopped_early):
    """With `trainer.min_steps` past the step where patience ran out, the run says the stop is deferred,
    trains on to min_steps, and stops there (last.ckpt, and a resume that stays stopped, at that step)."""
    step = stopped_early[0]
    config = write_config(tmp, corpus_dir, tokenizer_dir, "stop_min_steps")
    root = run_dir(config)
    args = [*EVERY_STEP, *STOP_WHEN_NOT_RISING, *csv_logger(root), "--trainer.min_steps", str(step + 2)]
    p = ok(cli(config, *args))
    out = p.stderr + p.stdout
    assert f"early stopping at step {step} deferred: val/loss has not improved" in out and "min_steps=5" in out, out[-3000:]
    # Not min_epochs=1, which Lightning makes of min_epochs=None when min_steps is set (a whole epoch here).
    assert f"early stopping at step {step + 2}: val/loss has not improved" in out
    assert torch.load(root / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == step + 2 < STEPS
    p = resume(config, *args)
    assert f"resume: this run stopped early at step {step + 2}" in p.stderr


def test_check_writable_expands_home_as_lightning_does_and_leaves_urls_alone(tmp_path, monkeypatch):
    """`--trainer.default_root_dir '~/runs/x'` (quoted, or from YAML): Lightning trains in $HOME/runs/x;
    the check made and probed a literal ./~/runs/x instead. A URL made a local ./s3:/bucket folder."""
    from gpt2dist.faults import check_writable

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    check_writable("~/runs/x")
    check_writable("s3://bucket/runs")
    assert (tmp_path / "home" / "runs" / "x").is_dir() and not list((tmp_path / "home" / "runs" / "x").iterdir())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["home"]  # no ./~ and no ./s3:


def test_validation_must_end_an_optimizer_step():
    """Lightning counts an int val_check_interval in micro-batches: the XL preset's 500 with 8 accumulated
    validated (and checkpointed) in the middle of step 63."""
    import lightning.pytorch as pl

    from gpt2dist.errors import GPT2DistError
    from gpt2dist.faults import check_validation_on_step_boundary

    def trainer(**kw):
        return pl.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False, **kw)

    with pytest.raises(GPT2DistError, match=r"^trainer.val_check_interval=500 counts micro-batches.*accumulate_grad_batches=8"
                                            r".*use a multiple of 8: 4000 validates every 500 optimizer steps, 496 every 62$"):
        check_validation_on_step_boundary(trainer(accumulate_grad_batches=8, val_check_interval=500))
    with pytest.raises(GPT2DistError, match=r"^a time-based trainer.val_check_interval validates at whatever micro-batch"):
        check_validation_on_step_boundary(trainer(accumulate_grad_batches=2, val_check_interval="00:00:30:00"))
    for ok in (dict(accumulate_grad_batches=8, val_check_interval=4000), dict(accumulate_grad_batches=1, val_check_interval=7),
               dict(accumulate_grad_batches=1, val_check_interval="00:00:30:00"), dict(accumulate_grad_batches=8),
               dict(accumulate_grad_batches=8, val_check_interval=500, limit_val_batches=0),  # no validation
               dict(accumulate_grad_batches=8, val_check_interval=0.5)):  # a fraction: checked at train start (below)
        check_validation_on_step_boundary(trainer(**ok))
    # The presets validate every 500 optimizer steps, whatever their accumulation.
    for preset in sorted((REPO / "configs").glob("gpt2-*.yaml")):
        t = yaml.safe_load(preset.read_text())["trainer"]
        assert t["val_check_interval"] == 500 * t["accumulate_grad_batches"], preset.name


def _schedule_fit(tmp_path, batches: int, **trainer_kw) -> int:
    """A real tiny fit with `batches` micro-batches per epoch, validation, and FaultTolerance; -> steps trained."""
    import lightning.pytorch as pl

    from gpt2dist.faults import FaultTolerance
    from gpt2dist.model import GPT2Module

    torch.manual_seed(0)
    module = GPT2Module(from_scratch=True, config_overrides={**TINY, "vocab_size": 128}, dropout=0.0, warmup_steps=1)
    ids = torch.randint(0, 128, (batches + 2, 16), generator=torch.Generator().manual_seed(0))
    train = torch.utils.data.DataLoader([{"input_ids": x} for x in ids[:batches]], batch_size=1)
    val = torch.utils.data.DataLoader([{"input_ids": x, "loss_weight": torch.tensor(1.0)} for x in ids[batches:]], batch_size=1)
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=tmp_path,
                         callbacks=[FaultTolerance()], **trainer_kw)
    trainer.fit(module, train, val)
    return trainer.global_step


def test_validation_drifting_into_a_step_across_epochs_is_refused_at_train_start(tmp_path):
    """5 micro-batches an epoch, 2 accumulated: Lightning steps after micro-batches 2, 4 and 5 of each
    epoch, but with check_val_every_n_epoch=null validates every 4 counted across epochs: the second
    validation is micro-batch 3 of epoch 1, inside a step (the presets' schedule on real data)."""
    from gpt2dist.errors import GPT2DistError

    drift = dict(accumulate_grad_batches=2, val_check_interval=4, check_val_every_n_epoch=None, limit_val_batches=1)
    with pytest.raises(GPT2DistError, match=r"^validation every 4 micro-batches .* and 5 micro-batches per epoch per process "
                                            r"reaches micro-batch 3 of epoch 1: validation and its checkpoints fall inside "
                                            r"an optimizer step.*; set trainer.limit_train_batches=4 \(each epoch then "
                                            r"leaves out its last 1 micro-batch\(es\) of 5\)$"):
        _schedule_fit(tmp_path / "a", 5, max_steps=6, **drift)
    assert _schedule_fit(tmp_path / "b", 5, max_steps=6, limit_train_batches=4, **drift) == 6  # the fix trains
    assert _schedule_fit(tmp_path / "c", 5, max_steps=3, **drift) == 3  # one epoch: no drift, not refused
    # max_epochs ends it first (the presets' max_steps, capped at one epoch): refused for epochs it never reaches.
    assert _schedule_fit(tmp_path / "g", 5, max_steps=6, max_epochs=1, **drift) == 3
    # A fraction of an epoch: 0.5 of 10 is every 5 micro-batches, with 4 accumulated.
    with pytest.raises(GPT2DistError, match=r"reaches micro-batch 5 of epoch 0: .*; give a number of micro-batches, a multiple of 4$"):
        _schedule_fit(tmp_path / "d", 10, max_steps=3, accumulate_grad_batches=4, val_check_interval=0.5, limit_val_batches=1)
    # An epoch shorter than one accumulation: the fix said limit_train_batches=0, which trains nothing.
    short = dict(accumulate_grad_batches=4, check_val_every_n_epoch=None, limit_val_batches=1, max_steps=4)
    with pytest.raises(GPT2DistError, match=r"reaches micro-batch 1 of epoch 1: .*; an epoch is less than one optimizer "
                                            r"step, so validate at epoch ends: set trainer.val_check_interval=6 \(a multiple "
                                            r"of 3\), or lower trainer.accumulate_grad_batches to at most 3$"):
        _schedule_fit(tmp_path / "e", 3, val_check_interval=4, **short)
    assert _schedule_fit(tmp_path / "f", 3, val_check_interval=6, **short) == 4  # the fix trains


def test_an_epoch_of_a_data_sized_length_is_trimmed_to_whole_steps_not_refused(tmp_path, corpus_dir, tokenizer_dir):
    """The presets validate every 500 steps counted across epochs, and an epoch is as long as the data makes it:
    WikiText-103 on 8 GPUs was refused at train start about half the time (accumulate 2) or 7 in 8 (XL, 8).
    With gpt2dist's DataModule each epoch now leaves out its last micro-batches (limit_train_batches), and the
    run trains with every step whole: here 5 micro-batches an epoch, 2 accumulated, become 4."""
    import lightning.pytorch as pl

    from gpt2dist.data import TokenBlockDataModule
    from gpt2dist.faults import FaultTolerance
    from gpt2dist.model import GPT2Module

    steps = []

    class Steps(pl.Callback):
        def on_train_batch_end(self, trainer, *args):
            steps.append((trainer.current_epoch, trainer.global_step))

    dm = TokenBlockDataModule(train_files=[str(corpus_dir / "*.txt")], tokenizer=str(tokenizer_dir), block_size=16,
                              batch_size=2, num_workers=0, val_fraction=0.2, cache_dir=str(tmp_path / "cache"))
    module = GPT2Module(from_scratch=True, config_overrides={**TINY}, dropout=0.0, warmup_steps=1)
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=tmp_path, max_steps=6,
                         accumulate_grad_batches=2, val_check_interval=4, check_val_every_n_epoch=None,
                         limit_val_batches=1, limit_train_batches=5, callbacks=[FaultTolerance(), Steps()])
    trainer.fit(module, datamodule=dm)
    assert trainer.limit_train_batches == 4 and trainer.global_step == 6
    # 4 micro-batches an epoch: two whole steps each (the fifth made a one-micro-batch step at every epoch's end).
    assert [s for e, s in steps] == [0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6] and [e for e, s in steps][::4] == [0, 1, 2]


def _best_fit(root: Path, max_steps: int, ckpt_path: str | None = None):
    """An in-process fit, as the CLI checkpoints: a step file every step (written at the batch's end,
    like a SIGTERM or requeue save) and a best-by-val/loss file (written at validation's end). Validation
    runs every step, gives val/loss {1: 1.0, 2: 0.5, 3: 0.8} and draws from the global RNG."""
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import ModelCheckpoint

    from gpt2dist.faults import FaultTolerance

    from conftest import linear_module

    val = {1: 1.0, 2: 0.5, 3: 0.8}

    def val_loss(module, batch):
        torch.rand(3)  # validation's own draws must never reach training's stream
        return val[module.trainer.global_step]

    best = ModelCheckpoint(dirpath=root, filename="best-{step}", monitor="val/loss", mode="min", save_top_k=1)
    callbacks = [FaultTolerance(), best, ModelCheckpoint(dirpath=root, filename="{step}", monitor="step", mode="max",
                                                         every_n_train_steps=1, save_top_k=-1)]
    trainer = pl.Trainer(accelerator="cpu", max_steps=max_steps, val_check_interval=1, check_val_every_n_epoch=None,
                         limit_val_batches=1, num_sanity_val_steps=0, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=root, callbacks=callbacks)
    torch.manual_seed(0)
    data = torch.utils.data.DataLoader(torch.randn(10, 2, generator=torch.Generator().manual_seed(0)), batch_size=1)
    trainer.fit(linear_module(val_loss), data, data, ckpt_path=ckpt_path)
    return best


def _saved_torch_rng(path: str) -> list[torch.Tensor]:
    """Each rank's torch RNG state in a checkpoint's FaultTolerance state (the one dropout draws from)."""
    states = torch.load(path, weights_only=True)["callbacks"]
    return [rank["torch"] for rank in next(s["rng"] for s in states.values() if "rng" in s)]


def test_a_resume_before_a_validation_offers_it_to_the_best_checkpoint_with_trainings_rng(tmp_path):
    """A step file is written before that step's validation; resumed from it, FaultTolerance redoes the
    validation. Every checkpoint callback was told the step was already saved, so that validation never
    reached best-by-val/loss: best was step 3 (0.8), not step 2 (0.5). And a save there stored the RNG
    validation had drawn from, not training's (the step file's)."""
    ref = _best_fit(tmp_path / "ref", 3)
    assert Path(ref.best_model_path).name == "best-step=2.ckpt" and float(ref.best_model_score) == 0.5
    (tmp_path / "res").mkdir()
    step2 = tmp_path / "res" / "step=2.ckpt"
    shutil.copy(tmp_path / "ref" / "step=2.ckpt", step2)
    res = _best_fit(tmp_path / "res", 3, str(step2))
    assert Path(res.best_model_path).name == "best-step=2.ckpt" and float(res.best_model_score) == 0.5
    (saved,), (ref_saved,), (trained,) = map(_saved_torch_rng, (res.best_model_path, ref.best_model_path, step2))
    assert torch.equal(saved, trained) and torch.equal(ref_saved, trained)
    assert not (tmp_path / "res" / "step=2-v1.ckpt").exists()  # the step file itself is not written again


def test_a_second_fit_with_the_same_fault_tolerance_follows_its_own_seed():
    """Python API: the callback kept the previous fit's training RNG and restored it at the new fit's first
    batch, overriding seed_everything (and carried its skip counters over)."""
    import lightning.pytorch as pl

    from gpt2dist.faults import FaultTolerance

    class Draws(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer, self.draws = torch.nn.Linear(2, 1), []

        def training_step(self, batch, i):
            self.draws.append(torch.rand(1).item())  # what dropout would draw
            return self.layer(batch).pow(2).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    guard, runs = FaultTolerance(), []
    for _ in range(2):
        pl.seed_everything(7)
        trainer = pl.Trainer(accelerator="cpu", max_steps=3, logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False, callbacks=[guard])
        module = Draws()
        trainer.fit(module, torch.utils.data.DataLoader(torch.randn(8, 2), batch_size=1))
        runs.append(module.draws)
    assert runs[0] == runs[1] and len(runs[0]) == 3


def test_resuming_at_an_epoch_end_does_not_save_that_step_again(tmp_path):
    """A checkpoint callback that saves at epoch ends (Lightning's default schedule: validation once per
    epoch) must still be told the resumed step is saved: extended from the end-of-fit last.ckpt, the
    resumed loop reaches that epoch's end again and wrote step=4-v1.ckpt, which took a top-k slot."""
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import ModelCheckpoint

    from conftest import linear_module
    from gpt2dist.faults import FaultTolerance

    def fit(max_steps: int, ckpt_path=None):
        steps = ModelCheckpoint(dirpath=tmp_path, filename="{step}", monitor="step", mode="max", save_top_k=3,
                                save_last=True)
        trainer = pl.Trainer(accelerator="cpu", max_steps=max_steps, limit_val_batches=1, num_sanity_val_steps=0,
                             logger=False, enable_progress_bar=False, enable_model_summary=False,
                             default_root_dir=tmp_path, callbacks=[FaultTolerance(), steps])
        data = torch.utils.data.DataLoader(torch.randn(4, 2, generator=torch.Generator().manual_seed(0)), batch_size=1)
        trainer.fit(linear_module(), data, data, ckpt_path=ckpt_path)
        return trainer

    first = fit(4)
    assert first.checkpoint_callbacks[0]._should_save_on_train_epoch_end(first)  # the schedule this test is about
    fit(12, str(tmp_path / "last.ckpt"))
    assert sorted(p.name for p in tmp_path.glob("*.ckpt")) == ["last.ckpt", "step=12.ckpt", "step=4.ckpt", "step=8.ckpt"]


def test_hpc_checkpoint_temporaries_never_look_like_hpc_checkpoints_to_lightning(tmp_path, monkeypatch):
    """Lightning takes any name holding "hpc_ckpt_" for a requeue checkpoint and joins its digits: a job
    killed while saving hpc_ckpt_1 left .hpc_ckpt_1.ckpt.tmp-4242, read as hpc_ckpt_14242.ckpt, a file
    that does not exist (the requeued job crashed loading it; the next save was numbered 14243)."""
    import lightning.pytorch as pl
    from lightning.fabric.plugins.environments import SLURMEnvironment
    from lightning.pytorch.trainer.states import TrainerFn

    from gpt2dist.faults import AtomicCheckpointIO, remove_stale_hpc_temporaries

    monkeypatch.setattr(SLURMEnvironment, "detect", staticmethod(lambda: True))
    trainer = pl.Trainer(default_root_dir=tmp_path, accelerator="cpu", logger=False)
    connector = trainer._checkpoint_connector
    (tmp_path / ".hpc_ckpt_1.ckpt.tmp-4242").write_bytes(b"partial")  # left by a killed save (old name)
    (tmp_path / ".hpc_ckpt_2.ckpt.tmp").mkdir()  # a sharded save's folder (old name)
    assert connector._parse_ckpt_path(TrainerFn.FITTING, None, True, True).endswith("hpc_ckpt_14242.ckpt")
    remove_stale_hpc_temporaries(tmp_path)
    assert connector._parse_ckpt_path(TrainerFn.FITTING, None, True, True) is None
    assert connector.hpc_save_path(str(tmp_path)).endswith("/hpc_ckpt_1.ckpt") and not list(tmp_path.iterdir())
    seen = []
    real = os.replace
    monkeypatch.setattr(os, "replace", lambda s, d: (seen.append(Path(s).name), real(s, d)))
    AtomicCheckpointIO().save_checkpoint({"w": torch.ones(1)}, tmp_path / "hpc_ckpt_1.ckpt")
    assert seen == [f".hpc-ckpt-1.ckpt.tmp-{os.getpid()}"] and "hpc_ckpt_" not in seen[0]


def test_a_second_fit_in_a_running_fits_folder_stops_with_one_line_and_touches_nothing(tmp, corpus_dir, tokenizer_dir):
    """The same job submitted twice: the second fit would set the first's checkpoints aside (it starts
    behind them), overwrite its config and last.ckpt, and a resume of either would take the other's
    steps. It stops before touching the folder, naming the fit that holds it; the first finishes."""
    import threading
    import time

    config = write_config(tmp, corpus_dir, tokenizer_dir, "two_fits")
    root = run_dir(config)
    gate = root.parent / "two_fits.gate"
    first: dict = {}
    wait = overlay(root, {"class_path": "fault_plugins.WaitAtTrainStart", "init_args": {"path": str(gate)}})
    thread = threading.Thread(target=lambda: first.update(p=cli(config, "--config", str(wait))))
    thread.start()
    try:
        deadline = time.monotonic() + 240
        while not Path(str(gate) + ".reached").exists() and thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert Path(str(gate) + ".reached").exists(), first.get("p") and first["p"].stderr[-3000:]
        before = {p.relative_to(root): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}
        second = cli(config)
        assert second.returncode == 2, second.stderr[-3000:]
        [line] = [l for l in second.stderr.splitlines() if l.startswith("gpt2dist: error:")]
        assert line.startswith(f"gpt2dist: error: run folder {root.resolve()} is in use by another fit (pid "), line
        assert {p.relative_to(root): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()} == before
    finally:
        gate.touch()
        thread.join()
    ok(first["p"])
    assert (root / "hf_model").is_dir() and torch.load(root / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == STEPS
    ok(cli(config, "--ckpt_path", "last"))  # the folder is free again: nothing left to train, and it says so


def test_a_deferred_save_of_a_validation_metric_waits_for_the_validation():
    """Lightning defers an interval save at an epoch's last batch. gpt2dist saves the step checkpoint's (`step`)
    there itself; a callback monitoring a validation metric waited for that validation before, and waits still:
    saved here, it ranked the previous validation's value and lost the fresh one."""
    from types import SimpleNamespace

    from lightning.pytorch.callbacks import ModelCheckpoint

    from gpt2dist.faults import save_deferred_interval_checkpoints

    cb = ModelCheckpoint(monitor="val/loss", every_n_train_steps=4)
    cb._defer_save_until_validation = True

    class Untouchable(SimpleNamespace):  # any look at the trainer's state would be a save being considered
        def __getattr__(self, name):
            raise AssertionError(f"trainer.{name} read for a val/loss callback")

    save_deferred_interval_checkpoints(Untouchable(checkpoint_callbacks=[cb]))
    assert cb._defer_save_until_validation
