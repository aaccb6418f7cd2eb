"""slurm/fit.sbatch and slurm/submit.sh on a real local SLURM cluster (tests/slurm_cluster.py): multi-node
fits, preemption with exact resume, and bad submissions refused before queueing.

Needs root and Debian's slurmctld/slurmd/slurm-client/munge (`.ci/run` installs them). Without them
these tests skip, except under CI=true, where they fail.
"""

from __future__ import annotations

import csv
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from conftest import REPO, TINY
from slurm_cluster import SlurmCluster, missing_programs

MAX_STEPS = 60


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    missing = missing_programs()
    why = ("not root" if os.geteuid() != 0 else "") or (f"missing {', '.join(missing)}" if missing else "")
    if why:
        msg = f"no local SLURM cluster ({why}); apt-get install slurmctld slurmd slurm-client munge as root"
        if os.environ.get("CI"):
            pytest.fail(f"CI=true: {msg}")
        pytest.skip(msg)
    # Not under pytest's tmp root: that is 0700 and munged (user munge) must reach its socket.
    root = Path(tempfile.mkdtemp(prefix="gpt2dist-slurm-"))
    cluster = SlurmCluster(root)
    try:
        yield cluster.start()
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


def write_config(d: Path, corpus_dir: Path, tokenizer_dir: Path, **trainer) -> Path:
    """A tiny GPT-2 run, slow enough (60 steps) that a signal lands mid-training."""
    cfg = {
        "seed_everything": 3,
        "trainer": {
            "accelerator": "cpu", "max_steps": MAX_STEPS, "val_check_interval": 10, "check_val_every_n_epoch": None,
            "limit_val_batches": 2, "log_every_n_steps": 1, "enable_progress_bar": False,
            "accumulate_grad_batches": 2, "default_root_dir": str(d / "run"),
            "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger",
                       "init_args": {"save_dir": str(d / "run"), "name": "logs"}},
            **trainer,
        },
        "model": {"from_scratch": True, "config_overrides": {**TINY, "vocab_size": 512}, "dropout": 0.0,
                  "lr": 1e-3, "warmup_steps": 5},
        "data": {"train_files": [str(corpus_dir / "*.txt")], "tokenizer": str(tokenizer_dir), "block_size": 32,
                 "batch_size": 4, "num_workers": 0, "val_fraction": 0.2, "cache_dir": str(d.parent / "cache")},
        "export": {"sample_prompt": None},
        "samples": {"sample_every_n_steps": 0},
    }
    path = d / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def submit(slurm: SlurmCluster, cwd: Path, *args: str, env: dict | None = None) -> "subprocess.CompletedProcess":  # noqa: F821
    env = {"PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "PYTHON": sys.executable,
           "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1", "WANDB_MODE": "offline",
           "MASTER_ADDR": "127.0.0.1", **(env or {})}  # emulated node names do not resolve
    return slurm.run(str(REPO / "slurm" / "submit.sh"), "--cpus-per-task", "1", *args, check=False, env=env, cwd=cwd,
                     timeout=120)


def job_log(cwd: Path, job_id: str) -> list[Path]:
    return sorted(cwd.glob(f"*{job_id}*.out"))


def train_losses(run: Path, version: int | None = None) -> dict[int, str]:
    """step -> train/loss as written (a string: compared exactly) from one CSVLogger version folder."""
    versions = sorted(run.glob("logs/version_*"), key=lambda p: int(p.name[8:]))
    folder = versions[-1] if version is None else run / "logs" / f"version_{version}"
    return {int(r["step"]): r["train/loss"] for r in csv.DictReader((folder / "metrics.csv").open()) if r.get("train/loss")}


def val_losses(run: Path) -> list[tuple[int, str]]:
    """(step, val/loss as written) of every validation, over all CSVLogger version folders in order."""
    rows = []
    for folder in sorted(run.glob("logs/version_*"), key=lambda p: int(p.name[8:])):
        rows += [(int(r["step"]), r["val/loss"]) for r in csv.DictReader((folder / "metrics.csv").open()) if r.get("val/loss")]
    return rows


def submit_and_wait(slurm, d: Path, cfg: Path, *layout: str) -> tuple[str, str, str]:
    """Submit on CPU (no GPUs) with `layout`, wait for COMPLETED: (job id, job log, submit.sh stderr)."""
    r = submit(slurm, d, "--gpus-per-node", "0", *layout, "--config", str(cfg))
    assert r.returncode == 0, r.stderr
    job_id = r.stdout.strip()
    j = slurm.wait_job(job_id, timeout=300)
    logs = job_log(d, job_id)
    text = logs[0].read_text() if logs else ""
    assert j["JobState"] == "COMPLETED", text[-4000:]
    return job_id, text, r.stderr


@pytest.fixture(scope="module")
def reference(slurm, tmp_path_factory, corpus_dir, tokenizer_dir):
    """An uninterrupted 2 nodes x 1 task run: the test below and the preemption test's reference."""
    d = tmp_path_factory.mktemp("slurm_ref") / "job"
    d.mkdir()
    cfg = write_config(d, corpus_dir, tokenizer_dir)
    job_id, text, submit_err = submit_and_wait(slurm, d, cfg, "--nodes", "2", "--tasks-per-node", "1")
    return d, job_id, text, submit_err


def test_a_config_with_ckpt_path_null_still_resumes_the_run(reference, slurm, tmp_path):
    """Every `gpt2dist fit --print_config` dump holds `ckpt_path: null`. fit.sbatch passed `--ckpt_path auto`
    before the user's arguments, so such a config file replaced it: a resubmitted job, or one requeued
    with no hpc_ckpt_* (SIGTERM preemption, node failure, scontrol requeue), started over and set the run's
    checkpoints aside. The script's default is now GPT2DIST_DEFAULT_CKPT_PATH=auto, which only an actual
    ckpt_path replaces."""
    ref_dir = reference[0]
    d = tmp_path / "job"
    d.mkdir()
    shutil.copytree(ref_dir / "run" / "checkpoints", d / "run" / "checkpoints")
    cfg = yaml.safe_load((ref_dir / "config.yaml").read_text())
    cfg["ckpt_path"] = None  # as --print_config writes it
    cfg["trainer"].update(max_steps=MAX_STEPS + 2, default_root_dir=str(d / "run"))
    cfg["trainer"]["logger"]["init_args"]["save_dir"] = str(d / "run")
    (d / "config.yaml").write_text(yaml.safe_dump(cfg))
    _, text, _ = submit_and_wait(slurm, d, d / "config.yaml", "--nodes", "1", "--tasks-per-node", "1")
    m = re.search(r"resume: (\S+) \(global_step (\d+), \d+ batches seen\) chosen by --ckpt_path auto", text)
    assert m and Path(m.group(1)).parent == d / "run" / "checkpoints" and int(m.group(2)) == MAX_STEPS, text[-4000:]
    assert sorted(train_losses(d / "run")) == [MAX_STEPS, MAX_STEPS + 1]  # 2 more steps, not a fresh run
    assert not list((d / "run" / "checkpoints").glob("set-aside-*"))


@pytest.mark.parametrize("layout", ["2x1", "1x2"])
def test_fit_sbatch_runs_multi_process(layout, reference, slurm, tmp_path, corpus_dir, tokenizer_dir):
    if layout == "2x1":
        d, job_id, text, submit_err = reference
    else:
        d = tmp_path
        cfg = write_config(d, corpus_dir, tokenizer_dir, max_steps=6)
        job_id, text, submit_err = submit_and_wait(slurm, d, cfg, "--nodes", "1", "--tasks-per-node", "2")
    nodes, tasks = map(int, layout.split("x"))
    # submit.sh printed the batch arithmetic: 4 seqs x 2 accum x 2 processes = 16 seqs x 32 tokens.
    assert f"= 16 seqs x 32 tokens = 512 tokens/step" in submit_err
    assert f"{nodes} node(s) x {tasks} task(s)" in text
    assert "cluster environment: SLURMEnvironment" in text
    # One task tokenized (the prepare step) and the fit's processes only read its cache, one per node.
    assert len(re.findall(r"^gpt2dist prepare: (prepared in|found in the cache)", text, re.M)) == 1, text[-4000:]
    found = "gpt2dist prepare: found in the cache" in text  # an earlier test's run filled the shared cache
    assert text.count("using cached blocks") == nodes + found, text[-4000:]
    assert "optimizer steps of 4 seqs x 2 accum x 2 process(es) = 16 seqs x 32 tokens = 512 tokens/step" in text  # the job's world
    # Both ranks joined one process group of 2 (Lightning prints one line per rank).
    assert "GLOBAL_RANK: 0, MEMBER: 1/2" in text and "GLOBAL_RANK: 1, MEMBER: 2/2" in text
    assert (d / "run" / "checkpoints" / "last.ckpt").is_file()
    assert (d / "run" / "hf_model" / "model.safetensors").is_file()
    assert len(job_log(d, job_id)) == 1


def test_eval_sbatch_tests_and_predicts_on_two_nodes_as_one_process(reference, slurm, tmp_path):
    """slurm/eval.sbatch `test` and `predict` on 2 nodes x 1 task, from the reference fit's last.ckpt: the
    loss line and the predictions file one process gives. A first argument that is not a subcommand stops
    the job at once (exit 2), before any srun."""
    from conftest import run_cli

    d, _, _, _ = reference
    ckpt = d / "run" / "checkpoints" / "last.ckpt"
    prompts = '["def ", "import os", "x"]'
    common = ["--config", str(d / "config.yaml"), "--ckpt_path", str(ckpt), "--trainer.logger", "false",
              "--data.predict_prompts", prompts, "--model.max_new_tokens", "6"]
    env = {"PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "PYTHONPATH": str(REPO),
           "PYTHONUNBUFFERED": "1", "MASTER_ADDR": "127.0.0.1"}
    layout = ["--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=0", "--cpus-per-task=1"]
    sbatch = ["sbatch", "--parsable", *layout, str(REPO / "slurm" / "eval.sbatch")]
    # predict needs no training data (README): the job runs without it, and has no prepare step to refuse it.
    extra = {"predict": ["--data.train_files", "null"]}
    jobs = {sub: slurm.run(*sbatch, sub, *common, *extra.get(sub, []), "--trainer.default_root_dir", str(tmp_path / sub),
                           env=env, cwd=tmp_path).stdout.strip() for sub in ("test", "predict", "fit")}
    texts = {}
    for sub, job_id in jobs.items():
        j = slurm.wait_job(job_id, timeout=300)
        texts[sub] = job_log(tmp_path, job_id)[0].read_text()
        want = ("FAILED", "2:0") if sub == "fit" else ("COMPLETED", "0:0")
        assert (j["JobState"], j["ExitCode"]) == want, texts[sub][-4000:]
    assert "eval.sbatch: error: the first argument must be validate, test or predict (got 'fit')" in texts["fit"]
    assert "MEMBER:" not in texts["fit"] and "gpt2dist prepare" not in texts["fit"]
    assert "gpt2dist prepare" in texts["test"] and "gpt2dist prepare" not in texts["predict"]
    for sub in ("test", "predict"):
        assert "GLOBAL_RANK: 0, MEMBER: 1/2" in texts[sub] and "GLOBAL_RANK: 1, MEMBER: 2/2" in texts[sub], texts[sub][-4000:]
        one = run_cli(sub, *common, "--trainer.default_root_dir", str(tmp_path / f"{sub}-single"), "--trainer.devices", "1")
        # (the single-process predict keeps the training data: the same predictions either way)
        assert one.returncode == 0, one.stderr[-3000:]
        if sub == "test":
            report = f"test {ckpt} (step {MAX_STEPS})  test/loss "  # the one-line report: checkpoint, step, loss

            def loss(text: str) -> float:
                [line] = [x for x in text.splitlines() if x.startswith(report)]
                return float(line[len(report):].split()[0])
            assert loss(texts[sub]) == pytest.approx(loss(one.stdout), abs=2e-4), texts[sub][-3000:]  # 4 decimals
        else:
            single = (tmp_path / "predict-single" / "predictions.jsonl").read_text()
            assert (tmp_path / "predict" / "predictions.jsonl").read_text() == single and single.count("\n") == 3


def test_preempted_job_requeues_and_resumes_exactly(reference, slurm, tmp_path_factory, corpus_dir, tokenizer_dir):
    ref_dir, _, _, _ = reference
    d = tmp_path_factory.mktemp("slurm_preempt") / "job"
    d.mkdir()
    # CSV for the loss comparison, plus W&B (offline) to check the requeued job continues the same run.
    loggers = [{"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(d / "run"), "name": "logs"}},
               {"class_path": "lightning.pytorch.loggers.WandbLogger",
                "init_args": {"save_dir": str(d / "run"), "project": "gpt2dist-test", "offline": True}}]
    cfg = write_config(d, corpus_dir, tokenizer_dir, logger=loggers)
    r = submit(slurm, d, "--nodes", "2", "--gpus-per-node", "0", "--tasks-per-node", "1", "--config", str(cfg))
    assert r.returncode == 0, r.stderr
    job_id = r.stdout.strip()

    # Wait until training runs (the first validation line, at step 10), then preempt like SLURM does.
    wait_for_step(slurm, d, job_id, 10)
    slurm.run("scancel", "--signal=USR1", job_id)
    # Requeued: pending again with a begin time ~2 min out; start it now.
    slurm.wait_job(job_id, until=lambda j: j.get("JobState") == "PENDING" and int(j.get("Restarts", 0)) >= 1,
                   timeout=120)
    slurm.run("scontrol", "update", f"JobId={job_id}", "StartTime=now")
    j = slurm.wait_job(job_id, timeout=300)
    logs = job_log(d, job_id)
    assert len(logs) == 1, logs  # --open-mode=append: both runs in one file
    text = logs[0].read_text()
    assert j["JobState"] == "COMPLETED", text[-4000:]
    assert f"job {job_id} restart 0" in text and f"job {job_id} restart 1" in text

    run = d / "run"
    hpc = sorted(run.glob("hpc_ckpt_*.ckpt"))
    assert [p.name for p in hpc] == ["hpc_ckpt_1.ckpt"]
    m = re.search(r"resume: (\S+) \(global_step (\d+),", text)
    assert m and Path(m.group(1)) == hpc[0], text[-4000:]
    resumed_at = int(m.group(2))
    assert 10 <= resumed_at < MAX_STEPS
    # The resumed run continued from that step to max_steps, with the uninterrupted run's losses.
    ref = train_losses(ref_dir / "run")
    after = train_losses(run)
    assert sorted(after) == list(range(resumed_at, MAX_STEPS)), sorted(after)
    assert {s: ref[s] for s in after} == after
    # Validation every 10 steps, as uninterrupted: none off schedule at the requeue (Lightning validated
    # on any stop request, inside SLURM's warning window), none lost at a requeue on a validation step.
    assert val_losses(run) == val_losses(ref_dir / "run")
    assert (run / "hf_model" / "model.safetensors").is_file()
    # Both runs of the job wrote to the same W&B run: id slurm-<job id>-<run folder hash>, kept
    # through the checkpoint.
    wandb_runs = sorted((run / "wandb").glob("offline-run-*"))
    ids = {re.sub(r"^offline-run-\d{8}_\d{6}-", "", p.name) for p in wandb_runs}
    assert len(wandb_runs) == 2 and len(ids) == 1 and re.fullmatch(rf"slurm-{job_id}-[0-9a-f]{{8}}", ids.pop()), wandb_runs


def test_two_runs_in_one_job_are_two_wandb_runs(slurm, tmp_path, corpus_dir, tokenizer_dir):
    """A job script that trains two configs one after the other (srun per run): the job id alone would
    make the second W&B run resume the first (resume="allow"), its steps starting over at 0. So would
    a fresh rerun of the first config in its own folder: a third W&B run."""
    cfgs = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        loggers = [{"class_path": "lightning.pytorch.loggers.WandbLogger",
                    "init_args": {"save_dir": str(tmp_path / name / "run"), "project": "gpt2dist-test", "offline": True}}]
        cfgs.append(write_config(tmp_path / name, corpus_dir, tokenizer_dir, max_steps=2, logger=loggers))
    script = tmp_path / "two.sbatch"
    script.write_text("#!/bin/bash\n#SBATCH --nodes=1 --ntasks-per-node=1 --cpus-per-task=1 --output=two-%j.out\n" + "".join(
        f"srun {sys.executable} -m gpt2dist fit --config {c} --trainer.num_nodes 1 --trainer.devices 1\n"
        for c in [*cfgs, cfgs[0]]))
    env = {"PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1", "WANDB_MODE": "offline", "MASTER_ADDR": "127.0.0.1"}
    job_id = slurm.run("sbatch", "--parsable", str(script), env=env, cwd=tmp_path).stdout.strip()
    j = slurm.wait_job(job_id, timeout=300)
    assert j["JobState"] == "COMPLETED", (tmp_path / f"two-{job_id}.out").read_text()[-4000:]
    ids = {name: sorted(re.sub(r"^offline-run-\d{8}_\d{6}-", "", p.name)
                        for p in (tmp_path / name / "run" / "wandb").glob("offline-run-*")) for name in ("a", "b")}
    (a, rerun), (b,) = ids["a"], ids["b"]
    assert re.fullmatch(rf"slurm-{job_id}-[0-9a-f]{{8}}", a) and rerun == f"{a}-r1", ids
    assert re.fullmatch(rf"slurm-{job_id}-[0-9a-f]{{8}}", b) and b != a, ids


def wait_for_step(slurm, d: Path, job_id: str, step: int, timeout: float = 240) -> None:
    """Until the job log shows the validation line of `step` (training runs)."""
    end = time.monotonic() + timeout
    while not any(re.search(rf"^step +{step} ", p.read_text(), re.M) for p in job_log(d, job_id)):
        assert slurm.job(job_id).get("JobState") in ("PENDING", "RUNNING"), job_log(d, job_id)
        assert time.monotonic() < end, "training did not start"
        time.sleep(0.2)


def test_preempted_job_that_cannot_requeue_fails_naming_its_checkpoint(slurm, tmp_path, corpus_dir, tokenizer_dir):
    """A job SLURM will not requeue (--no-requeue, or requeue disabled): Lightning only warned, and the
    job ended COMPLETED with exit 0 at the preemption step, so `afterok` dependents ran on a half-trained model."""
    cfg = write_config(tmp_path, corpus_dir, tokenizer_dir)
    r = submit(slurm, tmp_path, "--nodes", "1", "--gpus-per-node", "0", "--tasks-per-node", "1", "--config", str(cfg),
               env={"SBATCH_NO_REQUEUE": "1"})
    assert r.returncode == 0, r.stderr
    job_id = r.stdout.strip()
    wait_for_step(slurm, tmp_path, job_id, 10)
    slurm.run("scancel", "--signal=USR1", job_id)
    j = slurm.wait_job(job_id, timeout=120)
    text = job_log(tmp_path, job_id)[0].read_text()
    assert (j["JobState"], j["ExitCode"]) == ("FAILED", "138:0"), text[-4000:]
    errors = [line for line in text.splitlines() if line.startswith("gpt2dist: error:")]
    hpc = tmp_path / "run" / "hpc_ckpt_1.ckpt"
    assert len(errors) == 1 and f"saved {hpc}, but `scontrol requeue {job_id}` failed" in errors[0], text[-4000:]
    assert "submit the same command again" in errors[0] and "Traceback" not in text
    assert hpc.is_file() and not (tmp_path / "run" / "hf_model").exists()


def test_sigterm_stops_a_multi_node_job_instead_of_hanging(slurm, tmp_path, corpus_dir, tokenizer_dir):
    """SIGTERM (scancel, a time limit without the USR1 warning, preemption by signal) on 2 nodes:
    Lightning's handler ran a broadcast inside the signal handler, which met the other rank's
    all_reduce, and the job hung until killed. Every rank must stop at a batch boundary, exit 143."""
    cfg = write_config(tmp_path, corpus_dir, tokenizer_dir)
    r = submit(slurm, tmp_path, "--nodes", "2", "--gpus-per-node", "0", "--tasks-per-node", "1", "--config", str(cfg))
    assert r.returncode == 0, r.stderr
    job_id = r.stdout.strip()
    wait_for_step(slurm, tmp_path, job_id, 10)
    slurm.run("scancel", "--signal=TERM", job_id)  # the signal only: nothing kills a rank that ignores it
    j = slurm.wait_job(job_id, timeout=90)
    text = job_log(tmp_path, job_id)[0].read_text()
    assert (j["JobState"], j["ExitCode"]) == ("FAILED", "143:0"), text[-4000:]
    assert text.count("gpt2dist: error: stopped by SIGTERM before the end") == 2, text[-4000:]  # both ranks
    assert "Traceback" not in text


def test_job_array_tasks_get_their_own_run_folders(slurm, tmp_path, corpus_dir, tokenizer_dir):
    """sbatch --array: each task is a run. Without a per-task folder the tasks trained into one folder
    at once (last.ckpt and last-v1.ckpt, one hf_model overwritten); "%a" gives each task its own."""
    cfg = write_config(tmp_path, corpus_dir, tokenizer_dir, max_steps=2)
    env = {"PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "PYTHONPATH": str(REPO),
           "PYTHONUNBUFFERED": "1", "WANDB_MODE": "offline", "MASTER_ADDR": "127.0.0.1"}
    layout = ["--array=0-1", "--nodes=1", "--ntasks-per-node=1", "--gpus-per-node=0", "--cpus-per-task=1"]
    sbatch = [str(REPO / "slurm" / "fit.sbatch"), "--config", str(cfg)]
    same = slurm.run("sbatch", "--parsable", *layout, *sbatch, env=env, cwd=tmp_path).stdout.strip()
    own = slurm.run("sbatch", "--parsable", *layout, *sbatch, "--trainer.default_root_dir", str(tmp_path / "run-%a"),
                    "--trainer.logger.init_args.save_dir", str(tmp_path / "run-%a"), env=env, cwd=tmp_path).stdout.strip()
    for task in ("0", "1"):
        j = slurm.wait_job(f"{same}_{task}", timeout=120)
        text = job_log(tmp_path, j["JobId"])[0].read_text()
        assert (j["JobState"], j["ExitCode"]) == ("FAILED", "2:0"), text[-4000:]
        assert f"fit.sbatch: error: array task {task} of job {same} has the same arguments" in text
        j = slurm.wait_job(f"{own}_{task}", timeout=300)
        text = job_log(tmp_path, j["JobId"])[0].read_text()
        assert j["JobState"] == "COMPLETED", text[-4000:]
        run = tmp_path / f"run-{task}"
        assert sorted(p.name for p in (run / "checkpoints").glob("last*.ckpt")) == ["last.ckpt"], text[-4000:]
        assert [p.name for p in (run / "logs").iterdir()] == ["version_0"]
    assert not (tmp_path / "run").exists()


def test_a_job_submitted_from_inside_another_is_its_own_job(slurm, tmp_path):
    """sbatch copies the submitting shell's environment: a job submitted from an array task or a requeued job
    (a pipeline's next stage) kept SLURM_ARRAY_JOB_ID/TASK_ID and SLURM_RESTART_COUNT, which SLURM sets only
    where they apply. fit.sbatch refused it as an array task, its preemption requeued the parent, a first start
    read as a requeue. fit.sbatch now asks scontrol, whose record this reads as real SLURM writes it. A stub
    `gpt2dist` records what the steps get."""
    stub = tmp_path / "stub.sh"
    stub.write_text('#!/bin/bash\necho "$1 array=${SLURM_ARRAY_JOB_ID:-}_${SLURM_ARRAY_TASK_ID:-} '
                    'restarts=${SLURM_RESTART_COUNT:-}" >> "$(dirname "$0")/seen-$SLURM_JOB_ID"\n')
    stub.chmod(0o755)
    env = {"GPT2DIST_CMD": str(stub), "SLURM_ARRAY_JOB_ID": "99", "SLURM_ARRAY_TASK_ID": "3", "SLURM_RESTART_COUNT": "2"}
    layout = ["--nodes=1", "--ntasks-per-node=1", "--gpus-per-node=0", "--cpus-per-task=1"]
    plain = slurm.run("sbatch", "--parsable", *layout, str(REPO / "slurm/fit.sbatch"), "--config", "x.yaml", env=env,
                      cwd=tmp_path).stdout.strip()
    array = slurm.run("sbatch", "--parsable", "--array=1", *layout, str(REPO / "slurm/fit.sbatch"), "--config", "x-%a.yaml",
                      env=env, cwd=tmp_path).stdout.strip()
    j = slurm.wait_job(plain, timeout=120)
    assert j["JobState"] == "COMPLETED", job_log(tmp_path, plain)[0].read_text()[-2000:]
    assert (tmp_path / f"seen-{plain}").read_text().splitlines() == ["prepare array=_ restarts=0", "fit array=_ restarts=0"]
    j = slurm.wait_job(f"{array}_1", timeout=120)
    assert j["JobState"] == "COMPLETED", job_log(tmp_path, j["JobId"])[0].read_text()[-2000:]
    assert (tmp_path / f"seen-{j['JobId']}").read_text().splitlines() == [
        f"prepare array={array}_1 restarts=0", f"fit array={array}_1 restarts=0"]


def test_bad_data_fails_the_job_once_before_training_starts(slurm, tmp_path, corpus_dir, tokenizer_dir):
    """An empty corpus on 2 nodes: the job's prepare step stops it with one error line, not one per rank,
    and no training process starts."""
    (tmp_path / "empty.txt").write_text("")
    cfg = write_config(tmp_path, corpus_dir, tokenizer_dir)
    r = submit(slurm, tmp_path, "--nodes", "2", "--gpus-per-node", "0", "--tasks-per-node", "1", "--config", str(cfg),
               "--data.train_files", f"[{tmp_path / 'empty.txt'}]")
    assert r.returncode == 0, r.stderr
    j = slurm.wait_job(r.stdout.strip(), timeout=120)
    text = job_log(tmp_path, r.stdout.strip())[0].read_text()
    assert (j["JobState"], j["ExitCode"]) == ("FAILED", "2:0"), text[-4000:]
    errors = [line for line in text.splitlines() if line.startswith("gpt2dist: error:")]
    assert len(errors) == 1 and "empty corpus" in errors[0], text[-4000:]
    assert "MEMBER:" not in text and "Traceback" not in text


def test_bad_submissions_fail_before_queueing(slurm, tmp_path, corpus_dir, tokenizer_dir):
    cfg = write_config(tmp_path, corpus_dir, tokenizer_dir, num_nodes=1, devices=1)
    cases = [
        (["--config", str(tmp_path / "missing.yaml")], f"config file '{tmp_path / 'missing.yaml'}' does not exist"),
        (["--config", str(cfg)], "sets trainer.num_nodes=1 but the job asks for --nodes 2"),
        (["--config", str(cfg), "--trainer.num_nodes", "2"], "sets trainer.devices=1 but the job runs 2 task(s) per node"),
        (["--gpus-per-node", "0", "--config", str(cfg)], "--gpus-per-node 0 (CPU) needs --tasks-per-node N"),
    ]
    before = slurm.run("squeue", "-h", "-o", "%i").stdout.split()
    for args, needle in cases:
        r = submit(slurm, tmp_path, "--nodes", "2", "--gpus-per-node", "2", *args)
        assert r.returncode == 2, (args, r.stdout, r.stderr)
        assert needle in r.stderr and "Traceback" not in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert slurm.run("squeue", "-h", "-o", "%i").stdout.split() == before
    assert not list(tmp_path.glob("*.out"))
