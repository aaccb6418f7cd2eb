"""Shared fixtures: a small real-text corpus and a tokenizer the tests build themselves.

Nothing here touches the network or ../shared: the corpus is a few files of this Python's own
standard library (present on every machine), and the tokenizer is a 512-token byte-level BPE
trained on it by gpt2dist's own trainer.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
STDLIB = Path(sysconfig.get_paths()["stdlib"])
CORPUS_MODULES = ["textwrap.py", "string.py", "shlex.py", "fnmatch.py", "bisect.py", "heapq.py",
                  "colorsys.py", "keyword.py", "glob.py", "abc.py", "copy.py", "numbers.py"]

# DeepSpeed on CPU JIT-builds its comm op into TORCH_EXTENSIONS_DIR (75-100 s on 2 cores). One folder per
# venv: clones with their own venvs (other include paths, so another build hash) sharing ~/.cache rebuilt
# it over each other on every switch. Subprocesses inherit it.
if sys.prefix != sys.base_prefix:
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))

# A tiny GPT-2: 2 layers, 64 wide, so CPU tests take seconds.
TINY = {"n_layer": 2, "n_embd": 64, "n_head": 2, "n_positions": 64}


def corpus_texts() -> list[str]:
    return [(STDLIB / m).read_text(encoding="utf-8") for m in CORPUS_MODULES]


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("corpus")
    for name, text in zip(CORPUS_MODULES, corpus_texts()):
        (d / (Path(name).stem + ".txt")).write_text(text, encoding="utf-8")
    return d


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    from gpt2dist.tokenizer import train_bpe_tokenizer

    d = tmp_path_factory.mktemp("tok") / "bpe512"
    train_bpe_tokenizer(corpus_texts(), 512, d)
    return d


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    from gpt2dist.tokenizer import load_tokenizer

    return load_tokenizer(str(tokenizer_dir))


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: int = 600,
            prefix: list[str] | None = None) -> subprocess.CompletedProcess:
    """Run the real `gpt2dist` CLI in a subprocess (python -m gpt2dist, same interpreter), after `prefix`."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_MODE": "offline", **(env or {})}
    return run_group([*(prefix or []), sys.executable, "-m", "gpt2dist", *args], timeout, cwd=cwd or REPO, env=full_env)


def run_group(cmd: list[str], timeout: float, **kwargs) -> subprocess.CompletedProcess:
    """subprocess.run(capture_output, text) in a session of its own; on timeout the whole process group
    is killed, not only the launcher: a rank left behind (DeepSpeed's CPU comm busy-waits on shared
    memory) took one of CI's 2 cores for the rest of the suite, timing out every later multi-process run."""
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                          **kwargs) as p:
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            out, err = p.communicate()
            raise subprocess.TimeoutExpired(p.args, timeout, out, err) from None
    return subprocess.CompletedProcess(p.args, p.returncode, out, err)


def two_at_a_time(run, cases) -> dict:
    """{case: run(case)} for independent runs, two at a time: each CLI run is mostly one core of imports and
    tiny steps, so a 2-core machine (CI's) does two in about the time of one. An exception in a run raises here."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(2) as pool:
        return dict(zip(cases, pool.map(run, cases)))


def each_row_two_at_a_time(request, test: str, run) -> dict:
    """For a module fixture of a parametrized test whose rows are independent CLI runs: {row id: run(**row's
    params)} for the rows this session selected (-k picks still run alone), two at a time. A row's own
    exception (a failed setup, a skip) is kept as its result; `row_result` raises it in that row's test."""
    rows = {item.callspec.id: item.callspec.params for item in request.session.items
            if item.originalname == test and item.module is request.module}

    def guarded(row: str):
        try:
            return run(**rows[row])
        except BaseException as e:  # pytest's skip and fail are BaseExceptions
            return e

    return two_at_a_time(guarded, rows)


def row_result(results: dict, request):
    """This row's result from `each_row_two_at_a_time`, or its exception raised here."""
    result = results[request.node.callspec.id]
    if isinstance(result, BaseException):
        raise result
    return result


def spawn_ranks(target, world: int, init_file: str, *args, timeout: int = 240) -> list:
    """Run `target(rank, world, init_file, *args, queue)` in `world` spawned processes (a real
    process group each, over `init_file`); returns what each put on the queue, after all exit 0."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=target, args=(r, world, init_file, *args, q)) for r in range(world)]
    for p in procs:
        p.start()
    results = [q.get(timeout=timeout) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    return results


def linear_module(val_loss=None):
    """A Lightning module of one Linear(2, 1) layer trained with SGD on 2-wide float batches, for tests of
    callbacks and checkpointing rather than of the model. `val_loss(module, batch)`: the val/loss each
    validation logs (default: the training loss on the batch)."""
    import lightning.pytorch as pl
    import torch

    class LinearModule(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(2, 1)

        def training_step(self, batch, i):
            return self.layer(batch).pow(2).mean()

        def validation_step(self, batch, i):
            self.log("val/loss", val_loss(self, batch) if val_loss else self.layer(batch).pow(2).mean())

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    return LinearModule()
