"""gpt2dist/tracking.py + the W&B overlay: a real offline run read back with W&B's own reader,
resume into the same run, the same metric names without wandb, and no secret in any file."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch

from gpt2dist.tracking import REDACTED, resolve_run_id, scrub

from conftest import REPO, each_row_two_at_a_time, row_result, run_cli
from run_fixtures import SECRET, csv_run, fit_args, inspect, wandb_resumed, wandb_run  # noqa: F401 (fixtures)

METRICS = ["train/loss", "val/loss", "val/ppl", "lr", "train/grad_norm",
           "throughput/tokens_per_sec", "throughput/tokens_per_sec_per_device"]


def test_scrub_redacts_secret_keys_and_env_values():
    cfg = {"model": {"max_new_tokens": 8, "lr": 1e-3}, "api_key": "abc", "hf_token": "x",
           "logger": {"init_args": {"notes": f"key={SECRET}", "tags": ["a", SECRET]}}, "tokenizer": "gpt2"}
    out = scrub(cfg, secrets=[SECRET])
    assert out["api_key"] == REDACTED and out["hf_token"] == REDACTED
    assert out["logger"]["init_args"] == {"notes": REDACTED, "tags": ["a", REDACTED]}
    assert out["model"] == cfg["model"] and out["tokenizer"] == "gpt2"  # *_tokens / tokenizer are not secrets
    cloud = {"aws_secret_access_key": "AKIA0123", "private_key": "-----BEGIN", "access_key": "abcd1234", "auth": "Bearer x"}
    assert scrub(cloud, secrets=[]) == dict.fromkeys(cloud, REDACTED)


def test_a_secrets_path_is_not_a_secret():
    """HF_TOKEN_PATH names where the token lies: a config holding that path was redacted whole."""
    from gpt2dist.tracking import _secret_values

    env = {"HF_TOKEN_PATH": "/home/u/.cache/huggingface/token", "AWS_SECRET_ACCESS_KEY": "0123456789abcdef"}
    assert _secret_values(env) == ["0123456789abcdef"]
    assert scrub({"tokenizer_dir": "/home/u/.cache/huggingface/token"}, _secret_values(env)) == {
        "tokenizer_dir": "/home/u/.cache/huggingface/token"}


def test_run_id_precedence(tmp_path):
    ckpt = tmp_path / "last.ckpt"
    torch.save({"wandb_run_id": "fromckpt", "global_step": 6}, ckpt)
    assert resolve_run_id(None, None, env={}) == (None, "new")
    assert resolve_run_id(None, None, env={"SLURM_JOB_ID": "77"})[0] == "slurm-77"
    assert resolve_run_id(None, None, env={"SLURM_JOB_ID": "77", "SLURM_ARRAY_JOB_ID": "70",
                                           "SLURM_ARRAY_TASK_ID": "3"})[0] == "slurm-70_3"
    # One job script training two runs: two W&B runs, each the same on every requeue of the job.
    a = resolve_run_id(None, None, env={"SLURM_JOB_ID": "77"}, root_dir=str(tmp_path / "runs/a"))[0]
    b = resolve_run_id(None, None, env={"SLURM_JOB_ID": "77"}, root_dir=str(tmp_path / "runs/b"))[0]
    assert re.fullmatch(r"slurm-77-[0-9a-f]{8}", a) and re.fullmatch(r"slurm-77-[0-9a-f]{8}", b) and a != b
    assert resolve_run_id(None, None, env={"SLURM_JOB_ID": "77"}, root_dir=str(tmp_path / "runs/a"))[0] == a
    assert resolve_run_id(None, None, env={"SLURM_JOB_ID": "78"}, root_dir=str(tmp_path / "runs/a"))[0] != a
    assert resolve_run_id("last", str(tmp_path), env={"SLURM_JOB_ID": "77"})[0] == "fromckpt"
    assert resolve_run_id(str(ckpt), None, env={"WANDB_RUN_ID": "mine"})[0] == "mine"


def test_a_fresh_fit_where_its_slurm_id_already_ran_is_a_new_wandb_run(tmp_path):
    """Two fresh fits in one folder and one SLURM job (a rerun under salloc): the second would otherwise
    continue the first's W&B run, drawing step 0 onwards over its curves."""
    env, root = {"SLURM_JOB_ID": "77"}, str(tmp_path / "run")
    first = resolve_run_id(None, None, env=env, root_dir=root, wandb_dir=root)[0]
    assert re.fullmatch(r"slurm-77-[0-9a-f]{8}", first)
    (tmp_path / "run" / "wandb" / f"offline-run-20261205_031500-{first}").mkdir(parents=True)
    (tmp_path / "run" / "wandb" / "latest-run").symlink_to(f"offline-run-20261205_031500-{first}")
    assert resolve_run_id(None, None, env=env, root_dir=root, wandb_dir=root)[0] == f"{first}-r1"
    (tmp_path / "run" / "wandb" / f"run-20261205_041500-{first}-r1").mkdir()  # an online run's folder
    assert resolve_run_id(None, None, env=env, root_dir=root, wandb_dir=root)[0] == f"{first}-r2"
    # A resume takes the checkpoint's id (the requeue), whatever already ran.
    ckpt = tmp_path / "run" / "hpc_ckpt_1.ckpt"
    torch.save({"wandb_run_id": first, "global_step": 6}, ckpt)
    assert resolve_run_id("hpc", None, env=env, root_dir=root, wandb_dir=root)[0] == first
    # Another job's id in the same folder is not this one's.
    assert resolve_run_id(None, None, env={"SLURM_JOB_ID": "78"}, root_dir=root, wandb_dir=root)[0].endswith(first[-8:])
    # A checkpoint whose id cannot be read (a URL) is taken for a resume, as before: the job's id as it is.
    assert resolve_run_id("s3://bucket/run/last.ckpt", None, env=env, root_dir=root, wandb_dir=root)[0] == first
    # A fit from another folder's checkpoint is a new W&B run: -r<n> too when the job's id already ran here.
    other = tmp_path / "other"
    other.mkdir()
    torch.save({"wandb_run_id": "parent", "global_step": 6}, other / "last.ckpt")
    assert resolve_run_id(str(other / "last.ckpt"), None, env=env, root_dir=root, wandb_dir=root)[0] == f"{first}-r2"
    # Ranks other than 0 do not look (W&B runs on rank 0 only; its folder appears as they would look).
    assert resolve_run_id(None, None, env={**env, "SLURM_PROCID": "1"}, root_dir=root, wandb_dir=root)[0] == first


def test_run_id_from_hpc_deepspeed_and_url_checkpoints_of_this_run_only(tmp_path):
    """`--ckpt_path hpc`, a DeepSpeed folder and a file:// path restored the training state but started a
    new W&B run; a start from another run folder's checkpoint joined that run's W&B run."""
    from test_resume import save_deepspeed_folder

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    for n, rid in ((1, "old"), (2, "hpc2")):
        torch.save({"wandb_run_id": rid, "global_step": n}, run / f"hpc_ckpt_{n}.ckpt")
    assert resolve_run_id("hpc", str(run / "checkpoints"), env={}, root_dir=str(run)) == ("hpc2", f"checkpoint {run}/hpc_ckpt_2.ckpt")
    ds = run / "checkpoints" / "last.ckpt"
    save_deepspeed_folder(ds, 12, 24)
    state = next(ds.glob("*/*model_states.pt"))
    torch.save({**torch.load(state, weights_only=False), "wandb_run_id": "fromds"}, state)
    assert resolve_run_id("last", str(run / "checkpoints"), env={}, root_dir=str(run))[0] == "fromds"
    assert resolve_run_id(f"file://{run}/hpc_ckpt_1.ckpt", None, env={}, root_dir=str(run))[0] == "old"
    # Another run folder's checkpoint: a W&B run of its own (the SLURM id when under SLURM).
    other = tmp_path / "finetune"
    assert resolve_run_id(str(run / "hpc_ckpt_2.ckpt"), str(other / "checkpoints"), env={}, root_dir=str(other)) == (None, "new")
    assert resolve_run_id(str(run / "hpc_ckpt_2.ckpt"), str(other / "checkpoints"), env={"SLURM_JOB_ID": "9"},
                          root_dir=str(other))[0].startswith("slurm-9-")


class _RunsCode:
    """A pickle that runs code when fully unpickled."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_reading_the_run_id_never_unpickles_code(tmp_path):
    ckpt, marker = tmp_path / "last.ckpt", tmp_path / "ran"
    torch.save({"wandb_run_id": "fromckpt", "x": _RunsCode(marker)}, ckpt)
    # Unreadable with weights_only=True: no id from it (W&B draws a new one), and nothing ran.
    assert resolve_run_id(str(ckpt), None, env={}) == (None, "new")
    assert not marker.exists()


def test_offline_run_has_metrics_config_and_samples(wandb_run):
    s = inspect(wandb_run.run_dir)
    assert s["state"] == "finished" and s["project"] == "gpt2dist"
    summary = s["summary"]
    for key in METRICS:
        assert isinstance(summary.get(key), (int, float)), (key, sorted(summary))
    assert "throughput/mfu" not in summary  # CPU: no peak FLOP/s, so no MFU (and a warning)
    assert "no MFU on cpu" in wandb_run.proc.stderr
    assert summary["trainer/global_step"] == 5  # Lightning logs step index 5 for the 6th optimizer step
    assert summary["train/tokens"] == 6 * 4 * 32 * 2  # 6 steps x (4 seqs x 32 tokens x 2 accumulated), exact
    cfg = s["config"]
    # The resolved LightningCLI config, every section, with the values this run used.
    assert {"trainer", "model", "data", "checkpoint", "monitor", "samples", "seed_everything"} <= set(cfg)
    assert cfg["data"]["block_size"] == 32 and cfg["trainer"]["accumulate_grad_batches"] == 2
    assert cfg["trainer"]["logger"]["class_path"] == "lightning.pytorch.loggers.WandbLogger"
    run = cfg["run"]
    assert re.fullmatch(r"[0-9a-f]{40}", run["git_commit"]) and isinstance(run["git_dirty"], bool)
    assert (run["world_size"], run["num_nodes"], run["strategy"], run["precision"]) == (1, 1, "SingleDeviceStrategy", "32-true")
    assert run["global_batch_tokens"] == 4 * 32 * 2 * 1  # micro-batch x block x accumulation x world
    # Samples: a W&B table (step, prompt, text) with every sample so far.
    assert summary["samples"]["_type"] == "table-file"
    table = json.loads((wandb_run.run_dir / "files" / summary["samples"]["path"]).read_text())
    assert table["columns"] == ["step", "prompt", "text"]
    assert [(r[0], r[1]) for r in table["data"]] == [(3, "def "), (3, "import"), (6, "def "), (6, "import")]
    assert all(r[2].startswith(r[1]) and len(r[2]) > len(r[1]) for r in table["data"])
    # Each table at the x of its step's loss (trainer/global_step = step index = steps done - 1), not at the x
    # logged before it (2 and 5, not 1 and 4).
    history = [r["history"]["item"] for r in inspect(wandb_run.run_dir, summary=False) if r.get("type") == "history"]
    assert [h.get("trainer/global_step") for h in history if "samples._type" in h] == [2, 5]
    assert {h["trainer/global_step"] for h in history if "train/loss" in h} >= {2, 5}


def test_resume_continues_the_same_run_and_step_axis(wandb_run, wandb_resumed):
    first_id = inspect(wandb_run.run_dir)["run_id"]
    assert inspect(wandb_resumed.run_dir)["run_id"] == first_id
    assert wandb_resumed.run_dir.name.endswith(first_id)
    steps = [r["history"]["item"]["trainer/global_step"] for r in inspect(wandb_resumed.run_dir, summary=False)
             if r.get("type") == "history" and "train/loss" in r["history"]["item"]]
    assert steps and min(steps) >= 6 and max(steps) == 8  # continues after step 6, not from 0
    assert inspect(wandb_resumed.run_dir)["summary"]["train/tokens"] == 9 * 4 * 32 * 2  # counted on, not from 0
    table = inspect(wandb_resumed.run_dir)["summary"]["samples"]
    assert table["nrows"] == 6  # steps 3 and 6 restored from the checkpoint, step 9 added


def test_no_secret_in_any_file_or_log(wandb_run, wandb_resumed):
    assert SECRET not in wandb_run.proc.stdout + wandb_run.proc.stderr + wandb_resumed.proc.stderr
    files = [p for p in wandb_run.root.rglob("*") if p.is_file()]
    assert any(p.suffix == ".ckpt" for p in files) and any(p.suffix == ".wandb" for p in files)
    assert any(p.name == "config.yaml" for p in files)
    leaked = [p for p in files if SECRET.encode() in p.read_bytes()]
    assert not leaked


def test_without_wandb_the_same_metric_names_reach_csv(csv_run):
    assert "wandb is not installed" not in csv_run.proc.stderr  # nothing tried to import it
    # The secret in a config value (a prompt) reached config.yaml, which the parser wrote unscrubbed, and
    # hparams.yaml through Lightning's own logging of the data module's hyperparameters. (Checkpoints keep the
    # values they run with: their hyperparameters rebuild the run.)
    config = (csv_run.root / "logs" / "version_0" / "config.yaml").read_text()
    assert REDACTED in config and not [p for p in csv_run.root.rglob("*") if p.is_file() and p.suffix != ".ckpt"
                                       and SECRET.encode() in p.read_bytes()]
    rows = list(csv.DictReader(open(next(csv_run.root.glob("logs/version_*/metrics.csv")))))
    names = {k for r in rows for k, v in r.items() if v not in ("", None)}
    assert set(METRICS) <= names
    hparams = (next(csv_run.root.glob("logs/version_*/hparams.yaml"))).read_text()
    assert "global_batch_tokens: 256" in hparams  # run facts reach non-W&B loggers too
    samples = (csv_run.root / "checkpoints" / "samples.txt").read_text()
    assert samples.count("=== step 3 |") == 2 and samples.count("=== step 6 |") == 2


@pytest.fixture(scope="module")
def offline_wandb_runs(tmp_path_factory, corpus_dir, tokenizer_dir, request):
    """Each row's online-W&B `fit` with nothing to reach, two at a time (each waits out W&B's init timeout)."""
    def run(api_key, error):
        tmp = tmp_path_factory.mktemp("wandb_online")
        env = {"WANDB_MODE": "online", "WANDB_API_KEY": api_key, "HOME": str(tmp / "home"),  # no ~/.netrc login
               "WANDB_CONFIG_DIR": str(tmp / "home"), "WANDB_BASE_URL": "http://127.0.0.1:9",  # nothing listens
               "WANDB_INIT_TIMEOUT": "10"}
        return tmp, run_cli(*fit_args(tmp / "run", corpus_dir, tokenizer_dir, max_steps=2), "--config",
                            str(REPO / "configs/logging/wandb.yaml"), env=env, timeout=240)

    return each_row_two_at_a_time(request, "test_wandb_not_logged_in_or_unreachable_is_one_line", run)


@pytest.mark.parametrize("api_key, error", [("", "UsageError: No API key configured"),
                                             (SECRET, "AuthenticationError: WANDB_API_KEY invalid"),
                                             (SECRET * 2, "CommError: ")])  # a well-formed key, no server
def test_wandb_not_logged_in_or_unreachable_is_one_line(offline_wandb_runs, request, api_key, error):
    """Online W&B without credentials, or with a server it cannot reach (a compute node without internet):
    one line with the ways out, no wandb traceback, no hang past W&B's init timeout, and no key echoed."""
    tmp_path, p = row_result(offline_wandb_runs, request)
    assert p.returncode == 2, p.stderr[-3000:]
    errors = [line for line in p.stderr.splitlines() if line.startswith("gpt2dist: error:")]
    assert len(errors) == 1 and f"W&B failed ({error}" in errors[0] and "WANDB_MODE=offline" in errors[0], p.stderr[-3000:]
    assert "Traceback" not in p.stderr and SECRET not in p.stderr + p.stdout
    # Refused before data preparation: nothing was tokenized or packed first.
    assert not (tmp_path / "cache" / "blocks").exists(), sorted((tmp_path / "cache").rglob("*"))


def test_predict_writes_its_rows_as_a_wandb_table_too(wandb_run, tmp_path, corpus_dir, tokenizer_dir):
    """`gpt2dist predict` with the W&B overlay: the W&B run holds a `predictions` table with exactly the
    rows of predictions.jsonl (index, sample, prompt, text), sampled, 2 per prompt."""
    root = tmp_path / "pred"
    shutil.copytree(wandb_run.root / "checkpoints", root / "checkpoints")
    shutil.copy(wandb_run.root / "config.yaml", root / "config.yaml")  # the fit's, as it wrote it
    args = fit_args(root, corpus_dir, tokenizer_dir)[1:]  # fit's model and data arguments, for predict
    env = {"WANDB_API_KEY": SECRET, "HF_TOKEN": SECRET, "WANDB_MODE": "offline"}
    p = run_cli("predict", *args, "--config", str(REPO / "configs/logging/wandb.yaml"), "--ckpt_path", "last",
                '--data.predict_prompts=["def ", "import", "class "]', "--model.do_sample=true",
                "--model.samples_per_prompt=2", "--model.max_new_tokens=6", env=env, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    rows = [json.loads(line) for line in (root / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 6
    (run,) = sorted((root / "wandb").glob("offline-run-*"))
    table_ref = inspect(run)["summary"]["predictions"]
    assert table_ref["_type"] == "table-file" and table_ref["nrows"] == 6
    table = json.loads((run / "files" / table_ref["path"]).read_text())
    assert table["columns"] == ["index", "sample", "prompt", "text"]
    assert table["data"] == [[r["index"], r["sample"], r["prompt"], r["text"]] for r in rows]
    # The W&B logger has no folder, so every subcommand writes to default_root_dir: predict's resolved config
    # goes beside the fit's, which it replaced (and which `fit --config` then refused: `verbose` is not fit's).
    assert (root / "config.yaml").read_bytes() == (wandb_run.root / "config.yaml").read_bytes()
    assert "  predict_prompts:\n  - 'def '\n  - import\n" in (root / "predict_config.yaml").read_text()
    # A W&B save_dir given is no per-subcommand folder either: its config.yaml was predict's, replacing fit's.
    p = run_cli("predict", *args, "--config", str(REPO / "configs/logging/wandb.yaml"), "--ckpt_path", "last",
                "--trainer.logger.init_args.save_dir", str(root), '--data.predict_prompts=["for "]', env=env, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert (root / "config.yaml").read_bytes() == (wandb_run.root / "config.yaml").read_bytes()
    assert "  predict_prompts:\n  - 'for '\n" in (root / "predict_config.yaml").read_text()


def test_git_state_is_the_packages_own_checkout_or_unknown(tmp_path):
    """A copy installed into a venv inside another repository (gitignored) reported that repository's commit."""
    import shutil
    import subprocess

    from gpt2dist.tracking import git_state

    here = git_state()  # this checkout: its own HEAD
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert here["git_commit"] == head
    project = tmp_path / "project"
    site = project / ".venv" / "lib" / "site-packages" / "gpt2dist"
    shutil.copytree(REPO / "gpt2dist", site, ignore=shutil.ignore_patterns("__pycache__"))
    git = ["git", "-C", str(project), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(["git", "init", "-q", str(project)], check=True)
    (project / ".gitignore").write_text(".venv/\n")
    subprocess.run([*git, "add", ".gitignore"], check=True)
    subprocess.run([*git, "commit", "-qm", "x"], check=True)
    assert git_state(site) == {"git_commit": "unknown", "git_dirty": None}


def test_a_setting_wandb_refuses_is_named_not_the_login(monkeypatch):
    from gpt2dist.tracking import wandb_error_message

    UsageError = pytest.importorskip("wandb.errors").UsageError

    monkeypatch.setenv("WANDB_RUN_ID", "a/b:c")
    message = wandb_error_message(UsageError("Run ID cannot contain the characters: :;,#?/'"))
    assert message == ("W&B refused a setting (UsageError: Run ID cannot contain the characters: :;,#?/') "
                       "(WANDB_RUN_ID='a/b:c': fix or unset it); fix it in the W&B logger section (trainer.logger) "
                       "or the WANDB_* environment"), message
    assert "wandb login" not in message
    # W&B's missing login is a UsageError too: it keeps the login advice.
    assert "wandb login" in wandb_error_message(UsageError("No API key configured. Use `wandb login` to log in."))
    # W&B's Settings refuse a bad value through pydantic (not a wandb.* class): it went out as a traceback.
    with pytest.raises(Exception) as refused:
        pytest.importorskip("wandb").Settings(mode="ofline")
    assert wandb_error_message(refused.value) == (
        "W&B refused a setting (mode: Input should be 'online', 'offline', 'shared', 'disabled', 'dryrun' or 'run'); "
        "fix it in the W&B logger section (trainer.logger) or the environment (WANDB_MODE)")


def test_scrubbed_hyperparameters_reach_the_logger_and_it_still_pickles(tmp_path):
    """RunConfig routes every logger's log_hyperparams through scrub: a dict, an AttributeDict, a Namespace or
    nothing (CSVLogger allows a bare call), and the logger stays picklable (ddp_spawn sends it to workers)."""
    import argparse
    import functools
    import pickle

    from lightning.pytorch.loggers import CSVLogger

    from gpt2dist.tracking import _log_scrubbed

    seen = []
    for params in ({"api_key": "k", "lr": 1}, argparse.Namespace(api_key="k", lr=1), None):
        _log_scrubbed(lambda p, *a, **k: seen.append(p), params)
    assert seen == [{"api_key": REDACTED, "lr": 1}, {"api_key": REDACTED, "lr": 1}, None]
    logger = CSVLogger(str(tmp_path))
    logger.log_hyperparams = functools.partial(_log_scrubbed, logger.log_hyperparams)
    pickle.loads(pickle.dumps(logger)).log_hyperparams({"token": "t"})


def test_the_cli_wandb_logger_resumes_its_run_and_refuses_what_wandb_init_does_not_take():
    """jsonargparse expands WandbLogger's **kwargs into every wandb.init parameter, unset ones None, over
    Lightning's resume="allow": a resumed or requeued fit reused the run id without resuming the W&B run. A key
    wandb.init does not take was its TypeError traceback; `settings` became a whole wandb.Settings (online, the
    working directory) over WANDB_MODE."""
    from types import SimpleNamespace

    import yaml
    from lightning.pytorch.loggers import WandbLogger

    from gpt2dist.errors import ConfigError
    from gpt2dist.tracking import check_wandb_init

    r = run_cli("fit", "--config", str(REPO / "configs" / "quickstart.yaml"), "--config",
                str(REPO / "configs" / "logging" / "wandb.yaml"), "--print_config")
    assert r.returncode == 0, r.stderr[-2000:]
    kwargs = yaml.safe_load(r.stdout)["trainer"]["logger"]["init_args"]
    assert "resume" in kwargs and kwargs["resume"] is None  # what the CLI hands the logger
    logger = WandbLogger(**{**kwargs, "offline": False})  # (offline: Lightning sets WANDB_MODE for the process)
    check_wandb_init(SimpleNamespace(loggers=[logger]))
    assert logger._wandb_init["resume"] == "allow"
    # A fork or rewind of a W&B run: resume stays unset (W&B refuses it beside fork_from / resume_from).
    for key in ("fork_from", "resume_from"):
        forked = WandbLogger(**{**kwargs, "offline": False, key: "abc123?_step=5"})
        check_wandb_init(SimpleNamespace(loggers=[forked]))
        assert forked._wandb_init["resume"] is None, key
    with pytest.raises(ConfigError, match=r"^trainer.logger.dict_kwargs.entitty is not a wandb.init argument; did you mean "
                                          r"entity\?"):
        check_wandb_init(SimpleNamespace(loggers=[WandbLogger(project="gpt2dist", entitty="me")]))
    with pytest.raises(ConfigError, match=r"^trainer.logger.dict_kwargs.settings is not supported .* WANDB_\* environment"):
        check_wandb_init(SimpleNamespace(loggers=[WandbLogger(project="gpt2dist", settings={"init_timeout": 120})]))


def test_two_fits_in_one_process_log_to_their_own_wandb_runs_and_folders(tmp_path, corpus_dir, tokenizer_dir):
    """`gpt2dist.cli.main` twice in one process (a notebook, a sweep script) under a SLURM job: the W&B run
    id and folder the first set in the environment (for wandb.init) stayed, and the second fit logged into
    the first's W&B run, inside the first's run folder."""
    import hashlib
    import subprocess
    import sys

    roots = [tmp_path / "a" / "run", tmp_path / "b" / "run"]
    script = "\n".join([
        "import json, os, sys",
        "from gpt2dist.cli import main",
        "import wandb.sdk.wandb_run as wr",
        "codes, real_finish = [], wr.Run.finish",
        "wr.Run.finish = lambda self, exit_code=None, **k: (codes.append(exit_code), real_finish(self, exit_code=exit_code, **k))[1]",
        "first, second = json.loads(sys.argv[1])",
        "main(first)",
        # Called from a caller's `except` block (a retry): its exception is not this run's (it was finished failed).
        "try:",
        "    raise ValueError('an earlier attempt failed')",
        "except ValueError:",
        "    main(second)",
        "print('exit codes:', codes)",
        "wr.Run.finish = real_finish",
        "print('left:', sorted(k for k in ('WANDB_RUN_ID', 'WANDB_DIR') if k in os.environ))",
        # A run started around main() (a W&B sweep agent's wandb.init): Lightning logs into it; it is not ours to end.
        "import wandb",
        "outer = wandb.init(mode='offline', dir=os.getcwd(), id='outer-run')",
        "main(json.loads(sys.argv[2]))",
        "print('outer kept:', wandb.run is outer)",
        "outer.finish()",
        # A finish that fails (an upload): one warning line; main returns as the fit did, the environment set back.
        "wandb.sdk.wandb_run.Run.finish = lambda self, *a, **k: (_ for _ in ()).throw(RuntimeError('upload failed'))",
        # ... and a logger told offline=true with WANDB_MODE unset: Lightning sets WANDB_MODE=dryrun, which stayed,
        # so a later main() meant to go online ran offline without a word.
        "del os.environ['WANDB_MODE']",
        "main(first + ['--trainer.default_root_dir=' + os.path.join(os.getcwd(), 'd', 'run'), '--trainer.logger.init_args.offline=true'])",
        "print('after failed finish:', sorted(k for k in ('WANDB_RUN_ID', 'WANDB_DIR', 'WANDB_MODE') if k in os.environ), flush=True)",
        "sys.stderr.flush()",
        "os._exit(0)  # W&B's exit hook would try the patched finish again",
    ])
    runs = [[*fit_args(r, corpus_dir, tokenizer_dir, max_steps=2), "--config", str(REPO / "configs/logging/wandb.yaml"),
             "--samples.sample_every_n_steps=0"] for r in roots]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "SLURM_"))}
    env.update(WANDB_MODE="offline", SLURM_JOB_ID="4242", PYTHONPATH=str(REPO))
    inside = [*fit_args(tmp_path / "c" / "run", corpus_dir, tokenizer_dir, max_steps=2), "--config",
              str(REPO / "configs/logging/wandb.yaml"), "--samples.sample_every_n_steps=0"]
    proc = subprocess.run([sys.executable, "-c", script, json.dumps(runs), json.dumps(inside)], capture_output=True,
                          text=True, timeout=600, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "left: []" in proc.stdout and "outer kept: True" in proc.stdout and "after failed finish: []" in proc.stdout
    assert "exit codes: [0, 0]" in proc.stdout, proc.stdout
    assert "gpt2dist: warning: W&B could not finish the run (RuntimeError: upload failed)" in proc.stderr
    assert any(p.name.endswith("outer-run") for p in (tmp_path / "wandb").glob("offline-run-*"))
    for root in roots:
        run_id = f"slurm-4242-{hashlib.sha1(str(root).encode()).hexdigest()[:8]}"  # this folder's id in this job
        found = sorted(p.name for p in (root / "wandb").glob("offline-run-*"))
        assert len(found) == 1 and found[0].endswith(run_id), (root, found)
