"""The `gpt2dist` command: LightningCLI with fit / validate / test / predict, plus prepare.

    gpt2dist fit --config configs/quickstart.yaml
    gpt2dist fit --config configs/gpt2-large.yaml --config configs/strategy/fsdp.yaml
    gpt2dist prepare --config configs/gpt2-large.yaml   # only fit's tokenizing + packing, no GPU

Later `--config` files override earlier ones; `--print_config` shows the merged result.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import sys
import time
from pathlib import Path
from typing import Optional
import warnings

import torch

from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.plugins.environments import SLURMEnvironment
from lightning.pytorch.strategies import DeepSpeedStrategy
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.fabric.utilities.exceptions import MisconfigurationException

from gpt2dist.callbacks import EarlyStop, HFExport, PredictionWriter, ValidationReport
from gpt2dist.data import TokenBlockDataModule
from gpt2dist.errors import CheckpointError, ConfigError, GPT2DistError
from gpt2dist.export import export_checkpoint
from gpt2dist.faults import (AtomicCheckpointIO, FaultTolerance, check_strategy_accelerator,
                             check_validation_on_step_boundary, check_writable, oom_message,
                             remove_stale_hpc_temporaries)
from gpt2dist.launch import check_srun_seen, check_srun_world
from gpt2dist.model import GPT2Module
from gpt2dist.monitor import SampleLogger, TrainMonitor
from gpt2dist.preemption import Preemption, RequeueStop, install_early_handler
from gpt2dist.resume import (DeepSpeedFolderIO, best_checkpoint, check_checkpoint_fits_strategy,
                             check_explicit_checkpoint, checkpoint_progress, hold_run_folder, is_deepspeed_folder,
                             newest_checkpoint, no_hpc_autoload, recorded_start, record_start, release_run_folders,
                             resolve_ckpt_path, resolve_eval_ckpt_path)
from gpt2dist.strategies import check_strategy_precision
from gpt2dist.tracking import (RunConfig, check_wandb_init, prepare_wandb, scrub, start_wandb_runs, wandb_dir_in_run_folder,
                               wandb_error_message)

log = logging.getLogger(__name__)


def _checkpoint_dir(root: str | None) -> str:
    # One predictable place, so `--ckpt_path last` and SLURM requeues find it.
    return os.path.join(root or os.getcwd(), "checkpoints")


PREPARE_HELP = ("Tokenize and pack the data of `fit` with the same arguments into data.cache_dir, and "
                "nothing else (no Trainer, GPU or process group): run it on a CPU node before a large job.")


class GPT2ArgumentParser(LightningArgumentParser):
    """Lightning's parser, whose refusal of a config key or value is one line naming it (and the nearest
    option), not the subcommand's 170-line usage."""

    def error(self, message: str, ex: Exception | None = None):
        try:  # jsonargparse's own switch (JSONARGPARSE_DEBUG): a private module, so not every version has it here
            from jsonargparse._common import debug_mode_active
        except ImportError:
            def debug_mode_active() -> bool:
                return bool(os.environ.get("JSONARGPARSE_DEBUG"))

        if not self.exit_on_error or debug_mode_active():
            return super().error(message, ex)  # jsonargparse parsing internally: it catches this
        parser = getattr(ex, "subcommand_parser", None) or self
        if getattr(self, "_logger", None) is not None:
            self._logger.error(message)
        text = " ".join(line.strip() for line in str(message).splitlines() if line.strip()) or "invalid arguments"
        text = text if len(text) <= 400 else text[:400] + " ..."
        hint = ""
        # The option named inside a longer message first (a subclass's "Option 'entitty' is not accepted").
        key = (re.search(r"[Oo]ption '([^']+)'", text)
               or re.search(r"unrecognized arguments: --?([\w.]+)|key \"?([\w.]+)\"?", text))
        if key:
            import difflib

            name = next(g for g in key.groups() if g)
            options = [o.lstrip("-") for a in parser._actions for o in a.option_strings if o.startswith("--")]
            near = difflib.get_close_matches(name, options, n=1, cutoff=0.75)
            if near and near[0] != name:
                hint = f"; did you mean {near[0]}?"
        words = parser.prog.replace(" [options]", "").split()
        sub = f" {words[-1]}" if len(words) > 1 else ""
        sys.stderr.write(f"gpt2dist: error: {text}{hint} (gpt2dist{sub} --help lists the options)\n")
        self.exit(2)


class GPT2CLI(LightningCLI):
    def _add_subcommands(self, parser, **kwargs) -> None:
        super()._add_subcommands(parser, **kwargs)
        # `prepare` parses fit's whole command line (configs, overrides, --ckpt_path), so the cache key
        # it writes is the one `fit` with the same arguments reads, and one command line serves both.
        sub = self._prepare_subcommand_parser(self.trainer_class, "fit", **{**kwargs.get("fit", {}),
                                                                            "description": PREPARE_HELP})
        # slurm/eval.sbatch runs prepare with an evaluation's own arguments: accepted here, and unused.
        sub.add_argument("--verbose", type=Optional[bool], default=None, help="Ignored: validate / test's option.")
        sub.add_argument("--return_predictions", type=Optional[bool], default=None, help="Ignored: predict's option.")
        self._subcommand_parsers["prepare"] = sub
        parser._subcommands_action.add_subcommand("prepare", sub, help=PREPARE_HELP)  # jsonargparse's, from super

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.save_last": True, "checkpoint.filename": "step{step:07d}",
                             "checkpoint.auto_insert_metric_name": False})
        parser.link_arguments("trainer.default_root_dir", "checkpoint.dirpath", compute_fn=_checkpoint_dir)
        # Keep the last k (by step) plus, in a second callback, the best by val/loss. Lightning deletes
        # an old checkpoint only after the new one is written (_save_checkpoint, then _remove_checkpoint).
        parser.set_defaults({"checkpoint.monitor": "step", "checkpoint.mode": "max", "checkpoint.save_top_k": 3})
        parser.add_lightning_class_args(ModelCheckpoint, "best_checkpoint")
        parser.set_defaults({"best_checkpoint.monitor": "val/loss", "best_checkpoint.mode": "min",
                             "best_checkpoint.save_top_k": 1, "best_checkpoint.filename": "best-step{step:07d}",
                             "best_checkpoint.auto_insert_metric_name": False})
        parser.link_arguments("trainer.default_root_dir", "best_checkpoint.dirpath", compute_fn=_checkpoint_dir)
        parser.add_lightning_class_args(EarlyStop, "early_stopping")
        # Lightning turns min_epochs=None into 1 when min_steps is set: `--trainer.min_steps 1000` would
        # hold an early stop back for a whole epoch. min_steps alone means min_steps here.
        parser.set_defaults({"trainer.min_epochs": 0})
        parser.add_lightning_class_args(FaultTolerance, "faults")
        parser.add_lightning_class_args(HFExport, "export")
        parser.add_lightning_class_args(ValidationReport, "report")
        parser.add_lightning_class_args(PredictionWriter, "predictions")
        parser.add_lightning_class_args(TrainMonitor, "monitor")
        parser.add_lightning_class_args(SampleLogger, "samples")
        parser.add_lightning_class_args(Preemption, "preemption")

    def _parse_ckpt_path(self) -> None:
        # Lightning would overwrite the config's `model` section with the hyperparameters stored in an
        # explicit --ckpt_path FILE (not for `last`/`auto`, which it cannot resolve): the user's
        # --model.* values (max_new_tokens, lr, ...) would be dropped silently. The config is the
        # spec, whatever the spelling; a checkpoint of another shape fails to load, naming it.
        sub = self.config.get("subcommand")
        ckpt_path = self.config[sub].get("ckpt_path") if sub and sub != "prepare" else None
        if ckpt_path and ckpt_path not in ("auto", "last", "best"):
            check_explicit_checkpoint(ckpt_path)  # missing/corrupt: one line, before anything else

    def before_instantiate_classes(self) -> None:
        self._templates: list[tuple[dict, str]] = []  # (logger init_args, its templated save_dir)
        if self.subcommand == "prepare":
            return  # writes nothing in the run folder
        config = self.config.get(str(self.subcommand), self.config)
        trainer = config.get("trainer", {})
        check_writable(trainer.get("default_root_dir"))
        check_strategy_precision(trainer.get("strategy"), trainer.get("precision"))
        loggers = trainer.get("logger")
        for logger in loggers if isinstance(loggers, list) else [loggers]:
            init = logger.get("init_args") if hasattr(logger, "get") else None
            save_dir = (init or {}).get("save_dir")
            if isinstance(save_dir, str) and "{default_root_dir}" in save_dir:
                # configs/quickstart.yaml's CSV folder follows --trainer.default_root_dir (a copied path stayed
                # behind: the metrics of every run, array tasks' too, went to runs/quickstart/logs). Put back
                # after instantiation: the saved config.yaml keeps the template, so rerun with another
                # --trainer.default_root_dir it logs there, not into this run's folder.
                self._templates.append((init, save_dir))
                init["save_dir"] = save_dir = save_dir.replace("{default_root_dir}", str(trainer.get("default_root_dir") or "."))
            if save_dir:  # the loggers create it only once training has started
                check_writable(str(save_dir), "trainer.logger.init_args.save_dir")

    def instantiate_classes(self) -> None:
        if self.subcommand == "prepare":
            # The two sections prepare needs, and no Trainer: an accelerator=gpu config must not need a
            # GPU here, nor start a process group or a logger's run.
            config = self.config["prepare"]
            self.datamodule = TokenBlockDataModule(**config.data.as_dict())
            self.datamodule.check_training_source()
            self.model = GPT2Module(**config.model.as_dict())
            self.model.check_block_size(self.datamodule.block_size)
            return
        super().instantiate_classes()
        for init, save_dir in self._templates:
            init["save_dir"] = save_dir  # the loggers have theirs; config.yaml (RunConfig) gets the template
        predicting = self.subcommand == "predict"  # needs a model and a tokenizer: no training data, no blocks
        if not predicting:
            self.datamodule.check_training_source()
        environment = self.trainer._accelerator_connector.cluster_environment
        if isinstance(environment, SLURMEnvironment):
            # srun's task count is the world size; a trainer that disagrees must not start (launch.py).
            check_srun_world(self.trainer.num_nodes, self.trainer.num_devices)
        else:
            check_srun_seen(type(environment).__name__)
        # Here, not only in configure_model: that runs after prepare_data has tokenized and packed the
        # whole corpus (minutes to hours on a large one) for a block size the model cannot take.
        if not predicting:
            self.model.check_block_size(getattr(self.datamodule, "block_size", None))

    def instantiate_trainer(self, **kwargs):
        try:
            return super().instantiate_trainer(**kwargs)
        except (ValueError, TypeError) as e:
            # Lightning's refusal of a trainer value (`--trainer.strategy ddp_notreal`, `--trainer.devices abc`,
            # `--trainer.accelerator cpuu`): a config error, one line, not a traceback with exit 1.
            import traceback

            frames = [f.filename.replace(os.sep, "/") for f in traceback.extract_tb(e.__traceback__)]
            if "/lightning/" not in frames[-1] or not any("/lightning/pytorch/trainer/connectors/" in f for f in frames):
                raise  # not Lightning checking the trainer's arguments: a bug, with its traceback
            first = next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)
            raise ConfigError(f"the trainer section: {first}; fix it (gpt2dist {self.subcommand} --help lists the "
                              "choices)") from None

    def before_fit(self) -> None:
        # Single-file checkpoints are written to a temporary name, fsynced and renamed (gpt2dist/faults.py).
        if type(self.trainer.strategy.checkpoint_io).__name__ == "TorchCheckpointIO":
            self.trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        _RUN.update(_run_info(self.trainer, self.datamodule, self.model), stage="fit")
        check_strategy_accelerator(self.trainer)
        check_validation_on_step_boundary(self.trainer)
        # Before the logger creates its W&B run: pick the run id a resume must continue.
        config = self.config.get(str(self.subcommand), self.config)
        # `auto`/`last`: the newest good checkpoint, ours or Lightning's hpc_ckpt_* (gpt2dist/resume.py).
        # `best`: the best_checkpoint file, then as an explicit file (a rollback to it; a requeue goes on
        # past it). Lightning's `best` knows no best in a new process and took the first callback's.
        root = self.trainer.default_root_dir
        environment = self.trainer._accelerator_connector.cluster_environment
        if self.trainer.is_global_zero and environment.local_rank() == 0 and environment.node_rank() == 0:
            # Rank 0 only (Lightning's launcher process itself, or srun's / torchrun's rank 0): a refusal
            # here ends the job before the others meet it (`srun --kill-on-bad-exit`, torchrun's agent).
            hold_run_folder(root)  # before the W&B run, the config file and the checkpoints are touched
        remove_stale_hpc_temporaries(root)  # before Lightning or we read the folder
        ckpt_path = config.get("ckpt_path")
        fresh = False
        if ckpt_path is None:  # slurm/fit.sbatch: auto, also over the `ckpt_path: null` of a print_config dump
            default = os.environ.get("GPT2DIST_DEFAULT_CKPT_PATH")
            ckpt_path, fresh = default or None, default == ""  # set empty: a fresh start, asked for
        if ckpt_path == "best":
            ckpt_path = self._best_checkpoint_file()
        slurm, restarts = SLURMEnvironment.detect(), int(os.environ.get("SLURM_RESTART_COUNT") or 0)
        first = recorded_start(root) if slurm and restarts > 0 else None
        if first is not None:  # requeued before train start: the folder's newest is still the other run's
            ckpt_path, fresh = first["ckpt_path"], first["fresh"]
            log.info("resume: SLURM requeue %d of a job that stopped before train start: it starts as first asked "
                     "(%s)", restarts, ckpt_path or "fresh")
        requested = ckpt_path
        ckpt_path = resolve_ckpt_path(ckpt_path, root, getattr(self.trainer.checkpoint_callback, "dirpath", None),
                                      restarts=0 if first is not None else None, fresh=fresh)
        if ckpt_path is None and fresh:
            no_hpc_autoload(self.trainer)  # else Lightning loads the folder's hpc_ckpt_* anyway
        if (slurm and (restarts == 0 or first is not None) and requested not in ("auto", "last", "hpc")
                and "://" not in str(root) and self.trainer.is_global_zero):
            record_start(root, ckpt_path, fresh)  # until FaultTolerance sets the other checkpoints aside
        self.config_init[str(self.subcommand)]["ckpt_path"] = ckpt_path  # what trainer.fit receives
        check_checkpoint_fits_strategy(ckpt_path, self.trainer.strategy, self.trainer.world_size)
        for cb in self.trainer.callbacks:
            if isinstance(cb, FaultTolerance) and (ckpt_path is None or os.path.exists(ckpt_path)):
                cb.fit_ckpt_path = ckpt_path  # Lightning's own `hpc`/`best` stay "unknown": nothing is set aside
        progress = checkpoint_progress(ckpt_path) if ckpt_path and os.path.exists(ckpt_path) else None
        self._export_after_skipped_fit = None
        if progress and 0 < self.trainer.max_steps <= progress[0]:
            # Lightning would only print "max_steps reached" and exit 0: say why nothing trains.
            export = next((cb for cb in self.trainer.callbacks if isinstance(cb, HFExport) and cb.enabled), None)
            missing = export is not None and not (Path(self.trainer.default_root_dir) / export.dirname).exists()
            # The fit loop does not run, nor HFExport (on_train_end): a run killed while exporting never got one.
            self._export_after_skipped_fit = ((ckpt_path, progress[0]), export) if missing else None
            rank_zero_warn(f"resume: {ckpt_path} is at step {progress[0]}, already at trainer.max_steps="
                           f"{self.trainer.max_steps}: nothing left to train; raise trainer.max_steps to continue"
                           + ("; its Hugging Face export is missing (killed while exporting?): it is written from the "
                              "checkpoint" if missing else ""))
        prepare_wandb(self.trainer, ckpt_path)
        start_wandb_runs(self.trainer)  # W&B's refusals before data preparation, not after


    def after_fit(self) -> None:
        """The export a fit with nothing left to train skipped (see before_fit): from the checkpoint it resumed,
        or under export.source=best from the best file, on rank 0."""
        pending = getattr(self, "_export_after_skipped_fit", None)
        if not pending or not self.trainer.is_global_zero:
            return
        (ckpt_path, step), export = pending
        source = ckpt_path
        if export.source == "best":
            cb = self.config_init[str(self.subcommand)]["best_checkpoint"]
            try:  # up to the resumed step: after a rollback, later best files are the abandoned branch's
                source = best_checkpoint(cb.dirpath, cb.filename, cb.monitor, cb.mode, max_step=step)
            except CheckpointError as e:
                rank_zero_warn(f"export.source=best: {e}; exporting {ckpt_path}")
        out = Path(self.trainer.default_root_dir) / export.dirname
        tokenizer = getattr(self.datamodule, "tokenizer", None)
        export_checkpoint(source, out, tokenizer=getattr(tokenizer, "name_or_path", None))
        rank_zero_info(f"exported Hugging Face model to {out} from {source}")

    def _best_checkpoint_file(self) -> str:
        """`--ckpt_path best`: the file of the best_checkpoint callback with the best stored score."""
        cb = self.config_init[str(self.subcommand)]["best_checkpoint"]  # instantiated: its dirpath link is resolved
        return best_checkpoint(cb.dirpath, cb.filename, cb.monitor, cb.mode)

    def _before_eval(self) -> None:
        """validate / test / predict: `--ckpt_path last|auto|best` resolved as for fit (gpt2dist/resume.py)."""
        check_strategy_accelerator(self.trainer)  # as for fit: Lightning's own refusal is a traceback
        sub = str(self.subcommand)
        config = self.config.get(sub, self.config)
        cb = self.config_init[sub]["best_checkpoint"]  # the instantiated callback: its dirpath link is resolved
        ckpt_path = resolve_eval_ckpt_path(
            sub, config.get("ckpt_path"), self.trainer.default_root_dir,
            getattr(self.trainer.checkpoint_callback, "dirpath", None),
            best={"dirpath": cb.dirpath, "filename": cb.filename, "monitor": cb.monitor, "mode": cb.mode})
        self.config_init[sub]["ckpt_path"] = ckpt_path
        check_checkpoint_fits_strategy(ckpt_path, self.trainer.strategy, self.trainer.world_size, sub)
        if is_deepspeed_folder(ckpt_path) and not isinstance(self.trainer.strategy, DeepSpeedStrategy):
            # One process or DDP (what check_checkpoint_fits_strategy lets through): Lightning would torch.load a folder.
            self.trainer.strategy.checkpoint_io = DeepSpeedFolderIO()
        hp = self.model.hparams  # what an out-of-memory message of this stage reports
        _RUN.update(_run_info(self.trainer, self.datamodule, self.model), stage=sub,
                    predict_batch_size=getattr(self.datamodule, "predict_batch_size", None),
                    samples_per_prompt=hp.get("samples_per_prompt"), max_new_tokens=hp.get("max_new_tokens"))
        check_wandb_init(self.trainer)
        wandb_dir_in_run_folder(self.trainer)  # not the working directory (README: <dir>/wandb/)
        if ckpt_path is None and getattr(self.model.hparams, "from_scratch", False):
            rank_zero_warn(f"gpt2dist {sub}: model.from_scratch is true and no --ckpt_path is given, so this "
                           f"evaluates a randomly initialised model; pass --ckpt_path last (or best, or a file)")

    before_validate = before_test = before_predict = _before_eval

    def _run_subcommand(self, subcommand: str) -> None:
        if subcommand != "prepare":
            return super()._run_subcommand(subcommand)
        data, model = self.datamodule, self.model
        start = time.perf_counter()
        data.load_tokenizer()
        model.resolve_config(data)  # the model's checks of fit (vocabulary, block size), before any tokenizing
        cached = data.is_prepared()
        data.prepare_data()
        data.setup("fit")
        print("\n".join(data.describe()))
        print(_epoch_line(data, self.config["prepare"]["trainer"]))
        how = "found in the cache" if cached else f"prepared in {time.perf_counter() - start:.1f} s"
        print(f"gpt2dist prepare: {how}; `gpt2dist fit` with these arguments reads it without tokenizing", flush=True)


def _epoch_line(data: TokenBlockDataModule, trainer) -> str:
    """What one epoch of these blocks is in optimizer steps at the trainer's world size, and what
    trainer.max_steps amounts to: the number to set max_steps by (and to see overfitting coming)."""
    devices = len(trainer.devices) if isinstance(trainer.devices, (list, tuple)) else trainer.devices
    if isinstance(devices, str) and "," in devices:  # Lightning's device ids: "0,1" is 2 devices, "3," is one
        devices = len([d for d in devices.split(",") if d.strip()])
    devices = int(devices) if isinstance(devices, str) and devices.isdigit() else devices
    if not isinstance(devices, int) or devices < 1:  # "auto", -1: only the machine that runs fit knows
        return (f"steps per epoch: trainer.devices={trainer.devices!r} is not a count here; pass --trainer.devices N "
                "(and --trainer.num_nodes) for them")
    world, accum = trainer.num_nodes * devices, trainer.accumulate_grad_batches
    steps = data.optimizer_steps_per_epoch(world, accum)
    seqs = data.batch_size * accum * world
    line = (f"one epoch = {steps:,} optimizer steps of {data.batch_size} seqs x {accum} accum x {world} process(es) "
            f"= {seqs:,} seqs x {data.block_size} tokens = {seqs * data.block_size:,} tokens/step")
    if trainer.max_steps and trainer.max_steps > 0:
        line += f"; trainer.max_steps={trainer.max_steps:,} is {trainer.max_steps / steps:.2f} epochs"
    return line


_RUN: dict = {}  # what an out-of-memory message reports (filled before fit / validate / test / predict)


def _resume_hint() -> str:
    root = _RUN.get("root")
    if root is None or _RUN.get("stage") != "fit":  # not a fit (an evaluation has nothing to resume), or not begun
        return ""
    try:
        found = newest_checkpoint(root, _RUN.get("checkpoint_dir"))
    except GPT2DistError:
        found = None
    if found is None:
        return f"no checkpoint in {root} yet: rerun from the start"
    return f"the newest checkpoint is {found[0]} (step {found[1][0]}): resume with --ckpt_path last"


def _run_info(trainer, datamodule, model) -> dict:
    return {"root": trainer.default_root_dir, "checkpoint_dir": getattr(trainer.checkpoint_callback, "dirpath", None),
            "batch_size": getattr(datamodule, "batch_size", None), "block_size": getattr(datamodule, "block_size", None),
            "accumulate": trainer.accumulate_grad_batches, "strategy": type(trainer.strategy).__name__,
            "world_size": trainer.world_size, "model": getattr(model.hparams, "model_name_or_path", "gpt2"),
            "precision": str(trainer.precision), "compile": bool(getattr(model.hparams, "compile", False)),
            "pad_vocab": int(getattr(model.hparams, "pad_vocab_to_multiple_of", 1) or 1),
            "config_overrides": getattr(model.hparams, "config_overrides", None), "gpu_mem_gb": _gpu_mem_gb(trainer)}


def _gpu_mem_gb(trainer) -> float | None:
    """The card's memory in GB (1e9 bytes, plan.py's unit), for the OOM message's plan command."""
    device = getattr(trainer.strategy, "root_device", None)
    if device is None or device.type != "cuda":
        return None
    return round(torch.cuda.get_device_properties(device).total_memory / 1e9, 1)


def _deepspeed_logs_to_stderr() -> None:
    """DeepSpeed's logger writes to the sys.stdout of its import (its accelerator line among the first):
    imported with stdout pointed at stderr, its lines stay out of --print_config's output, a config file."""
    import contextlib
    import importlib.util

    if importlib.util.find_spec("deepspeed") is not None:
        with contextlib.redirect_stdout(sys.stderr):
            import deepspeed  # noqa: F401


def _wandb_run():
    """The W&B run in progress in this process, if wandb is imported at all (never imported here)."""
    wandb = sys.modules.get("wandb")
    return getattr(wandb, "run", None) if wandb is not None else None


def _run_cli(args: list[str] | None) -> None:
    """The CLI run, with each known failure turned into one line and its exit code."""
    try:
        cli = GPT2CLI(
            GPT2Module,
            TokenBlockDataModule,
            # The DataModule shards data itself (same global batch whatever the world size);
            # Lightning's auto DistributedSampler would reshuffle it.
            trainer_defaults={"use_distributed_sampler": False},
            save_config_callback=RunConfig,  # also logs the resolved config to W&B / hparams.yaml
            save_config_kwargs={"overwrite": True},
            parser_class=GPT2ArgumentParser,
            auto_configure_optimizers=False,  # GPT2Module owns its AdamW groups and schedule
            args=args,
        )
        trainer = getattr(cli, "trainer", None)
        for cb in trainer.callbacks if trainer is not None else []:
            msg = cb.stopped_message(trainer.global_step) if isinstance(cb, Preemption) else None
            if msg:
                # Preempted and not requeued: exit 0 would mark the unfinished job COMPLETED (and start
                # `afterok` dependents); 128 + SIGUSR1, as the shell reports a process it killed.
                print(f"gpt2dist: error: {msg}", file=sys.stderr, flush=True)
                sys.exit(128 + signal.SIGUSR1)
    except GPT2DistError as e:
        print(f"gpt2dist: error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    except MisconfigurationException as e:
        # Lightning's own refusals (e.g. DeepSpeed or FSDP1 with accelerator=cpu) are config errors too.
        print(f"gpt2dist: error: {str(e).splitlines()[0]}", file=sys.stderr, flush=True)
        sys.exit(2)
    except torch.OutOfMemoryError:
        print(f"gpt2dist: error: {oom_message(_RUN)}", file=sys.stderr, flush=True)
        sys.exit(3)
    except RequeueStop as e:
        # SLURM's preemption signal during fit's validation: saved (and requeued) after a validation batch.
        if e.message:
            print(f"gpt2dist: error: {e.message}", file=sys.stderr, flush=True)
        sys.exit(e.code)
    except SIGTERMException:
        # Lightning stops at the end of the batch with a SystemExit of code 0: a killed run must not
        # look like a finished one to `fit && upload`, schedulers or CI (128 + 15, as the shell says).
        hint = _resume_hint()
        print(f"gpt2dist: error: stopped by SIGTERM before the end{'; ' + hint if hint else ''}", file=sys.stderr, flush=True)
        sys.exit(143)
    except Exception as e:
        # W&B's own refusals (not logged in, no network: CommError after its init timeout) are the
        # environment's, not a bug: one line with the ways out, not wandb's traceback. So is Lightning's
        # refusal of a validation interval longer than the epoch, found once the data is loaded.
        msg = wandb_error_message(e) or _val_interval_error(e)
        if msg is None:
            raise
        print(f"gpt2dist: error: {msg}", file=sys.stderr, flush=True)
        sys.exit(2)


def _val_interval_error(e: Exception) -> str | None:
    m = re.search(r"`val_check_interval` \((\d+)\) must be less than or equal to the number of the training "
                  r"batches \((\d+)\)", str(e)) if isinstance(e, ValueError) else None
    if m is None:
        return None
    return (f"trainer.val_check_interval={m[1]} micro-batches is more than an epoch's {m[2]} (per process); lower it, "
            f"or set trainer.check_val_every_n_epoch=null to count it across epochs (max_steps runs)")


def main(args: list[str] | None = None) -> None:
    # Workers never tokenize, so the Rust pool may stay on after fork (and not warn about it).
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    # Known-noisy deprecations from torchdata / Lightning internals, not actionable by users.
    warnings.filterwarnings("ignore", message=".*set_vital.*")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("gpt2dist").setLevel(logging.INFO)
    # Under SLURM a requeue signal (SIGUSR1) may come during start-up, whose default action kills us.
    install_early_handler()
    if any(a.startswith("--print_config") for a in (sys.argv[1:] if args is None else args)):
        _deepspeed_logs_to_stderr()
    # The W&B run's id and folder go to wandb.init through the environment (tracking.prepare_wandb), and
    # Lightning's WandbLogger(offline=True) sets WANDB_MODE=dryrun: set back as they were after this run, or a
    # second main() in the process (a notebook, a sweep script) logged into the first one's W&B run, or at
    # least its folder, or offline when it was meant to go online.
    wandb_env = {k: os.environ.get(k) for k in ("WANDB_RUN_ID", "WANDB_DIR", "WANDB_MODE")}
    wandb_run_before = _wandb_run()
    leaving = None  # the exception this call ends with; not sys.exc_info(), which sees a caller's `except` block
    try:
        _run_cli(args)
    except BaseException as e:
        leaving = e
        raise
    finally:
        release_run_folders()
        # Lightning never finishes the W&B run it started, and a later WandbLogger in this process reuses a run
        # in progress: the second main()'s metrics went to the first's run. A run someone else started (a W&B
        # sweep agent's wandb.init around main()) is theirs to finish.
        run = _wandb_run()
        if run is not None and run is not wandb_run_before:
            # The exit code W&B's own exit hook would have seen: 0 (finished, or requeued to go on), else failed.
            code = 0 if leaving is None else (leaving.code or 0) if isinstance(leaving, SystemExit) else 1
            try:
                run.finish(exit_code=code if isinstance(code, int) else 1)
                if wandb_run_before is None:
                    # W&B reads its environment once per session ("changes ... will be ignored because your wandb
                    # session has already started"): ended, the next main()'s run id and folder count.
                    sys.modules["wandb"].teardown()
            except Exception as e:  # an upload that fails must not replace the run's own exit code or error
                print(f"gpt2dist: warning: W&B could not finish the run ({type(e).__name__}: "
                      f"{scrub(str(e).splitlines()[0][:200]) if str(e) else ''})", file=sys.stderr, flush=True)
        for k, v in wandb_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        # Tear the process group down before interpreter exit: a gloo group left to the atexit
        # handlers sometimes aborts the rank whose peer exited first (seen ~1 in 8 two-node runs).
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
