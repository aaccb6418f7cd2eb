"""Experiment tracking: the run's config, a stable W&B run id across resumes, and no secrets.

- `RunConfig` (LightningCLI's SaveConfigCallback): besides `config.yaml`, logs the full resolved
  CLI config plus run facts (git commit/dirty, world size, nodes, strategy, precision, global
  batch in tokens) to every logger: the W&B config tab, or CSV/TensorBoard `hparams.yaml`.
  It also stores the W&B run id in each checkpoint.
- `prepare_wandb` (called before `fit`) picks the run id (under SLURM `slurm-<job id>-<hash of the
  run folder>`, plus `-r<n>` for a fresh fit where that id already ran) so that a resumed or requeued
  job continues the same W&B run (resume="allow", put back by `check_wandb_init` where the CLI's parsing
  unset it; the step axis `trainer/global_step` continues because it comes from the restored trainer).
- `scrub` redacts secrets (API keys, tokens) from anything we log.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import re
import subprocess
from pathlib import Path

import yaml
from lightning.pytorch.cli import SaveConfigCallback

from gpt2dist.errors import ConfigError

log = logging.getLogger(__name__)

SECRET_KEY = re.compile(r"(^|_)(api_?key|(access|private|secret)_?key|token|secret|password|passwd|credentials?|auth)$",
                        re.IGNORECASE)
SECRET_ENV = re.compile(r"(API_?KEY|ACCESS_?KEY|PRIVATE_?KEY|TOKEN|SECRET|PASSWORD)", re.IGNORECASE)
# Where a secret lies, not the secret: HF_TOKEN_PATH's value is a path that configs hold too.
NOT_SECRET_ENV = re.compile(r"_(PATH|FILE|DIR|HOME)$", re.IGNORECASE)
REDACTED = "<redacted>"


def _secret_values(env=None) -> list[str]:
    env = os.environ if env is None else env
    return [v for k, v in env.items() if SECRET_ENV.search(k) and not NOT_SECRET_ENV.search(k) and len(v) >= 8]


def scrub(obj, secrets: list[str] | None = None):
    """A copy of `obj` with secret-named keys and any value holding a secret env var's value redacted."""
    secrets = _secret_values() if secrets is None else secrets
    if isinstance(obj, dict):
        return {k: REDACTED if isinstance(k, str) and SECRET_KEY.search(k) and obj[k] else scrub(v, secrets)
                for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(scrub(v, secrets) for v in obj)
    if isinstance(obj, str) and any(s in obj for s in secrets):
        return REDACTED
    return obj


def git_state(path: str | Path | None = None) -> dict:
    """Commit and dirty flag of the code that runs (the gpt2dist checkout, not the cwd)."""
    path = Path(path or Path(__file__).resolve().parent)
    try:
        # The package's own files must be tracked there: a wheel installed into a venv inside some other
        # repository (myproject/.venv) would otherwise report that repository's commit.
        subprocess.run(["git", "-C", str(path), "ls-files", "--error-unmatch", "--", "tracking.py"],
                       capture_output=True, timeout=10, check=True)
        commit = subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(path), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip() != ""
        return {"git_commit": commit, "git_dirty": dirty}
    except (OSError, subprocess.SubprocessError):
        return {"git_commit": "unknown", "git_dirty": None}  # installed from a wheel, or no git


def run_facts(trainer) -> dict:
    """World size, nodes, strategy, precision and the global batch (sequences and tokens)."""
    dm = getattr(trainer, "datamodule", None)
    micro, block = getattr(dm, "batch_size", None), getattr(dm, "block_size", None)
    accum = trainer.accumulate_grad_batches
    facts = {**git_state(), "world_size": trainer.world_size, "num_nodes": trainer.num_nodes,
             "devices_per_node": trainer.num_devices, "strategy": type(trainer.strategy).__name__,
             "precision": str(trainer.precision), "accumulate_grad_batches": accum}
    if micro and block:
        seqs = micro * accum * trainer.world_size
        facts.update(micro_batch_size=micro, block_size=block, global_batch_sequences=seqs,
                     global_batch_tokens=seqs * block)  # e.g. 16 x 4 accum x 8 GPUs x 1024 = 524,288
    return facts


def wandb_loggers(trainer) -> list:
    from lightning.pytorch.loggers import WandbLogger

    return [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]


def _log_scrubbed(log_hyperparams, params=None, *args, **kwargs):
    """A logger's log_hyperparams, given the scrubbed params (a dict, AttributeDict or Namespace)."""
    if params is not None:
        params = scrub(dict(params) if isinstance(params, dict) else vars(params))
    return log_hyperparams(params, *args, **kwargs)


class RunConfig(SaveConfigCallback):
    """Writes config.yaml, logs the resolved CLI config + run facts to every logger, and stores
    the W&B run id in checkpoints."""

    run_id: str | None = None

    def save_config(self, trainer, pl_module, stage: str) -> None:  # rank 0 only
        config = yaml.safe_load(self.parser.dump(self.config, skip_none=False))
        params = scrub({**config, "run": run_facts(trainer)})
        for logger in trainer.loggers:
            logger.log_hyperparams(params)

    def setup(self, trainer, pl_module, stage: str) -> None:
        for logger in trainer.loggers:
            # Lightning logs the module's and data module's own hyperparameters too (CSV's hparams.yaml, the W&B
            # config): through scrub, as ours are (a token pasted into a prompt reached hparams.yaml).
            if not getattr(logger, "_scrubbed", False):
                logger.log_hyperparams = functools.partial(_log_scrubbed, logger.log_hyperparams)
                logger._scrubbed = True
        # SaveConfigCallback.setup, except that a logger without a folder (WandbLogger with
        # save_dir=null) writes config.yaml to default_root_dir instead of failing.
        if not self.already_saved:
            from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

            log_dir, name = trainer.log_dir, self.config_filename  # log_dir broadcasts: all ranks call it
            if log_dir is None or not (trainer.loggers and isinstance(trainer.loggers[0], (CSVLogger, TensorBoardLogger))):
                # Only CSV/TensorBoard give each subcommand its own folder (version_N); W&B's save_dir, or no
                # logger (default_root_dir), is shared: `test` replaced fit's config.yaml, the one to rerun or
                # resume, with its own, which `fit` refuses (verbose); two runs sharing a W&B save_dir each other's.
                log_dir = trainer.default_root_dir
                stage = getattr(stage, "value", stage)  # Lightning passes a TrainerFn ("predict")
                if stage != "fit":
                    name = f"{stage}_{name}"
            path = os.path.join(log_dir, name)
            if trainer.is_global_zero:
                if os.path.isfile(path) and not self.overwrite:
                    raise RuntimeError(f"{path} exists; set save_config_kwargs overwrite=True or use another folder")
                os.makedirs(log_dir, exist_ok=True)
                dumped = yaml.safe_load(self.parser.dump(self.config, skip_none=False))
                if scrub(dumped) != dumped:  # a key or token in the config: never into config.yaml either
                    Path(path).write_text(yaml.safe_dump(scrub(dumped), sort_keys=False))
                else:
                    self.parser.save(self.config, path, skip_none=False, overwrite=self.overwrite, multifile=self.multifile)
                self.save_config(trainer, pl_module, stage)
            self.already_saved = trainer.strategy.broadcast(True)
        run_id = None
        if trainer.is_global_zero:
            for logger in wandb_loggers(trainer):
                run_id = logger.experiment.id
        self.run_id = trainer.strategy.broadcast(run_id)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        if self.run_id:
            checkpoint["wandb_run_id"] = self.run_id


def _checkpoint_run_id(path: str | None) -> str | None:
    """The W&B run id stored in a checkpoint: a file, an FSDP2/distcp folder's meta.pt, a DeepSpeed folder's
    client state (read as resume.py reads them: weights-only, except DeepSpeed's own format)."""
    if not path:
        return None
    if "://" in str(path):
        if not str(path).startswith("file://"):
            log.warning("the W&B run id of %s is not read (a URL): this fit starts a new W&B run; set WANDB_RUN_ID "
                        "to continue the checkpoint's", path)
            return None
        path = str(path)[len("file://"):]
    if not os.path.exists(path):
        return None
    from gpt2dist.resume import _meta

    ckpt, why = _meta(path)
    if ckpt is None:  # a checkpoint we cannot read is reported by Lightning itself
        log.warning("could not read the W&B run id from %s (%s)", path, why)
        return None
    return ckpt.get("wandb_run_id")


def _inside(path: str, folders: tuple[str | None, ...]) -> bool:
    real = os.path.realpath(path[len("file://"):] if path.startswith("file://") else path)
    return any(f and os.path.commonpath([real, os.path.realpath(f)]) == os.path.realpath(f) for f in folders)


def resolve_run_id(ckpt_path: str | None, checkpoint_dir: str | None, env=None,
                   root_dir: str | None = None, wandb_dir: str | None = None) -> tuple[str | None, str]:
    """(run id, where it came from). Order: WANDB_RUN_ID, the checkpoint resumed from (when it is this run's:
    in its run folder or checkpoint folder), the SLURM job and run folder `root_dir` (a requeued job keeps
    its id), else None (W&B draws a new id, which checkpoints then keep). `wandb_dir`: the folder W&B
    writes its `wandb/` runs under, where a SLURM id already used is found."""
    env = os.environ if env is None else env
    # One job script may train several runs (`srun gpt2dist fit` per config, or plain `python -m`
    # calls): the job id alone would merge them into one W&B run (resume="allow"), the second's
    # steps going back to 0. The run folder tells them apart and is the same on every requeue.
    folder = f"-{hashlib.sha1(os.path.abspath(root_dir).encode()).hexdigest()[:8]}" if root_dir else ""
    if env.get("WANDB_RUN_ID"):
        return env["WANDB_RUN_ID"], "WANDB_RUN_ID"
    if ckpt_path == "last":
        ckpt_path = os.path.join(checkpoint_dir, "last.ckpt") if checkpoint_dir else None
    elif ckpt_path == "hpc":
        from gpt2dist.resume import lightning_hpc_checkpoint

        hpc = lightning_hpc_checkpoint(root_dir)
        ckpt_path = str(hpc) if hpc else None
    run_id = _checkpoint_run_id(ckpt_path)
    # A new W&B run: no checkpoint (a fresh fit), or another run folder's. A checkpoint of unknown origin
    # (a URL, no id stored) is taken for a resume of this run, as before.
    new_run = ckpt_path is None
    if run_id:
        if root_dir is None or _inside(str(ckpt_path), (root_dir, checkpoint_dir)):
            return run_id, f"checkpoint {ckpt_path}"
        # Another run folder's checkpoint starts a run of its own (as resume.set_aside_other_runs treats it):
        # its W&B run is that run's, and two fine-tunes from one checkpoint must not share it.
        log.info("W&B: a new run; %s is another run folder's checkpoint (W&B run %s: set WANDB_RUN_ID=%s to "
                 "continue that run instead)", ckpt_path, run_id, run_id)
        new_run = True
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        run_id = f"slurm-{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}{folder}"
        return (_unused(run_id, wandb_dir, env) if new_run else run_id), "SLURM array job"
    if env.get("SLURM_JOB_ID"):
        run_id = f"slurm-{env['SLURM_JOB_ID']}{folder}"
        return (_unused(run_id, wandb_dir, env) if new_run else run_id), "SLURM job and run folder"
    return None, "new"


def _unused(run_id: str, wandb_dir: str | None, env) -> str:
    """`run_id`, or `run_id-r<n>` when W&B already ran under it in `wandb_dir`: a new run (a fresh fit, or
    one from another folder's checkpoint) in a job and folder where one already ran (iterating under
    salloc, a requeue that found no checkpoint) would otherwise continue that W&B run (resume="allow"),
    drawing its curves back from its first step over the earlier run's. Rank 0 only (SLURM_PROCID): its id
    is the one W&B uses, and the folder it creates at once must not make a slower rank pick `-r<n+1>`."""
    if env.get("SLURM_PROCID", "0") != "0":
        return run_id
    runs = Path(wandb_dir or ".") / "wandb"
    used = {re.sub(r"^(offline-)?run-\d{8}_\d{6}-", "", p.name) for p in runs.glob("*run-*-*")} if runs.is_dir() else set()
    if run_id not in used:
        return run_id
    n = 1
    while f"{run_id}-r{n}" in used:
        n += 1
    log.info("W&B: run %s exists in %s and this fit starts fresh: a new W&B run %s-r%d", run_id, runs, run_id, n)
    return f"{run_id}-r{n}"


def wandb_error_message(err: BaseException) -> str | None:
    """One line for `cli.main` when W&B itself refused to start or log (no API key, server unreachable);
    None for any other exception."""
    if getattr(err, "title", None) == "Settings" and callable(getattr(err, "errors", None)):
        # W&B's Settings (pydantic) refused a value, e.g. WANDB_MODE=ofline: a traceback from pydantic_core.
        problem = (err.errors() or [{}])[0]
        field = ".".join(str(x) for x in problem.get("loc", ())) or "?"
        return (f"W&B refused a setting ({field}: {scrub(str(problem.get('msg', ''))[:300])}); fix it in the W&B "
                f"logger section (trainer.logger) or the environment (WANDB_{field.upper()})")
    if not any(c.__module__.startswith("wandb.") for c in type(err).__mro__):
        return None
    first = scrub(next((line.strip() for line in str(err).splitlines() if line.strip()), ""))  # never echo a key
    # A setting W&B refuses (a malformed run id, ...): not a login (W&B's missing API key is a UsageError too).
    if type(err).__name__ == "UsageError" and not re.search(r"api.?key|log ?in", first, re.IGNORECASE):
        run_id = os.environ.get("WANDB_RUN_ID")
        culprit = f" (WANDB_RUN_ID={run_id!r}: fix or unset it)" if run_id else ""
        return (f"W&B refused a setting ({type(err).__name__}: {first[:300]}){culprit}; fix it in the W&B logger "
                f"section (trainer.logger) or the WANDB_* environment")
    return (f"W&B failed ({type(err).__name__}: {first[:300]}): log in with `wandb login` or export "
            f"WANDB_API_KEY, check the network to the W&B server, or log without it: WANDB_MODE=offline "
            f"(then `wandb sync <default_root_dir>/wandb/offline-run-*`) or a CSV logger")


def wandb_dir_in_run_folder(trainer) -> None:
    """W&B writes its run under WANDB_DIR, else the working directory: with no logger save_dir, put it
    in the run folder (fit, and validate/test/predict, whose W&B runs are their own)."""
    loggers = wandb_loggers(trainer)
    if loggers and loggers[0].save_dir is None and not os.environ.get("WANDB_DIR"):
        os.makedirs(trainer.default_root_dir, exist_ok=True)
        os.environ["WANDB_DIR"] = os.path.abspath(trainer.default_root_dir)


def check_wandb_init(trainer) -> None:
    """The W&B loggers' `wandb.init` arguments, before any run starts (fit, and validate/test/predict).

    - resume: jsonargparse expands WandbLogger's **kwargs into every wandb.init parameter, unset ones as None,
      over Lightning's resume="allow": a resumed or requeued fit reused the run id without resuming the run
      (W&B: "when resume is unset, a new run"). Unset means "allow" again.
    - A key wandb.init does not take (`entitty`) is one line, not wandb's TypeError traceback.
    - `settings`: parsed into a whole wandb.Settings (mode online, root_dir the working directory) over
      WANDB_MODE / WANDB_DIR; refused, the WANDB_* variables set the same things."""
    import difflib
    import inspect

    for logger in wandb_loggers(trainer):
        init = logger._wandb_init
        if all(init.get(k) is None for k in ("resume", "resume_from", "fork_from")):  # W&B: mutually exclusive
            init["resume"] = "allow"
        if init.get("settings") is not None:
            raise ConfigError("trainer.logger.dict_kwargs.settings is not supported (it is parsed into a full "
                              "wandb.Settings that overrides WANDB_MODE and the run folder); unset it and use the "
                              "WANDB_* environment variables (e.g. WANDB_INIT_TIMEOUT=120)")
        import wandb

        known = set(inspect.signature(wandb.init).parameters)
        for key in init:
            if key not in known:
                near = difflib.get_close_matches(key, sorted(known), n=1)
                raise ConfigError(f"trainer.logger.dict_kwargs.{key} is not a wandb.init argument"
                                  f"{f'; did you mean {near[0]}?' if near else ''} (unset it; wandb.init takes "
                                  f"{', '.join(sorted(known))})")


def prepare_wandb(trainer, ckpt_path: str | None) -> None:
    """Before `fit`: choose the W&B run id and folder through W&B's own environment variables
    (WANDB_RUN_ID, WANDB_DIR), which `wandb.init` reads; a logger given an explicit
    `id`/`version` keeps it."""
    loggers = wandb_loggers(trainer)
    if not loggers:
        return
    check_wandb_init(trainer)
    logger = loggers[0]
    wandb_dir_in_run_folder(trainer)
    if logger.version:
        return
    ckpt_dir = getattr(trainer.checkpoint_callback, "dirpath", None)
    run_id, source = resolve_run_id(ckpt_path, ckpt_dir, root_dir=trainer.default_root_dir,
                                    wandb_dir=logger.save_dir or os.environ.get("WANDB_DIR"))
    if run_id:
        os.environ["WANDB_RUN_ID"] = run_id
        log.info("W&B run id %s (from %s)", run_id, source)


def start_wandb_runs(trainer) -> None:
    """Start the W&B run now, on global rank 0 (Lightning knows the ranks from Trainer init),
    instead of at the first log: a missing login or an unreachable server then fails in seconds,
    before `prepare_data` tokenizes the corpus, not after it."""
    for logger in wandb_loggers(trainer):
        logger.experiment  # noqa: B018 (rank_zero_experiment: a no-op stand-in on the other ranks)
