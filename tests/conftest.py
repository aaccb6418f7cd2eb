"""Shared fixtures: a small real-text corpus and a tokenizer the tests build themselves.

Nothing here touches the network or ../shared: the corpus is a few files of this Python's own
standard library (present on every machine), and the tokenizer is a 512-token byte-level BPE
trained on it by gpt2dist's own trainer.
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
STDLIB = Path(sysconfig.get_paths()["stdlib"])
CORPUS_MODULES = ["textwrap.py", "string.py", "shlex.py", "fnmatch.py", "bisect.py", "heapq.py",
                  "colorsys.py", "keyword.py", "glob.py", "abc.py", "copy.py", "numbers.py"]

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
    return subprocess.run([*(prefix or []), sys.executable, "-m", "gpt2dist", *args], cwd=cwd or REPO, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


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
