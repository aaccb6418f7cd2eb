"""Resume after preemption: which checkpoint to load, and a requeue checkpoint taken at a step boundary.

Checkpoint choice (`resolve_ckpt_path`, applied by the CLI before `fit`):

- `--ckpt_path auto` (slurm/fit.sbatch's default, GPT2DIST_DEFAULT_CKPT_PATH): the newest *good* checkpoint among Lightning's
  requeue checkpoints `<default_root_dir>/hpc_ckpt_*.ckpt` and ours in `<default_root_dir>/checkpoints/`
  (`last.ckpt`, `step*.ckpt`); none: start fresh. "Newest" is the training progress stored inside
  each file (global_step), never the file name or mtime; "good" means the file loads (a checkpoint
  cut short by a kill is skipped with a warning naming it and the checkpoint used instead). Same step: the requeue checkpoint wins, then
  more batches seen, then the name, so every rank picks the same file.
- `--ckpt_path last`: the same choice, but no checkpoint at all is an error. Lightning alone would
  take the newest `last.ckpt` by mtime and ignore a newer `hpc_ckpt_*`.
- No `--ckpt_path` under SLURM: Lightning would silently resume from the highest-numbered
  `hpc_ckpt_*` even when a `last.ckpt` saved after it holds more progress (its known "HPC
  checkpoint takes priority over last" trap); we resolve that case like `auto`. So is a requeued
  job's (SLURM_RESTART_COUNT > 0), whose preemption (SIGTERM), node failure or `scontrol requeue`
  left no `hpc_ckpt_*`: it continues the run's own checkpoints, never starts over.
- Any other value (a path, `hpc`, `best`) goes to Lightning unchanged, after a local path is checked:
  missing or incomplete stops with one line naming it (`check_explicit_checkpoint`). Except in a
  requeued SLURM job (SLURM_RESTART_COUNT > 0), which runs the same command line again: a local
  file is where the job started, so a run-folder checkpoint with more steps (the preemption's
  hpc_ckpt_*) is taken instead; otherwise every requeue would redo the work since that file.
- A fit that starts behind the folder's newest checkpoint (fresh, a rollback to an older one, or
  another folder's) first moves what `auto`/`last` would prefer over its own checkpoints into
  `checkpoints/set-aside-*/` (`set_aside_other_runs`, called by FaultTolerance.on_train_start).
  Until then a SLURM job keeps its start in `<default_root_dir>/.gpt2dist-start.json`
  (`record_start`): requeued before train start (preempted in data preparation), it starts as
  first asked, not from the folder's newest checkpoint, which is still the other run's.

One fit per run folder: rank 0 holds a lock on `<default_root_dir>/.gpt2dist-lock` from before fit
(`hold_run_folder`, before the W&B run, the config file or any checkpoint is touched) until it ends.
A second fit in that folder (the same job submitted twice) would set the first one's checkpoints
aside, overwrite its last.ckpt and resume its steps; it stops with one line naming the holder instead.

Every rank resolves the choice itself, so a fit on 2+ ranks first checks that all of them see one run
folder and resume the same step (`check_ranks_share_the_run`, from FaultTolerance.setup): a node-local
default_root_dir would otherwise let one node resume while another starts fresh.

Stop signals (SLURM's SIGUSR1, SIGTERM) are handled in `gpt2dist/preemption.py`.
"""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import pickle
import re
import shutil
import socket
import time
import uuid
from pathlib import Path

import torch
from lightning.pytorch.plugins.environments import SLURMEnvironment
from lightning.pytorch.plugins.io import TorchCheckpointIO

from gpt2dist.errors import CheckpointError, ConfigError

log = logging.getLogger(__name__)


UNSAFE = "it holds objects that only a full unpickle reads, which could run code, and gpt2dist never saves them"


def deepspeed_classes(folder: str | Path, files: list[Path]) -> list[type]:
    """The classes of DeepSpeed's own that its state files pickle (a loss scaler, the ZeRO stage enum),
    to allow for a weights-only load. Any other global (a function such as os.system) could run code:
    CheckpointError naming it, before anything is unpickled. torch lists them without unpickling."""
    import importlib

    allowed = []
    for f in files:
        try:
            names = torch.serialization.get_unsafe_globals_in_checkpoint(f)
        except Exception as e:  # cut short (a full disk, an interrupted copy), or not torch's zip format
            raise CheckpointError(f"DeepSpeed checkpoint {folder}: {f.name} is truncated or corrupt ({type(e).__name__}: "
                                  f"{str(e).splitlines()[0][:120]}); use an earlier checkpoint") from None
        for name in names:
            module, _, attr = name.rpartition(".")
            obj = None
            if module.startswith("deepspeed."):
                try:
                    obj = getattr(importlib.import_module(module), attr)
                except (ImportError, AttributeError) as e:  # another DeepSpeed version's class
                    raise CheckpointError(f"DeepSpeed checkpoint {folder}: {f.name} needs {name}, which this DeepSpeed "
                                          f"cannot import ({type(e).__name__}); load it with the DeepSpeed that saved it") from None
            # A class of DeepSpeed's own: not a function, nor a class it merely imports (multiprocessing's).
            if not (isinstance(obj, type) and obj.__module__.startswith("deepspeed.")):
                raise CheckpointError(f"DeepSpeed checkpoint {folder}: {f.name} needs {name} to load, which neither "
                                      f"gpt2dist nor DeepSpeed saves and which could run code; it is not loaded")
            allowed.append(obj)
    return allowed


class _Refused(pickle.UnpicklingError):
    """A global that a sharded folder's .metadata may not load (not a truncated pickle)."""


class _DistcpMetadataUnpickler(pickle.Unpickler):
    """A sharded folder's `.metadata`: a plain pickle, which torch's FileSystemReader (under Lightning's resume
    and its export) unpickles in full. Here only what torch writes there loads: the data classes of
    torch.distributed.checkpoint.metadata, its _StorageInfo, dtypes, torch.Size, layouts and paths."""

    _OTHERS = {("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
               ("torch.serialization", "_get_layout"), ("collections", "OrderedDict"),
               ("pathlib", "Path"), ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"),
               ("pathlib", "PurePosixPath"), ("pathlib", "PureWindowsPath")}

    def find_class(self, module: str, name: str):
        if module == "torch.distributed.checkpoint.metadata":
            import torch.distributed.checkpoint.metadata as dcp_metadata

            obj = getattr(dcp_metadata, name, None)
            if isinstance(obj, type) and obj.__module__ == module:  # a class of its own, not one it imports
                return obj
        elif module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        elif (module, name) in self._OTHERS:
            return super().find_class(module, name)
        raise _Refused(f"{module}.{name}")


def read_distcp_metadata(folder: str | Path):
    """The `.metadata` of a sharded checkpoint folder, unpickled with only torch's own metadata types allowed:
    CheckpointError (UNSAFE, naming the global) for anything else, before it is called."""
    path = Path(folder) / ".metadata"
    try:
        with open(path, "rb") as f:
            return _DistcpMetadataUnpickler(f).load()
    except _Refused as e:
        raise CheckpointError(f"sharded checkpoint {folder}: .metadata needs {e} to load; {UNSAFE}, so it is not "
                              f"loaded") from None
    except Exception as e:  # empty or cut short by a kill
        raise CheckpointError(f"sharded checkpoint {folder} cannot be read (.metadata: {type(e).__name__}: "
                              f"{str(e).splitlines()[0][:120] if str(e) else ''}); it may be truncated: use an "
                              f"earlier checkpoint") from None


def _meta(path: str | Path) -> tuple[dict | None, str]:
    """(Lightning's checkpoint dict, memory-mapped: tensors are read only when touched, "") or
    (None, why it cannot be read). Sharded folders: the rank-0 file that holds the trainer state."""
    p = Path(path)
    meta, tag = p, None  # a checkpoint in the run folder must not run code just by being looked at
    if p.is_dir() and (p / "latest").is_file():
        # A DeepSpeed folder: Lightning's progress is in the client state of <tag>/*model_states.pt.
        states = sorted((p / (p / "latest").read_text().strip()).glob("*model_states.pt"))
        if not states:
            return None, "DeepSpeed checkpoint folder without <tag>/*model_states.pt (incomplete)"
        meta, tag = states[0], states[0].parent
    elif p.is_dir():
        if not (p / ".metadata").is_file() or not any(p.glob("*.distcp")):
            return None, "sharded checkpoint folder without .metadata or *.distcp shards (incomplete)"
        meta = p / "meta.pt"
    try:
        # Lightning resumes single files and meta.pt with weights_only=True: a file only a full unpickle
        # reads is one it cannot resume from, so it is "unreadable" here too, not picked by `auto`.
        # DeepSpeed's state files: weights-only too, allowing DeepSpeed's own classes and nothing else
        # (DeepSpeed unpickles them in full when it resumes, so a folder must pass here first).
        # Every file of the tag (DeepSpeed's resume reads them all in full), not only the one read here.
        allowed = deepspeed_classes(p, sorted(tag.glob("*.pt"))) if tag else []
        if p.is_dir() and tag is None:
            read_distcp_metadata(p)  # Lightning's resume unpickles it in full: it must pass here first
        with torch.serialization.safe_globals(allowed):
            ckpt = torch.load(meta, map_location="cpu", weights_only=True, mmap=True)
        int(ckpt["global_step"])
    except CheckpointError as e:  # a DeepSpeed file's globals refused, unread: in full, it is not a truncation
        return None, str(e)
    except Exception as e:  # truncated by a kill, not a checkpoint, ...
        if "Weights only load failed" in str(e):
            return None, UNSAFE  # in full: the reason is not a truncation
        return None, f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
    return ckpt, ""


def _progress(path: str | Path) -> tuple[tuple[int, int] | None, str]:
    """((global_step, batches seen), "") or (None, why it cannot be read)."""
    ckpt, why = _meta(path)
    if ckpt is None:
        return None, why
    step = int(ckpt["global_step"])
    try:
        batches = int(ckpt["loops"]["fit_loop"]["epoch_loop.batch_progress"]["total"]["completed"])
    except (KeyError, TypeError):
        batches = 0
    return (step, batches), ""


def checkpoint_progress(path: str | Path) -> tuple[int, int] | None:
    """(global_step, training batches seen) stored in a checkpoint file or distributed-checkpoint
    folder (its meta.pt); None when it cannot be read."""
    prog, why = _progress(path)
    if prog is None:
        log.warning("skipping unreadable checkpoint %s (%s)", path, why)
    return prog


def candidate_checkpoints(root_dir: str | Path, checkpoint_dir: str | Path | None) -> list[Path]:
    """Lightning's requeue checkpoints in root_dir and ModelCheckpoint's in checkpoint_dir."""
    found = sorted(Path(root_dir).glob("hpc_ckpt_*.ckpt"))
    if checkpoint_dir and Path(checkpoint_dir).is_dir():
        found += sorted(p for p in Path(checkpoint_dir).glob("*.ckpt") if not p.name.startswith("."))
    return found


def lightning_hpc_checkpoint(root_dir: str | Path | None) -> Path | None:
    """What Lightning's `--ckpt_path hpc` loads: the hpc_ckpt_N.ckpt in root_dir with the largest N."""
    if not root_dir or not Path(root_dir).is_dir():
        return None
    found = [(int(m.group(1)), p) for p in Path(root_dir).glob("hpc_ckpt_*.ckpt")
             if (m := re.fullmatch(r"hpc_ckpt_(\d+)\.ckpt", p.name))]
    return max(found)[1] if found else None


def newest_checkpoint(root_dir: str | Path, checkpoint_dir: str | Path | None) -> tuple[Path, tuple[int, int]] | None:
    """The good checkpoint with the highest global_step (ties: hpc_ckpt first, then batches seen, then
    the name); None if none."""
    found = candidate_checkpoints(root_dir, checkpoint_dir)
    scored = [(prog, p) for p in found if (prog := checkpoint_progress(p)) is not None]
    if found and not scored:
        raise CheckpointError(f"no readable checkpoint among {[str(p) for p in found]}: move them away to "
                              f"start fresh, or pass --ckpt_path PATH")
    if not scored:
        return None
    prog, path = max(scored, key=lambda t: _rank(*t))
    return path, prog


def _rank(prog: tuple[int, int], path: Path) -> tuple:
    # At the same optimizer step the requeue checkpoint wins: it was taken at that step's boundary,
    # while a ModelCheckpoint save at the same step may count one more batch (its hooks run later).
    return prog[0], path.name.startswith("hpc_ckpt_"), prog[1], path.name


def set_aside_other_runs(ckpt_path: str | None, root_dir: str | Path, checkpoint_dir: str | Path | None) -> tuple[Path, list[Path]] | None:
    """Move the checkpoints that `--ckpt_path last|auto` would choose over this fit's own into
    `<checkpoint_dir>/set-aside-<UTC time>/` (nothing is deleted), before the fit writes any.

    `last`/`auto` go by stored step, so an earlier run's files would otherwise win: all of them on a
    fresh start (or a start from another folder's checkpoint), and, on a rollback to an older
    checkpoint of this run, the abandoned continuation past it, until this fit saves a later step,
    and for good if it is killed before that. Unreadable files stay (never chosen). Call on one rank.
    Returns (the folder, what moved), or None when nothing had to move.
    """
    if not checkpoint_dir or not Path(checkpoint_dir).is_dir():
        return None
    ck, root = Path(checkpoint_dir), Path(root_dir)
    start = None  # the rank of the checkpoint this fit starts from, when it is one of this run's
    if ckpt_path and os.path.exists(ckpt_path):
        ckpt = Path(ckpt_path).resolve()
        prog = _progress(ckpt)[0]
        if prog is not None and ckpt.parent in (ck.resolve(), root.resolve()):
            start = _rank(prog, ckpt)
    ahead = []
    for path in candidate_checkpoints(root, ck):
        prog = _progress(path)[0]
        if prog is not None and path.resolve() != (Path(ckpt_path).resolve() if ckpt_path else None) and (
                start is None or _rank(prog, path)[:3] > start[:3]):  # same step and batches: the same state
            ahead.append(path)
    if not ahead:
        return None
    # A folder of its own, also for a second set-aside in the same second (it would replace the files
    # of the first, or fail on a sharded folder of the same name).
    stamp, n = time.strftime("set-aside-%Y%m%dT%H%M%SZ", time.gmtime()), 1
    dest = ck / stamp
    while True:
        try:
            dest.mkdir()
            break
        except FileExistsError:
            n += 1
            dest = ck / f"{stamp}-{n}"
    for path in ahead:
        os.replace(path, dest / path.name)
    return dest, ahead


def prune_requeue_checkpoints(root_dir: str | Path, keep: str | Path) -> list[Path]:
    """Delete the requeue checkpoints `hpc_ckpt_*.ckpt` in root_dir that `keep` (the one just saved)
    supersedes: Lightning never deletes them, so a long run left one full checkpoint (weights and
    optimizer state) per preemption. Returns what was deleted."""
    kept, _ = _progress(keep)
    if kept is None:
        return []  # the new one does not load: keep every older one
    gone = []
    for p in Path(root_dir).glob("hpc_ckpt_*.ckpt"):
        if p == Path(keep):
            continue
        prog, _ = _progress(p)
        if prog is not None and prog > kept:
            continue  # more progress than the new one (not this run's): not ours to delete
        shutil.rmtree(p) if p.is_dir() else p.unlink()
        gone.append(p)
    if gone:
        log.info("preemption: deleted %s, superseded by %s", ", ".join(p.name for p in sorted(gone)), Path(keep).name)
    return gone


def resolve_ckpt_path(ckpt_path: str | None, root_dir: str | Path, checkpoint_dir: str | Path | None,
                      slurm: bool | None = None, restarts: int | None = None, fresh: bool = False) -> str | None:
    """The `fit` ckpt_path to hand to Lightning (see the module docstring); `restarts`: SLURM_RESTART_COUNT.
    `fresh`: the user asked for a fresh start (GPT2DIST_DEFAULT_CKPT_PATH set empty): None on the job's
    first start even where hpc_ckpt_* files would make a SLURM job resume (the caller then keeps
    Lightning from loading them: `no_hpc_autoload`); a requeue goes on from the run's newest."""
    slurm = SLURMEnvironment.detect() if slurm is None else slurm
    restarts = int(os.environ.get("SLURM_RESTART_COUNT") or 0) if restarts is None else restarts
    if ckpt_path is None and fresh and restarts == 0:
        return None
    if ckpt_path is None and not (slurm and (restarts > 0 or list(Path(root_dir).glob("hpc_ckpt_*.ckpt")))):
        return None
    if ckpt_path not in (None, "auto", "last"):
        check_explicit_checkpoint(ckpt_path, root_dir)
        if slurm and restarts > 0 and os.path.exists(ckpt_path):
            return _requeued_from(ckpt_path, root_dir, checkpoint_dir, restarts)
        return ckpt_path
    best = newest_checkpoint(root_dir, checkpoint_dir)
    if best is None:
        if ckpt_path == "last":
            raise CheckpointError(f"--ckpt_path last: no checkpoint in {checkpoint_dir} or {root_dir}/hpc_ckpt_*.ckpt; "
                                  f"check trainer.default_root_dir, or drop --ckpt_path to start fresh")
        log.info("resume: no checkpoint in %s, starting fresh", root_dir)
        return None
    path, (step, batches) = best
    # Say so when a newer-looking file was skipped (e.g. last.ckpt cut short by a non-atomic writer).
    skipped = [p for p in candidate_checkpoints(root_dir, checkpoint_dir) if p != path and _progress(p)[0] is None]
    for p in skipped:
        log.warning("resume: %s is incomplete or corrupt (%s); falling back to %s (global_step %d), the newest "
                    "complete checkpoint", p, _progress(p)[1], path, step)
    log.info("resume: %s (global_step %d, %d batches seen) chosen by --ckpt_path %s", path, step, batches,
             ckpt_path or "auto (none given: a SLURM job's default)")
    return str(path)


START_RECORD = ".gpt2dist-start.json"


RUN_LOCK = ".gpt2dist-lock"
_HELD: dict[str, int] = {}  # run folder -> the open lock file this process holds a lock through


def slurm_job_id() -> str | None:
    """This SLURM job's id as scontrol takes it: `123`, or `123_4` for task 4 of an array job."""
    array = os.environ.get("SLURM_ARRAY_JOB_ID")
    if array and os.environ.get("SLURM_ARRAY_TASK_ID"):
        return f"{array}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return os.environ.get("SLURM_JOB_ID") or None


def _job() -> str | None:
    if slurm_job_id():
        return f"SLURM job {slurm_job_id()}"
    return f"torchrun {os.environ['TORCHELASTIC_RUN_ID']}" if os.environ.get("TORCHELASTIC_RUN_ID") else None


def hold_run_folder(root_dir: str | Path) -> None:
    """Rank 0 of a fit: lock `<root_dir>/.gpt2dist-lock` for as long as this process fits there; another
    fit holding it is a ConfigError naming it. A POSIX lock (fcntl): the kernel drops it when the
    process ends, however it ends (SIGKILL included); forked data workers do not inherit it; NFS's lock
    manager shares it across nodes. A crashed node's lock can outlive it on NFS (until its lease ends,
    or the node reboots): a requeued SLURM job that finds its own earlier run holding it (SLURM ends a
    job before requeuing it) takes the lock over on a fresh file. A filesystem without locks (Lustre
    mounted without `flock`) gets a warning and no check; node-local locks (NFS `nolock`, Lustre
    `localflock`) guard one node only. Closing any descriptor of the file drops a POSIX lock, so this
    process never opens it twice. The holder removes the file when it ends (release_run_folders)."""
    if "://" in str(root_dir) or os.name == "nt":
        return
    import fcntl

    root = Path(root_dir).expanduser().resolve()
    if str(root) in _HELD:
        return
    root.mkdir(parents=True, exist_ok=True)
    path = root / RUN_LOCK
    took_over = False
    for _ in range(10):
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:  # the folder itself was checked writable before (check_writable)
            log.warning("cannot open %s (%s): a second fit in this run folder at the same time is not detected",
                        path, e.strerror or e)
            return
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            held = e.errno in (errno.EACCES, errno.EAGAIN)
            holder = os.pread(fd, 4096, 0).decode(errors="replace") if held else ""
            os.close(fd)
            if not held:
                log.warning("cannot lock %s (%s): this filesystem has no file locks, so a second fit in this run "
                            "folder at the same time is not detected", path, e.strerror or e)
                return
        else:
            try:
                current = os.stat(path).st_ino
            except FileNotFoundError:
                current = None
            if current == os.fstat(fd).st_ino:
                break
            os.close(fd)  # its holder removed that file as it ended (or a takeover replaced it): try the name again
            continue
        try:
            h = json.loads(holder)
            who = ", ".join(x for x in (f"pid {h['pid']} on {h['host']}", h.get("job"), f"since {h['since']}") if x)
        except (ValueError, KeyError, TypeError):
            h, who = {}, "its process is still starting"
        restarts = int(os.environ.get("SLURM_RESTART_COUNT") or 0)
        if not took_over and restarts > 0 and _job() and h.get("job") == _job():
            # This job's own earlier run, ended by SLURM before this requeue: a lock left by its crashed
            # node. A fresh file under the name is a new lock (the stale one stays on the old file).
            log.warning("run folder lock %s is still held by this job's earlier run (%s), which SLURM ended before "
                        "requeue %d (a crashed node's lock): taking it over", path, who, restarts)
            tmp = root / f"{RUN_LOCK}.tmp-{os.getpid()}"
            tmp.write_text("")
            os.replace(tmp, path)
            took_over = True
            continue
        raise ConfigError(f"run folder {root} is in use by another fit ({who}): two fits in one folder set aside, "
                          "overwrite and resume each other's checkpoints; wait for it to end or stop it, or set "
                          f"trainer.default_root_dir to another folder (if it is no longer running, its node crashed: "
                          f"remove {path})") from None
    else:
        log.warning("could not lock %s: it was replaced 10 times while locking; a second fit in this run folder at "
                    "the same time is not detected", path)
        return
    record = {"host": socket.gethostname(), "pid": os.getpid(), "job": _job(),
              "since": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(record).encode(), 0)
    os.fsync(fd)  # another node reads the holder from it
    _HELD[str(root)] = fd


def release_run_folders() -> None:
    """End of fit (cli.main): remove the lock files this process holds and drop the locks, so the next fit
    in those folders starts (a fit that opened the file meanwhile sees it gone and takes the name again)."""
    while _HELD:
        root, fd = _HELD.popitem()
        try:
            if os.stat(Path(root) / RUN_LOCK).st_ino == os.fstat(fd).st_ino:
                os.unlink(Path(root) / RUN_LOCK)  # still holding the lock: nobody holds that file after us
        except OSError:
            pass  # gone already, or a takeover replaced it: leave the name to its holder
        os.close(fd)  # drops the lock


def record_start(root_dir: str | Path, ckpt_path: str | None, fresh: bool) -> None:
    """Rank 0 of a SLURM job's first start that is not `auto`/`last`: this job's start, until
    FaultTolerance has set the folder's other checkpoints aside (`clear_start_record`)."""
    import json

    root = Path(root_dir)
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f"{START_RECORD}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps({"job": os.environ.get("SLURM_JOB_ID"), "ckpt_path": ckpt_path, "fresh": fresh}))
    os.replace(tmp, root / START_RECORD)


def recorded_start(root_dir: str | Path) -> dict | None:
    """This SLURM job's recorded start ({"ckpt_path", "fresh"}), when an earlier attempt of it stopped
    before train start; None otherwise (no record, or another job's)."""
    import json

    try:
        rec = json.loads((Path(root_dir) / START_RECORD).read_text())
    except (OSError, ValueError):
        return None
    job = os.environ.get("SLURM_JOB_ID")
    return rec if isinstance(rec, dict) and job and rec.get("job") == job else None


def clear_start_record(root_dir: str | Path) -> None:
    if "://" not in str(root_dir):
        (Path(root_dir) / START_RECORD).unlink(missing_ok=True)


def no_hpc_autoload(trainer) -> None:
    """Keep Lightning from loading `hpc_ckpt_*` when fit gets no ckpt_path under SLURM (its
    `_parse_ckpt_path` makes None "hpc" whenever one exists): a fresh start asked for in a run folder
    that was ever requeued. FaultTolerance sets those files aside at train start, before any save."""
    connector = trainer._checkpoint_connector

    class _NoHpcResume(type(connector)):
        @property
        def _hpc_resume_path(self) -> None:
            return None

    connector.__class__ = _NoHpcResume


def _requeued_from(ckpt_path: str, root_dir: str | Path, checkpoint_dir: str | Path | None, restarts: int) -> str:
    """A requeued job runs its command line again: an explicit --ckpt_path FILE is where the job started,
    and the run folder's newer checkpoints (hpc_ckpt_* saved at preemption, last.ckpt) hold what it did since."""
    try:
        found = newest_checkpoint(root_dir, checkpoint_dir)
    except CheckpointError:
        found = None  # none of the run's own checkpoints loads: the job's starting point is all there is
    start = checkpoint_progress(ckpt_path)
    if found is None or start is None or found[1][0] <= start[0]:
        return ckpt_path
    log.info("resume: %s (global_step %d, %d batches seen): SLURM requeue %d continues from the run's newest "
             "checkpoint, not from --ckpt_path %s (global_step %d) where the job started", found[0], found[1][0],
             found[1][1], restarts, ckpt_path, start[0])
    return str(found[0])


def resolve_eval_ckpt_path(subcommand: str, ckpt_path: str | None, root_dir: str | Path,
                           checkpoint_dir: str | Path | None, best: dict | None = None) -> str | None:
    """The validate/test/predict ckpt_path: `last`/`auto` are the newest good checkpoint, as for fit,
    but none is an error (evaluating a fresh model is never what they meant); `best` is the file of
    the best_checkpoint callback (`best`: its dirpath, filename, monitor, mode) with the best score
    stored in it (Lightning's `best` would take the first ModelCheckpoint, ours ranks by step, and
    knows nothing in a new process). Other values: checked like fit's explicit paths."""
    if ckpt_path is None:
        return None
    if ckpt_path in ("last", "auto"):
        found = newest_checkpoint(root_dir, checkpoint_dir)
        if found is None:
            raise CheckpointError(f"--ckpt_path {ckpt_path}: no checkpoint in {checkpoint_dir} or {root_dir}/hpc_ckpt_*.ckpt "
                                  f"to {subcommand}; train one first (gpt2dist fit), check trainer.default_root_dir, "
                                  f"or pass --ckpt_path FILE")
        log.info("%s: %s (global_step %d) chosen by --ckpt_path %s", subcommand, found[0], found[1][0], ckpt_path)
        return str(found[0])
    if ckpt_path == "best":
        if not best:
            raise CheckpointError("--ckpt_path best: no best_checkpoint callback is configured; pass --ckpt_path last or a file")
        return best_checkpoint(**best)
    check_explicit_checkpoint(ckpt_path, root_dir)
    return ckpt_path


def _callback_files(dirpath: str | Path | None, filename: str | None) -> tuple[Path | None, str, list[Path]]:
    """(folder, the filename template's fixed prefix, that folder's files starting with it, sorted).
    Hidden names are skipped: they are temp files of an unfinished save."""
    prefix = str(filename or "").split("{", 1)[0]
    folder = Path(dirpath) if dirpath else None
    if folder is None or not folder.is_dir():
        return folder, prefix, []
    return folder, prefix, sorted(p for p in folder.glob(f"{prefix}*") if not p.name.startswith("."))


def best_checkpoint(dirpath: str | Path | None, filename: str, monitor: str, mode: str, max_step: int | None = None) -> str:
    """The best_checkpoint file whose stored score (`best_model_score` of the `monitor` callback) is
    best. Scores are read, not assumed from the file list: a resume can leave an older best file
    that the callback's restored state no longer tracks. `max_step`: only files saved at or before it
    (a rollback's: a later one is the abandoned continuation's)."""
    folder, prefix, files = _callback_files(dirpath, filename)
    if not files:
        raise CheckpointError(f"--ckpt_path best: no {prefix}*.ckpt in {folder} (best_checkpoint saves one when "
                              f"{monitor} improves at a validation); pass --ckpt_path last or a checkpoint file")
    scored = []
    for p in files:
        ckpt, _ = _meta(p)
        if ckpt is not None and max_step is not None and int(ckpt["global_step"]) > max_step:
            continue
        states = ckpt.get("callbacks", {}).values() if ckpt is not None else []
        score = next((st["best_model_score"] for st in states if isinstance(st, dict) and st.get("monitor") == monitor
                      and st.get("best_model_score") is not None), None)
        if score is not None:
            scored.append((float(score), p))
    if not scored:
        raise CheckpointError(f"--ckpt_path best: none of {[p.name for p in files]} in {folder} is a readable checkpoint "
                              f"with a stored {monitor}; pass --ckpt_path last or a checkpoint file")
    score, path = (min if mode == "min" else max)(scored, key=lambda t: t[0])
    log.info("best checkpoint: %s (%s %.4f, of %d)", path, monitor, score, len(scored))
    return str(path)


def check_explicit_checkpoint(ckpt_path: str, root_dir: str | Path | None = None) -> None:
    """A local `--ckpt_path FILE|FOLDER` must exist and be complete: one line naming the file otherwise.
    `hpc` (with the run folder `root_dir`): there must be an hpc_ckpt_*.ckpt (Lightning's ValueError otherwise)."""
    if ckpt_path == "hpc" and root_dir is not None and lightning_hpc_checkpoint(root_dir) is None:
        raise CheckpointError(f"--ckpt_path hpc: no hpc_ckpt_*.ckpt in {root_dir} (SLURM requeue saves write them); "
                              f"pass --ckpt_path last (the newest checkpoint of any kind) or a checkpoint file")
    import importlib.util

    registry = ckpt_path == "registry" and importlib.util.find_spec("litmodels") is not None  # else a file name
    if ckpt_path in ("hpc", "best") or registry or "://" in ckpt_path:
        return  # Lightning's own names and remote paths
    p = Path(ckpt_path)
    if not p.exists():
        raise CheckpointError(f"--ckpt_path {ckpt_path}: no such file or folder; give an existing checkpoint, "
                              f"or --ckpt_path last for the newest one in the run folder")
    prog, why = _progress(p)
    if why == UNSAFE:
        raise CheckpointError(f"--ckpt_path {ckpt_path}: {why}; it is not loaded: pass a checkpoint gpt2dist saved")
    if why.startswith("DeepSpeed checkpoint "):
        raise CheckpointError(f"--ckpt_path {why}")
    if prog is None:
        raise CheckpointError(f"--ckpt_path {ckpt_path}: not a complete checkpoint ({why}); it may have been cut "
                              f"short: pass an older one, or --ckpt_path last to take the newest complete one")


def check_checkpoint_fits_strategy(ckpt_path: str | None, strategy, world_size: int, subcommand: str = "fit") -> None:
    """A checkpoint that the run's strategy cannot load stops with one line naming both and the fix, before
    anything is launched (Lightning and DeepSpeed fail later, on every rank, with a traceback)."""
    from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy

    if not ckpt_path or not Path(ckpt_path).exists():
        return
    p, name = Path(ckpt_path), type(strategy).__name__
    export = (f"or export its weights (python tools/export_hf.py {ckpt_path} OUT) and start from them with "
              f"--model.model_name_or_path OUT --model.from_scratch false")
    deepspeed = isinstance(strategy, DeepSpeedStrategy)
    if p.is_dir() and (p / "latest").is_file():
        if subcommand != "fit" and not isinstance(strategy, (FSDPStrategy, ModelParallelStrategy)):
            return  # evaluation reads the consolidated weights: any DeepSpeed stage, one process or DDP (DeepSpeedFolderIO)
        if not deepspeed:
            how = "use the configs/strategy/deepspeed_* overlay that wrote it" if subcommand == "fit" else \
                "evaluate it under one process, DDP or a configs/strategy/deepspeed_* overlay"
            raise CheckpointError(f"--ckpt_path {ckpt_path} is a DeepSpeed checkpoint folder, which {name} cannot load; "
                                  f"{how}, {export}")
        meta, _ = _meta(p)
        if meta is None:
            return
        stage = (meta.get("ds_config") or {}).get("zero_optimization", {}).get("stage")
        if stage is not None and (stage == 3) != bool(strategy.zero_stage_3):
            raise CheckpointError(f"--ckpt_path {ckpt_path} was written by DeepSpeed ZeRO-{stage}, and DeepSpeed cannot "
                                  f"resume it under ZeRO-{strategy.config['zero_optimization']['stage']} (another "
                                  f"parameter layout); use the ZeRO-{stage} overlay, {export}")
        saved = meta.get("dp_world_size")
        if saved is not None and saved != world_size:
            raise CheckpointError(f"--ckpt_path {ckpt_path} was written by {saved} DeepSpeed processes and this run has "
                                  f"{world_size}; DeepSpeed cannot repartition ZeRO optimizer state: resume with "
                                  f"{saved} processes (trainer.devices x trainer.num_nodes), {export}")
    elif p.is_dir():
        if not isinstance(strategy, (FSDPStrategy, ModelParallelStrategy)):
            raise CheckpointError(f"--ckpt_path {ckpt_path} is a sharded (torch.distributed.checkpoint) folder, which "
                                  f"{name} cannot load; use configs/strategy/fsdp.yaml (FSDP2 resharding to any number "
                                  f"of processes), {export}")
    elif deepspeed and not getattr(strategy, "load_full_weights", False):
        raise CheckpointError(f"--ckpt_path {ckpt_path} is a single-file checkpoint, and DeepSpeed resumes only its own "
                              f"checkpoint folders; use the strategy that wrote it (configs/strategy/ddp.yaml, "
                              f"fsdp.yaml or one process), {export}")


def _ranks(ranks: list[int], hosts: list[str]) -> str:
    """'ranks 8-15 (node2), 17 (node3)': consecutive ranks on one host as a range."""
    runs: list[list[int]] = []
    for r in ranks:
        if runs and r == runs[-1][-1] + 1 and hosts[r] == hosts[runs[-1][0]]:
            runs[-1].append(r)
        else:
            runs.append([r])
    parts = [f"{g[0]}{'-' + str(g[-1]) if len(g) > 1 else ''} ({hosts[g[0]]})" for g in runs]
    return ("ranks " if len(ranks) > 1 else "rank ") + ", ".join(parts)


def check_ranks_share_the_run(folders: list[str | Path], ckpt_path: str | None = "unknown", wait_s: float = 10.0) -> None:
    """Every rank sees the same run folders and resumes the same training progress; else all ranks
    raise the same one-line error. Collective (all ranks call it); nothing to do without a process
    group of 2+ ranks.

    Checkpoints are written into one folder by rank 0 (sharded ones by every rank) and a requeued job
    may land on other nodes, so a node-local trainer.default_root_dir (/tmp, a local scratch disk) loses
    or splits them; and ranks that resolved `--ckpt_path auto` in different folders would resume
    different steps (one fresh, one at step 500): replicas that silently diverge. Rank 0 writes a token
    file in each folder and every rank looks for it (up to `wait_s`: a network filesystem may show a new
    file late). `ckpt_path` is this rank's resolved checkpoint (None: fresh; "unknown": not resolved
    by the CLI, so not compared)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return
    rank, world = dist.get_rank(), dist.get_world_size()
    own = list(dict.fromkeys(str(f) for f in folders if "://" not in str(f)))  # remote (s3://...): one store
    shared = [(f".gpt2dist-shared-{uuid.uuid4().hex}", own) if rank == 0 else None]
    dist.broadcast_object_list(shared, src=0)  # the token's name, and rank 0's folders for the message
    name, named = shared[0]
    tokens = [Path(f) / name for f in own]
    unwritable = ""  # rank 0's failure to write a token: reported by every rank below, none left waiting
    try:
        if rank == 0:
            for t in tokens:
                try:
                    t.parent.mkdir(parents=True, exist_ok=True)
                    t.write_text(socket.gethostname())
                except OSError as e:
                    unwritable = f"cannot write in {t.parent} ({e.strerror or type(e).__name__})"
                    break
        dist.barrier()
        deadline = time.monotonic() + wait_s
        while not all(t.exists() for t in tokens) and time.monotonic() < deadline:
            time.sleep(0.5)
        progress = None
        if ckpt_path not in (None, "unknown") and os.path.exists(ckpt_path):
            progress = checkpoint_progress(ckpt_path)
        mine = (socket.gethostname(), [t.exists() for t in tokens], ckpt_path, progress, unwritable)
        everyone: list = [None] * world
        dist.all_gather_object(everyone, mine)  # after every rank has looked: rank 0 may remove the tokens
    finally:
        if rank == 0:
            for t in tokens:
                try:
                    t.unlink()
                except OSError:  # never written (reported below)
                    pass
    hosts = [e[0] for e in everyone]
    if everyone[0][4]:
        raise ConfigError(f"rank 0 ({hosts[0]}) {everyone[0][4]}: the run folder must be writable; "
                          "fix its permissions or pick another trainer.default_root_dir")
    for i, folder in enumerate(named):
        blind = [r for r, e in enumerate(everyone) if not e[1][i]]
        if blind:
            raise ConfigError(
                f"{folder} is not one folder for all ranks: {_ranks(blind, hosts)} cannot see the file rank 0 "
                f"({hosts[0]}) wrote there; checkpoints and requeue need storage every node shares: put "
                "trainer.default_root_dir (and the checkpoint dirpath) on a shared filesystem, not /tmp or a local disk")
    if any(e[2] == "unknown" for e in everyone):  # decided on what all ranks gathered: all return, or all raise
        return
    resumes = [(e[3][0] if e[3] else None) if e[2] else "fresh" for e in everyone]  # the step, or "fresh"
    odd = [r for r in range(world) if resumes[r] != resumes[0]]
    if odd:
        def what(r: int) -> str:
            return "starts fresh" if resumes[r] == "fresh" else f"resumes {everyone[r][2]} (step {resumes[r]})"

        raise CheckpointError(
            f"ranks disagree on the checkpoint: rank 0 ({hosts[0]}) {what(0)}, {_ranks(odd, hosts)} {what(odd[0])}; "
            "each rank resolves --ckpt_path in the run folder it sees: check that every node sees the same "
            "trainer.default_root_dir, and that no other job writes there")


def is_deepspeed_folder(ckpt_path: str | None) -> bool:
    """True for a DeepSpeed checkpoint folder (its `latest` file names the tag folder)."""
    return bool(ckpt_path) and (Path(ckpt_path) / "latest").is_file()


class DeepSpeedFolderIO(TorchCheckpointIO):
    """TorchCheckpointIO that also reads a DeepSpeed folder, as one checkpoint with its consolidated fp32
    weights (DeepSpeed's zero_to_fp32, as tools/export_hf.py): validate/test/predict of a ZeRO checkpoint
    under one process or DDP. Every process reads the whole folder (optimizer shards included)."""

    def load_checkpoint(self, path, map_location=None, weights_only: bool | None = None) -> dict:
        if not is_deepspeed_folder(str(path)):
            return super().load_checkpoint(path, weights_only=weights_only)
        from gpt2dist.export import load_deepspeed_folder

        return load_deepspeed_folder(Path(path))


def reconcile_best(trainer) -> None:  # after set_aside_other_runs, at train start of a resumed fit (faults.py)
    """Make a resumed best-by-validation ModelCheckpoint track the best files this run has on disk.

    - Gone: a rollback to an earlier step file restores the best of that time, which save_top_k has since
      deleted (or the set-aside moved). The run then never beat its score, saved no best, and
      export.source=best failed after training ("does not exist"). Those entries are dropped.
    - Missing: at a validation the step callback saves (step<N>.ckpt, last.ckpt) before the best one does,
      so those files hold the best state from before step N's validation. Resumed from them after step N
      was a new best (a kill, or extending a finished run), best-step<N>.ckpt was forgotten, and the run
      exported a worse later "best". Every best file of this callback at or before the resumed step is
      read back with the score it was saved at (its own state lists it)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    for cb in trainer.checkpoint_callbacks:
        if not isinstance(cb, ModelCheckpoint) or cb.monitor in (None, "step"):
            continue
        changes = _best_on_disk(cb, trainer.global_step) if trainer.is_global_zero else None
        gone, found = trainer.strategy.broadcast(changes)
        if not gone and not found:
            continue
        for path in gone:
            cb.best_k_models.pop(path, None)
        cb.best_k_models.update({path: torch.tensor(score) for path, score in found.items()})
        keep = sorted(cb.best_k_models, key=lambda p: float(cb.best_k_models[p]), reverse=cb.mode == "max")
        if cb.save_top_k > 0:  # the k best files are tracked (none is deleted here)
            cb.best_k_models = {p: cb.best_k_models[p] for p in keep[:cb.save_top_k]}
        if trainer.is_global_zero:
            if found:  # routine: a resume from a validation step that set a new best (the old one deleted)
                log.info("resume: %s's best checkpoint(s) %s, saved after the resumed checkpoint's state was taken, "
                         "are tracked again%s", cb.monitor, ", ".join(f"{Path(p).name} ({v:.4f})" for p, v in found.items()),
                         f" (in place of {', '.join(Path(p).name for p in gone)})" if gone else "")
            elif gone:
                log.warning("resume: %s's best checkpoint(s) %s no longer exist (deleted by save_top_k, or set aside)%s",
                            cb.monitor, ", ".join(map(str, gone)), "" if cb.best_k_models else
                            ": this run saves its own best from its next validation")
        if cb.best_k_models:
            pick = min if cb.mode == "min" else max
            cb.best_model_path = pick(cb.best_k_models, key=lambda p: float(cb.best_k_models[p]))
            cb.best_model_score = cb.best_k_models[cb.best_model_path]
            cb.kth_best_model_path = (max if cb.mode == "min" else min)(cb.best_k_models, key=lambda p: float(cb.best_k_models[p]))
            cb.kth_value = cb.best_k_models[cb.kth_best_model_path]
        else:
            cb.best_model_path, cb.best_model_score, cb.kth_best_model_path = "", None, ""
            cb.kth_value = torch.tensor(math.inf if cb.mode == "min" else -math.inf)


def _best_on_disk(cb, step: int) -> tuple[list[str], dict[str, float]]:
    """(tracked best files that are gone, untracked best files of `cb` at or before `step`: path -> score).
    A file is this callback's if its own saved state lists it among the best (a step file's does not)."""
    known = [p for p in {*cb.best_k_models, cb.best_model_path} if p and "://" not in str(p)]
    gone = [p for p in known if not os.path.exists(p)]
    found: dict[str, float] = {}
    tracked = {os.path.realpath(p) for p in known}
    for p in _callback_files(cb.dirpath, cb.filename)[2]:
        if os.path.realpath(p) in tracked:
            continue
        ckpt, _ = _meta(p)
        if ckpt is None or int(ckpt["global_step"]) > step:
            continue
        for state in ckpt.get("callbacks", {}).values():
            if not isinstance(state, dict) or state.get("monitor") != cb.monitor:
                continue
            own = {Path(k).name: v for k, v in (state.get("best_k_models") or {}).items()}
            if p.name in own and own[p.name] is not None and math.isfinite(float(own[p.name])):
                found[str(p)] = float(own[p.name])
            break
    return gone, found
