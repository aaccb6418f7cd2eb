"""Check a cluster submission before it queues (called by slurm/submit.sh):

    python -m gpt2dist.launch --nodes 2 --tasks-per-node 8 -- --config configs/gpt2-large.yaml [overrides]

Fails with one line naming the culprit when a config file is missing, or when the configs fix a
world size (trainer.num_nodes / trainer.devices / a strategy's data_parallel_size x
tensor_parallel_size) other than nodes x tasks per node. A config's world size changes only when
the command line says so too (`--trainer.num_nodes 4`): the global batch scales with it. Otherwise prints the global batch
arithmetic. Reads the YAML only (no trainer, no model, no GPU), so it answers in seconds on a login node.

`check_srun_world` (called by the CLI under srun): the trainer's num_nodes x devices must equal the
tasks srun started.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

import yaml

from gpt2dist.errors import ConfigError


def _class_name(class_path) -> str | None:
    """`ModelParallelStrategy` for it and `lightning.pytorch.strategies.ModelParallelStrategy` alike."""
    return class_path.rsplit(".", 1)[-1] if isinstance(class_path, str) else class_path


def merge_configs(base: dict, extra: dict) -> dict:
    """`extra` layered over `base`, section by section, as repeated `--config` files compose."""
    out = dict(base)
    for k, v in extra.items():
        old = out.get(k)
        if isinstance(v, dict) and isinstance(old, dict) and _class_name(v.get("class_path", old.get("class_path"))) != \
                _class_name(old.get("class_path")):
            out[k] = v  # another class (a strategy overlay): the first one's init_args are not the new class's
        else:
            out[k] = merge_configs(old, v) if isinstance(v, dict) and isinstance(old, dict) else v
    return out


def _load_config(path: Path) -> dict:
    try:
        cfg = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"config file '{path}' is not valid YAML{where} ({getattr(e, 'problem', None) or e}): "
                          f"fix the file") from None
    if cfg is not None and not isinstance(cfg, dict):
        raise ConfigError(f"config file '{path}' holds a {type(cfg).__name__}, not sections (trainer:, model:, "
                          f"data: ...): fix the file")
    return cfg or {}


def _set(cfg: dict, dotted: str, value) -> dict:
    """`cfg` with `dotted` (trainer.num_nodes) set, as a command-line override sets it."""
    out = dict(cfg)
    head, _, rest = dotted.partition(".")
    out[head] = _set(out[head] if isinstance(out.get(head), dict) else {}, rest, value) if rest else value
    return out


def read_fit_args(args: list[str]) -> tuple[dict, list[str]]:
    """(the merged config, its file names) from `gpt2dist fit` args: config files and dotted overrides
    applied in order, as LightningCLI does (a --config after an override overrides it)."""
    merged: dict = {}
    configs: list[str] = []
    i = 0
    while i < len(args):
        a = "--config" if args[i] == "-c" else args[i]  # LightningCLI's short form of --config
        key, value = (a.split("=", 1) + [None])[:2] if a.startswith("--") else (a, None)
        if value is None and a.startswith("--") and i + 1 < len(args) and not args[i + 1].startswith("--"):
            value, i = args[i + 1], i + 1
        i += 1
        if key == "--config":
            path = Path(value or "")
            if not path.is_file():
                raise ConfigError(f"config file '{value}' does not exist: pass an existing --config PATH "
                                  f"(relative to {Path.cwd()})")
            configs.append(str(path))
            merged = merge_configs(merged, _load_config(path))
        elif key.startswith("--") and value is not None:
            try:
                parsed = yaml.safe_load(value)
            except yaml.YAMLError:
                parsed = value  # jsonargparse takes it as a string
            merged = _set(merged, key[2:], parsed)
    return merged, configs


def _get(cfg: dict, dotted: str):
    node = cfg
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def check_submission(nodes: int, tasks_per_node: int, fit_args: list[str]) -> str:
    """Raise ConfigError on a submission that cannot run; return the global-batch line."""
    if nodes < 1 or tasks_per_node < 1:
        raise ConfigError(f"--nodes {nodes} --tasks-per-node {tasks_per_node}: both must be >= 1")
    cfg, configs = read_fit_args(fit_args)
    if not configs:
        raise ConfigError("no --config given: pass at least one, e.g. --config configs/gpt2-small.yaml")
    world = nodes * tasks_per_node
    where = " + ".join(configs)
    num_nodes = _get(cfg, "trainer.num_nodes")
    if isinstance(num_nodes, int) and num_nodes != nodes:
        raise ConfigError(f"{where} sets trainer.num_nodes={num_nodes} but the job asks for --nodes {nodes}: "
                          f"submit with --nodes {num_nodes}, or add --trainer.num_nodes {nodes} (the global batch scales with it)")
    devices = _get(cfg, "trainer.devices")
    n_dev = len(devices) if isinstance(devices, list) else devices
    if isinstance(n_dev, int) and n_dev not in (-1, tasks_per_node):
        raise ConfigError(f"{where} sets trainer.devices={devices} but the job runs {tasks_per_node} task(s) per node "
                          f"(--gpus-per-node/--tasks-per-node): make them equal, or add --trainer.devices {tasks_per_node}")
    strategy = _get(cfg, "trainer.strategy")
    init = strategy.get("init_args", {}) if isinstance(strategy, dict) else {}
    dp, tp = init.get("data_parallel_size"), init.get("tensor_parallel_size", 1)
    if isinstance(strategy, dict) and _class_name(strategy.get("class_path")) == "ModelParallelStrategy":
        # Lightning's defaults, "auto": data parallel = nodes, tensor parallel = devices per node.
        dp = nodes if init.get("data_parallel_size", "auto") == "auto" else init.get("data_parallel_size")
        tp = tasks_per_node if init.get("tensor_parallel_size", "auto") == "auto" else init.get("tensor_parallel_size")
        if isinstance(tp, int) and tp > 1:
            raise ConfigError(f"{where}: ModelParallelStrategy with tensor_parallel_size={tp} "
                              f"({'auto: the devices per node' if init.get('tensor_parallel_size', 'auto') == 'auto' else 'as set'}), "
                              f"and GPT2Module has no tensor parallelism; use configs/strategy/fsdp.yaml "
                              f"(gpt2dist.strategies.FSDP2Strategy) or set tensor_parallel_size: 1")
    if isinstance(dp, int) and isinstance(tp, int) and dp * tp != world:
        raise ConfigError(f"{where}: strategy data_parallel_size x tensor_parallel_size = {dp} x {tp} = {dp * tp}, "
                          f"but the job has {nodes} node(s) x {tasks_per_node} = {world} processes: make them equal")
    micro = _get(cfg, "data.batch_size")
    block = _get(cfg, "data.block_size")
    accum = _get(cfg, "trainer.accumulate_grad_batches") or 1
    if not (isinstance(micro, int) and isinstance(block, int) and isinstance(accum, int)):
        return f"world size {world} ({nodes} node(s) x {tasks_per_node})"
    seqs = micro * accum * world
    return (f"global batch: {micro} seqs x {accum} accum x {world} processes ({nodes} node(s) x {tasks_per_node}) "
            f"= {seqs} seqs x {block} tokens = {seqs * block:,} tokens/step")


def check_srun_world(num_nodes: int, devices: int, env=None) -> None:
    """Under srun (SLURMEnvironment), the trainer's num_nodes x devices must be the tasks srun started."""
    env = os.environ if env is None else env
    tasks, nodes = env.get("SLURM_STEP_NUM_TASKS"), env.get("SLURM_STEP_NUM_NODES") or env.get("SLURM_NNODES")
    if not (tasks and tasks.isdigit()):
        return  # not started by srun (a batch script's own shell, salloc): one process, nothing to agree on
    tasks_n, nodes_n = int(tasks), int(nodes) if nodes and nodes.isdigit() else num_nodes
    if tasks_n == num_nodes * devices and nodes_n == num_nodes:
        return
    # Otherwise each task would train on its own as rank 0 (one device), all writing the same run folder,
    # or Lightning stops with a traceback (several devices).
    per_node = f"{tasks_n // nodes_n}" if tasks_n % nodes_n == 0 else "N"
    raise ConfigError(f"srun started {tasks_n} task(s) on {nodes_n} node(s), but the trainer runs trainer.num_nodes="
                      f"{num_nodes} x trainer.devices={devices} = {num_nodes * devices} process(es): pass "
                      f"--trainer.num_nodes {nodes_n} --trainer.devices {per_node} (slurm/fit.sbatch does), "
                      f"or srun {num_nodes * devices} task(s)")


def check_srun_seen(environment: str, env=None) -> None:
    """srun's tasks in a job Lightning does not take for SLURM (an interactive allocation: SLURM_JOB_NAME bash or
    interactive) and no other launcher: each task would train alone as rank 0, all in one run folder."""
    env = os.environ if env is None else env
    tasks = env.get("SLURM_STEP_NUM_TASKS", "")
    if environment != "LightningEnvironment" or not tasks.isdigit() or int(tasks) < 2:
        return
    raise ConfigError(f"srun started {tasks} tasks, but Lightning does not run this job as SLURM (SLURM_JOB_NAME="
                      f"{env.get('SLURM_JOB_NAME')!r}: an interactive allocation), so each task would train alone; "
                      f"name the allocation (salloc --job-name gpt2dist ...) or submit with slurm/submit.sh")


def array_task_ids(spec: str) -> list[int]:
    """The task ids of an sbatch --array spec: `0-3`, `1,3,5-7`, `0-15:4` (a step), `0-99%10` (at most 10 at once)."""
    ids: list[int] = []
    for part in spec.split("%")[0].split(","):
        m = re.fullmatch(r"\s*(\d+)(?:-(\d+)(?::(\d+))?)?\s*", part)
        if not m or (m.group(3) is not None and int(m.group(3)) < 1):
            raise ConfigError(f"job array {spec!r}: {part!r} is not an id or range (e.g. 0-3, 1,3,5-7, 0-15:4, 0-99%10)")
        lo, hi, step = int(m.group(1)), int(m.group(2) or m.group(1)), int(m.group(3) or 1)
        ids.extend(range(lo, hi + 1, step))
    return sorted(set(ids))


def check_array(nodes: int, tasks_per_node: int, fit_args: list[str], spec: str) -> str:
    """check_submission for every task of a job array, `%a` in the arguments replaced by its id (as
    slurm/fit.sbatch does); an array whose arguments hold no `%a` is refused, as fit.sbatch refuses it
    (after the queue wait, had it not been checked here)."""
    ids = array_task_ids(spec)
    if not any("%a" in a for a in fit_args):
        raise ConfigError(f"job array {spec!r}: every task would get the same arguments, so the same run folder; put %a "
                          f"(the task id) in --trainer.default_root_dir (e.g. runs/sweep-%a), or in --config "
                          f"(sweep/%a.yaml) with each file setting trainer.default_root_dir")
    lines, folders = {}, {}
    for i in ids:
        args = [a.replace("%a", str(i)) for a in fit_args]
        try:
            lines.setdefault(check_submission(nodes, tasks_per_node, args), []).append(i)
        except ConfigError as e:
            raise ConfigError(f"array task {i}: {e}") from None
        # %a in a learning rate or a seed only: every task in one folder, where tasks at once fail on its
        # lock and tasks one after another (%1) resume each other's checkpoints (--ckpt_path auto).
        root = os.path.normpath(str(_get(read_fit_args(args)[0], "trainer.default_root_dir") or "."))
        folders.setdefault(root, []).append(i)
    shared = next(((root, t) for root, t in folders.items() if len(t) > 1), None)
    if shared:
        root, t = shared
        raise ConfigError(f"job array {spec!r}: tasks {','.join(map(str, t[:8]))}{',...' if len(t) > 8 else ''} all train "
                          f"in the run folder {root} (trainer.default_root_dir); put %a in it "
                          f"(--trainer.default_root_dir {root}-%a), or set it in each task's --config file")
    return "\n".join(f"array task(s) {','.join(map(str, t)) if len(t) <= 8 else f'{t[0]}..{t[-1]} ({len(t)})'}: {line}"
                     for line, t in lines.items())


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m gpt2dist.launch", description=__doc__.split("\n\n")[0])
    p.add_argument("--nodes", type=int, required=True)
    p.add_argument("--tasks-per-node", type=int, required=True)
    p.add_argument("--array", default=None, help="an sbatch --array spec: check each task (%%a = its id)")
    p.add_argument("fit_args", nargs=argparse.REMAINDER, help="-- then the gpt2dist fit arguments")
    a = p.parse_args(argv)
    fit_args = a.fit_args[1:] if a.fit_args[:1] == ["--"] else a.fit_args
    try:
        if a.array:
            print(check_array(a.nodes, a.tasks_per_node, fit_args, a.array), flush=True)
        else:
            print(check_submission(a.nodes, a.tasks_per_node, fit_args), flush=True)
    except ConfigError as e:
        print(f"gpt2dist: error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
