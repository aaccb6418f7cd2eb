"""gpt2dist/cli.py end to end: the real `gpt2dist` command in subprocesses."""

from __future__ import annotations

import csv
import math
import os
import sys
import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import yaml

from conftest import REPO, STDLIB, TINY, corpus_texts, each_row_two_at_a_time, row_result, run_cli, run_group, two_at_a_time


def write_config(tmp_path: Path, corpus_dir: Path, tokenizer_dir: Path, **trainer) -> Path:
    cfg = {
        "seed_everything": 7,
        "trainer": {
            "accelerator": "cpu", "devices": 1, "max_steps": 30, "val_check_interval": 15,
            "check_val_every_n_epoch": None, "log_every_n_steps": 5, "enable_progress_bar": False,
            "default_root_dir": str(tmp_path / "run"),
            "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger",
                       "init_args": {"save_dir": str(tmp_path / "run"), "name": "logs"}},
            **trainer,
        },
        "model": {"from_scratch": True, "config_overrides": TINY, "dropout": 0.0, "lr": 3e-3, "warmup_steps": 5},
        "data": {"train_files": [str(corpus_dir / "*.txt")], "tokenizer": str(tokenizer_dir), "block_size": 64,
                 "batch_size": 8, "num_workers": 0, "val_fraction": 0.2, "cache_dir": str(tmp_path / "cache"),
                 "predict_prompts": ["def main(", "import "]},
        "export": {"sample_prompt": "def ", "sample_tokens": 8},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def metrics(run: Path) -> list[dict]:
    rows = []
    for f in sorted(run.glob("logs/version_*/metrics.csv")):
        rows += list(csv.DictReader(f.open()))
    return rows


@pytest.fixture(scope="module")
def fitted(tmp_path_factory, corpus_dir, tokenizer_dir):
    tmp = tmp_path_factory.mktemp("e2e")
    cfg = write_config(tmp, corpus_dir, tokenizer_dir)
    r = run_cli("fit", "--config", str(cfg))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return tmp, cfg, r


def test_fit_learns_checkpoints_and_exports(fitted):
    tmp, _, r = fitted
    run = tmp / "run"
    rows = metrics(run)
    val = [float(x["val/ppl"]) for x in rows if x.get("val/ppl")]
    train = [float(x["train/loss"]) for x in rows if x.get("train/loss")]
    assert len(val) == 2 and len(train) >= 5
    # A fresh model predicts ~uniformly over the 512-token vocabulary (ppl ~512).
    assert val[-1] < 0.6 * 512 and train[-1] < train[0] - 0.2
    assert all(x.get("lr") for x in rows if x.get("train/loss"))
    assert (run / "checkpoints" / "last.ckpt").exists()
    hf = run / "hf_model"
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in hf.iterdir()}
    assert not list(run.glob(".hf_model.tmp-*"))  # no temporary left behind
    assert "sample ('def ', greedy)" in r.stderr + r.stdout
    assert "val/ppl" in r.stdout  # the one-line validation report


def test_export_loads_offline_and_matches_checkpoint(fitted, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

    from gpt2dist.export import export_checkpoint
    from gpt2dist.model import GPT2Module

    run = fitted[0] / "run"
    model = AutoModelForCausalLM.from_pretrained(run / "hf_model", local_files_only=True)
    tok = AutoTokenizer.from_pretrained(run / "hf_model", local_files_only=True)
    out = pipeline("text-generation", model=model, tokenizer=tok)("def ", max_new_tokens=5, do_sample=False)
    assert out[0]["generated_text"].startswith("def ")
    # The export equals the final checkpoint's weights: same logits on a fixed batch.
    module = GPT2Module.load_from_checkpoint(run / "checkpoints" / "last.ckpt", weights_only=True)
    ids = torch.arange(40).view(2, 20) % len(tok)
    model.eval()
    module.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, module(ids), rtol=0, atol=0)
    # tools/export_hf.py's code path (single-file checkpoint) gives the same weights.
    again = export_checkpoint(run / "checkpoints" / "last.ckpt", tmp_path / "again")
    m2 = AutoModelForCausalLM.from_pretrained(again)
    with torch.no_grad():
        torch.testing.assert_close(m2(ids).logits, module(ids), rtol=0, atol=0)


def test_validate_test_predict_from_checkpoint(fitted):
    tmp, cfg, _ = fitted
    ckpt = str(tmp / "run" / "checkpoints" / "last.ckpt")
    rows_before = metrics(tmp / "run")
    final_val = [float(x["val/loss"]) for x in rows_before if x.get("val/loss")][-1]
    for sub in ("validate", "test"):
        r = run_cli(sub, "--config", str(cfg), "--ckpt_path", ckpt)
        assert r.returncode == 0, r.stderr[-3000:]
        key = "val/loss" if sub == "validate" else "test/loss"
        newest = max((tmp / "run").glob("logs/version_*/metrics.csv"), key=lambda p: int(p.parent.name[8:]))
        value = [float(x[key]) for x in csv.DictReader(newest.open()) if x.get(key)]
        # Same weights and the same validation blocks: the same loss as at the end of fit.
        assert value == [pytest.approx(final_val, rel=1e-5)]
        # The report names the checkpoint's step (the trainer's own is 0 outside fit) and the split.
        assert f"{sub} {ckpt} (step 30)  {key} " in r.stdout, r.stdout[-2000:]
    assert "evaluating on the validation split" in r.stdout + r.stderr
    r = run_cli("predict", "--config", str(cfg), "--ckpt_path", ckpt)
    assert r.returncode == 0, r.stderr[-3000:]
    preds = [json.loads(line) for line in (tmp / "run" / "predictions.jsonl").read_text().splitlines()]
    assert [p["prompt"] for p in preds] == ["def main(", "import "]
    assert all(p["text"].startswith(p["prompt"]) and len(p["text"]) > len(p["prompt"]) for p in preds)


def test_test_subcommand_evaluates_a_test_split_of_its_own(fitted, tmp_path, tokenizer):
    """--data.test_files: `gpt2dist test` reports the loss of those files' blocks (checked against the
    exported Hugging Face model on the same blocks), not the validation split's."""
    from transformers import GPT2LMHeadModel

    tmp, cfg, _ = fitted
    text = (STDLIB / "operator.py").read_text()  # not in the training corpus
    (tmp_path / "operator.txt").write_text(text)
    r = run_cli("test", "--config", str(cfg), "--ckpt_path", "last", "--data.test_files", f"[{tmp_path / 'operator.txt'}]")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "evaluating on the validation split" not in r.stdout + r.stderr
    newest = max((tmp / "run").glob("logs/version_*/metrics.csv"), key=lambda p: int(p.parent.name[8:]))
    [got] = [float(x["test/loss"]) for x in csv.DictReader(newest.open()) if x.get("test/loss")]
    ids = tokenizer(text, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    blocks = torch.tensor(ids[: len(ids) // 64 * 64]).view(-1, 64)
    model = GPT2LMHeadModel.from_pretrained(tmp / "run" / "hf_model").eval()
    with torch.no_grad():  # every block predicts 63 tokens: the mean of block means is the token mean
        expected = torch.stack([model(input_ids=b[None], labels=b[None]).loss for b in blocks]).mean().item()
    assert got == pytest.approx(expected, rel=1e-4)
    assert f"test/loss {got:.4f}" in r.stdout, r.stdout[-2000:]  # the one-line report says the same


def test_test_with_eval_stride_scores_each_token_once_with_overlapping_context(fitted, tmp_path, tokenizer):
    """--data.eval_stride 16: `test/loss` equals Hugging Face's strided perplexity recipe (labels -100 on each
    window's context), computed here with the exported model on the same token stream."""
    from transformers import GPT2LMHeadModel

    tmp, cfg, _ = fitted
    text = (STDLIB / "operator.py").read_text()
    (tmp_path / "operator.txt").write_text(text)
    r = run_cli("test", "--config", str(cfg), "--ckpt_path", "last", "--data.test_files", f"[{tmp_path / 'operator.txt'}]",
                "--data.eval_stride", "16")
    assert r.returncode == 0, r.stderr[-3000:]
    newest = max((tmp / "run").glob("logs/version_*/metrics.csv"), key=lambda p: int(p.parent.name[8:]))
    [got] = [float(x["test/loss"]) for x in csv.DictReader(newest.open()) if x.get("test/loss")]
    ids = tokenizer(text, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    stream = torch.tensor(ids[: len(ids) // 64 * 64])
    starts = list(range(0, len(stream) - 64 + 1, 16))
    starts += [len(stream) - 64] if starts[-1] + 64 < len(stream) else []
    model = GPT2LMHeadModel.from_pretrained(tmp / "run" / "hf_model").eval()
    total = count = 0.0
    with torch.no_grad():
        for k, start in enumerate(starts):
            window = stream[start:start + 64][None]
            new = 63 if k == 0 else start - starts[k - 1]  # targets no earlier window predicted
            labels = window.clone()
            labels[:, : 64 - new] = -100
            total += model(input_ids=window, labels=labels).loss.item() * new
            count += new
    assert count == len(stream) - 1  # every token but the first, once
    assert got == pytest.approx(total / count, rel=1e-5)
    with torch.no_grad():  # disjoint blocks (no eval_stride) score less context: another number, so the check can fail
        disjoint = torch.stack([model(input_ids=b[None], labels=b[None]).loss for b in stream.view(-1, 64)]).mean().item()
    assert abs(disjoint - got) > 5e-4, (disjoint, got)  # a 30-step model uses little context: close, yet 50x apart


def test_checkpoints_record_the_training_data_and_a_resume_on_other_data_says_so(fitted, tmp_path):
    tmp, cfg, _ = fitted
    ckpt = torch.load(tmp / "run" / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    recorded = ckpt["TokenBlockDataModule"]["train_data"]
    [meta] = [m for m in (json.loads(f.read_text()) for f in (tmp / "cache" / "blocks").glob("*/meta.json")) if "train" in m]
    assert (recorded["blocks"], recorded["tokens"], recorded["seed"]) == (meta["train"]["blocks"], meta["train"]["tokens"], 1234)
    # Resumed in a copy of the run, once in another order (warned), then again in that same order (not).
    shutil.copytree(tmp / "run" / "checkpoints", tmp_path / "run" / "checkpoints")
    root = ["--trainer.default_root_dir", str(tmp_path / "run"), "--trainer.logger.init_args.save_dir", str(tmp_path / "run")]
    for steps, warned in (("32", True), ("34", False)):
        r = run_cli("fit", "--config", str(cfg), *root, "--ckpt_path", "last", "--trainer.max_steps", steps, "--data.shuffle", "false")
        assert r.returncode == 0, r.stderr[-3000:]
        assert ("resume: the training data is not the checkpoint's (shuffle True -> False): " in r.stderr) == warned, r.stderr[-3000:]
        assert ("the training data is not the checkpoint's" in r.stderr) == warned  # one warning, not one per rank


def test_a_resume_trains_with_the_configs_optimizer_settings_and_schedule(fitted, tmp_path):
    """Resumed with another lr, weight_decay and max_steps, every later step's lr is the config's
    schedule (before: Lightning restored the old peak lr as the scheduler's base, 30x too high here) and
    the optimizer decays with the new weight_decay; a warning names each change."""
    from gpt2dist.model import GPT2Module

    tmp, cfg, _ = fitted
    shutil.copytree(tmp / "run" / "checkpoints", tmp_path / "run" / "checkpoints")
    root = ["--trainer.default_root_dir", str(tmp_path / "run"), "--trainer.logger.init_args.save_dir", str(tmp_path / "run")]
    r = run_cli("fit", "--config", str(cfg), *root, "--ckpt_path", "last", "--trainer.max_steps", "40",
                "--model.lr", "1e-4", "--model.min_lr", "1e-5", "--model.weight_decay", "0.05", "--export.enabled", "false")
    assert r.returncode == 0, r.stderr[-3000:]
    schedule = GPT2Module(lr=1e-4, min_lr=1e-5, warmup_steps=5)
    assert ("resume: the optimizer settings are the config's, not the checkpoint's (lr 0.003 -> 0.0001, decay_steps 30 -> 40, "
            f"weight_decay 0.1 -> 0.05); lr at step 30 is {schedule.lr_at(30, 40):.3g}; model.decay_steps=30 keeps the "
            "checkpoint's decay") in " ".join(r.stderr.split()), r.stderr[-3000:]
    logged = {int(x["step"]): float(x["lr"]) for x in metrics(tmp_path / "run") if x.get("lr")}
    resumed = {s: v for s, v in logged.items() if s >= 30}
    assert len(resumed) == 2  # steps 34 and 39 (log_every_n_steps 5): lr after step s+1's update
    for step, lr in resumed.items():
        assert lr == pytest.approx(schedule.lr_at(step, 40), rel=1e-6), (step, lr)
    saved = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert [g["weight_decay"] for g in saved["optimizer_states"][0]["param_groups"]] == [0.05, 0.0]
    assert saved["lr_schedule"] == {"lr": 1e-4, "min_lr": 1e-5, "warmup_steps": 5, "decay_steps": 40}


def test_explicit_checkpoint_keeps_the_command_line_model_settings(fitted, tokenizer_dir):
    """Lightning would replace the config's model section with the checkpoint's stored hyperparameters
    for an explicit --ckpt_path FILE (and only then): --model.max_new_tokens 2 would be dropped."""
    from transformers import AutoTokenizer

    tmp, cfg, _ = fitted
    ckpt = str(tmp / "run" / "checkpoints" / "last.ckpt")
    r = run_cli("predict", "--config", str(cfg), "--ckpt_path", ckpt, "--model.max_new_tokens", "2")
    assert r.returncode == 0, r.stderr[-3000:]
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    preds = [json.loads(line) for line in (tmp / "run" / "predictions.jsonl").read_text().splitlines()][-2:]
    for p in preds:
        assert len(tok(p["text"])["input_ids"]) - len(tok(p["prompt"])["input_ids"]) <= 2, p


def test_resuming_a_finished_run_says_nothing_is_left_to_train(fitted):
    tmp, cfg, _ = fitted
    r = run_cli("fit", "--config", str(cfg), "--ckpt_path", "last", "--export.enabled", "false")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "is at step 30, already at trainer.max_steps=30: nothing left to train; raise trainer.max_steps" in r.stderr


def test_eval_ckpt_path_last_best_and_nothing(fitted, tmp_path):
    tmp, cfg, _ = fitted
    run = tmp / "run"
    # `best`: the best_checkpoint file with the best stored val/loss (Lightning's `best` would fail here).
    best = min(run.glob("checkpoints/best-*.ckpt"), key=lambda p: float(torch.load(p, weights_only=False)["callbacks"][
        next(k for k in torch.load(p, weights_only=False)["callbacks"] if k.startswith("ModelCheckpoint") and "val/loss" in k)]["best_model_score"]))
    r = run_cli("validate", "--config", str(cfg), "--ckpt_path", "best")
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"best checkpoint: {best}" in r.stderr + r.stdout
    # `last` resolves as fit's does; nothing to load is one line, not a random model's loss.
    r = run_cli("test", "--config", str(cfg), "--ckpt_path", "last")
    assert r.returncode == 0 and f"chosen by --ckpt_path last" in r.stderr + r.stdout, r.stderr[-3000:]
    empty = str(tmp_path / "empty")
    cases = {"validate": "last", "test": "auto", "predict": "best"}
    results = two_at_a_time(lambda sub: run_cli(sub, "--config", str(cfg), "--trainer.default_root_dir", empty,
                                                "--ckpt_path", cases[sub]), cases)
    for sub, r in results.items():
        how = cases[sub]
        assert r.returncode == 2, (sub, r.stderr[-2000:])
        errors = [l for l in r.stderr.splitlines() if l.startswith("gpt2dist: error:")]
        assert len(errors) == 1 and f"--ckpt_path {how}" in errors[0] and "Traceback" not in r.stderr


def test_fit_from_best_resumes_the_best_checkpoint(fitted, tmp_path):
    """`fit --ckpt_path best` was Lightning's: a new process knows no best, and it failed with a traceback
    saying ModelCheckpoint "is not configured to save the best model". Now it resumes the
    best_checkpoint file with the best stored val/loss; with none, one line."""
    tmp, cfg, _ = fitted
    shutil.copytree(tmp / "run" / "checkpoints", tmp_path / "run" / "checkpoints")
    best = min(((torch.load(p, weights_only=True)["callbacks"], p) for p in (tmp_path / "run").glob("checkpoints/best-*.ckpt")),
               key=lambda t: next(float(v["best_model_score"]) for k, v in t[0].items()
                                 if k.startswith("ModelCheckpoint") and "val/loss" in k))[1]
    step = torch.load(best, weights_only=True)["global_step"]
    root = ["--trainer.default_root_dir", str(tmp_path / "run"), "--trainer.logger.init_args.save_dir", str(tmp_path / "run")]
    r = run_cli("fit", "--config", str(cfg), *root, "--ckpt_path", "best", "--trainer.max_steps", str(step + 2),
                "--export.enabled", "false")
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"best checkpoint: {best}" in r.stderr + r.stdout
    last = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == step + 2 and last["loops"]["fit_loop"]["epoch_loop.batch_progress"]["total"]["completed"] == \
        torch.load(best, weights_only=True)["loops"]["fit_loop"]["epoch_loop.batch_progress"]["total"]["completed"] + 2
    r = run_cli("fit", "--config", str(cfg), "--trainer.default_root_dir", str(tmp_path / "empty"), "--ckpt_path", "best")
    errors = [l for l in r.stderr.splitlines() if l.startswith("gpt2dist: error:")]
    assert r.returncode == 2 and len(errors) == 1 and "--ckpt_path best: no best-" in errors[0] and "Traceback" not in r.stderr


def test_validate_or_test_with_no_split_to_evaluate_is_one_line(fitted, tmp_path):
    """Without a validation split (val_fraction 0, no val/test files) Lightning ran 0 batches and exited 0."""
    tmp, cfg, _ = fitted
    subs = ("validate", "test")
    results = two_at_a_time(lambda sub: run_cli(sub, "--config", str(cfg), "--ckpt_path", "last",
                                                "--data.val_fraction", "0", "--data.cache_dir", str(tmp_path / sub)), subs)
    for sub, r in results.items():
        assert r.returncode == 2, (sub, r.stdout[-2000:], r.stderr[-2000:])
        errors = [l for l in r.stderr.splitlines() if l.startswith("gpt2dist: error:")]
        assert len(errors) == 1 and "Traceback" not in r.stderr, (sub, r.stderr[-2000:])
        assert f"gpt2dist {sub}: no validation split to evaluate (data.val_fraction=0.0" in errors[0], errors
        assert ("data.test_files, data.val_files" if sub == "test" else "give data.val_files") in errors[0], errors


def test_print_config_and_overlay_merge(tmp_path, corpus_dir, tokenizer_dir):
    cfg = write_config(tmp_path, corpus_dir, tokenizer_dir)
    overlay = tmp_path / "overlay.yaml"
    overlay.write_text("model:\n  lr: 0.123\ndata:\n  block_size: 32\n")
    r = run_cli("fit", "--config", str(cfg), "--config", str(overlay), "--print_config")
    assert r.returncode == 0, r.stderr
    printed = yaml.safe_load(r.stdout)
    assert printed["model"]["lr"] == 0.123 and printed["data"]["block_size"] == 32
    assert printed["model"]["config_overrides"]["n_layer"] == 2  # kept from the first file


# Bad CLI input (unknown key, block_size > n_positions, empty glob, ...): tests/test_bad_input.py.


def test_prepare_packs_what_fit_reads_without_a_trainer(tmp_path, corpus_dir, tokenizer_dir, tokenizer):
    """`gpt2dist prepare` is fit's data preparation alone: given a GPU/FSDP config and fit's --ckpt_path on
    this GPU-less machine it builds no Trainer, writes no run folder, packs every token of the corpus,
    and `fit` with the same arguments then reads that cache instead of tokenizing again."""
    cfg = write_config(tmp_path, corpus_dir, tokenizer_dir, accelerator="gpu", devices=8, strategy="fsdp")
    r = run_cli("prepare", "--config", str(cfg), "--ckpt_path", "auto")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert not (tmp_path / "run").exists()
    [blocks] = list((tmp_path / "cache" / "blocks").iterdir())
    meta = json.loads((blocks / "meta.json").read_text())
    # Every document of the corpus, each followed by EOS, split between train and val as whole documents.
    ids = [len(tokenizer(t, add_special_tokens=False).input_ids) + 1 for t in corpus_texts()]
    assert meta["train"]["documents"] + meta["val"]["documents"] == len(ids)
    assert meta["train"]["tokens"] + meta["val"]["tokens"] == sum(ids)
    for split in ("train", "val"):
        m = meta[split]
        assert m["blocks"] == m["tokens"] // 64 and m["dropped_tokens"] == m["tokens"] % 64
        assert (blocks / f"{split}.bin").stat().st_size == m["blocks"] * 64 * 2  # uint16
        assert (f"{split}:".ljust(7) + f"{m['blocks']:,} blocks = {m['blocks'] * 64:,} tokens, from {m['documents']:,} "
                f"documents ({m['tokens']:,} tokens") in r.stdout, r.stdout
    assert f"token cache {blocks}: block_size 64, uint16 ids" in r.stdout
    assert "gpt2dist prepare: prepared in" in r.stdout
    # The epoch at the config's world size: 8 processes x 8 blocks per micro-batch, max_steps 30.
    steps = meta["train"]["blocks"] // 8 // 8
    assert (f"one epoch = {steps:,} optimizer steps of 8 seqs x 1 accum x 8 process(es) = 64 seqs x 64 tokens = "
            f"4,096 tokens/step; trainer.max_steps=30 is {30 / steps:.2f} epochs") in r.stdout, r.stdout

    one = ["--trainer.devices", "1", "--trainer.accumulate_grad_batches", "3", "--trainer.max_epochs", "1",
           "--trainer.max_steps", "-1"]
    # eval.sbatch's prepare step gets an evaluation's own options too (--verbose, --return_predictions).
    again = run_cli("prepare", "--config", str(cfg), *one, "--data.eval_stride", "16",  # not part of the cache key
                    "--verbose", "false", "--return_predictions=false")
    assert again.returncode == 0 and "gpt2dist prepare: found in the cache" in again.stdout, again.stderr[-2000:]
    val = meta["val"]["blocks"]  # a stream of 64 x val tokens: a window every 16 from 0 to the last 64
    assert f"eval_stride 16: val {(val * 64 - 64) // 16 + 1:,} windows ({val:,} blocks)" in again.stdout, again.stdout
    steps = -(-(meta["train"]["blocks"] // 8) // 3)  # micro-batches / 3, the last partial one steps too
    assert f"one epoch = {steps:,} optimizer steps of 8 seqs x 3 accum x 1 process(es)" in again.stdout, again.stdout
    written = {p.name: p.stat().st_mtime_ns for p in blocks.iterdir()}
    fit = run_cli("fit", "--config", str(cfg), *one, "--trainer.accelerator", "cpu", "--trainer.strategy", "auto",
                  "--export.enabled", "false")
    assert fit.returncode == 0, fit.stderr[-3000:]
    assert f"using cached blocks {blocks}" in fit.stderr, fit.stderr[-3000:]
    assert {p.name: p.stat().st_mtime_ns for p in blocks.iterdir()} == written
    assert list((tmp_path / "cache" / "blocks").iterdir()) == [blocks]
    # The epoch prepare announced is the one Lightning trained (max_epochs 1: it stopped at the epoch's end).
    last = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    assert last["global_step"] == steps, last["global_step"]


@pytest.mark.parametrize("override, message", [
    (["--data.block_size", "128"],
     "data.block_size=128 exceeds the model's n_positions=64; lower data.block_size to at most 64"),
    (["--model.config_overrides", json.dumps({**TINY, "vocab_size": 100})],
     "the tokenizer has 512 tokens but the model's vocab_size is 100; use the model's own tokenizer or set "
     "model.config_overrides.vocab_size"),
])
def test_prepare_refuses_a_data_section_the_model_cannot_train_before_tokenizing(tmp_path, corpus_dir, tokenizer_dir,
                                                                                 override, message):
    cfg = write_config(tmp_path, corpus_dir, tokenizer_dir)
    r = run_cli("prepare", "--config", str(cfg), *override)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1] == f"gpt2dist: error: {message}", r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "cache" / "blocks").exists()  # nothing tokenized


def test_help_lists_prepare():
    r = run_cli("--help")
    assert r.returncode == 0 and "prepare" in r.stdout and "Tokenize and pack the data of `fit`" in r.stdout, r.stdout


def test_quickstart_config_is_valid():
    r = run_cli("fit", "--config", str(REPO / "configs" / "quickstart.yaml"), "--print_config")
    assert r.returncode == 0, r.stderr
    cfg = yaml.safe_load(r.stdout)
    assert cfg["data"]["train_files"] == ["{stdlib}/*.py"] and cfg["trainer"]["accelerator"] == "cpu"
    # Commented YAML: each knob under its one-line docstring, and the same values.
    r = run_cli("fit", "--config", str(REPO / "configs" / "quickstart.yaml"), "--print_config=comments")
    assert r.returncode == 0, r.stderr[-2000:]
    lines = r.stdout.splitlines()
    at = lines.index("  master_weights: true")
    assert lines[at - 1].startswith("  # Under trainer.precision bf16-true") and "(type: bool, default: True)" in lines[at - 1]
    assert yaml.safe_load(r.stdout) == cfg


def test_the_quickstart_logs_into_the_run_folder_it_is_given(tmp_path, corpus_dir, tokenizer_dir):
    """configs/quickstart.yaml's CSV logger repeated runs/quickstart: with another --trainer.default_root_dir the
    checkpoints went there and metrics.csv and config.yaml to ./runs/quickstart/logs (every SLURM array task
    into one folder). Its save_dir is "{default_root_dir}"."""
    root = tmp_path / "elsewhere"
    r = run_cli("fit", "--config", str(REPO / "configs" / "quickstart.yaml"), "--trainer.default_root_dir", str(root),
                "--trainer.max_steps", "2", "--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "1",
                "--model.config_overrides", json.dumps(TINY), "--model.warmup_steps", "1",
                "--data.train_files", json.dumps([str(corpus_dir / "*.txt")]), "--data.tokenizer", str(tokenizer_dir),
                "--data.block_size", "32", "--data.batch_size", "2",
                "--data.cache_dir", str(tmp_path / "cache"), "--export.enabled", "false", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (root / "logs" / "version_0" / "metrics.csv").is_file() and (root / "logs" / "version_0" / "config.yaml").is_file()
    assert not (tmp_path / "runs").exists() and not (tmp_path / "{default_root_dir}").exists()
    # The saved config keeps the template (it held this run's folder: rerun with another default_root_dir, it
    # logged into this one), as --print_config shows it.
    saved = yaml.safe_load((root / "logs" / "version_0" / "config.yaml").read_text())
    assert saved["trainer"]["logger"]["init_args"]["save_dir"] == "{default_root_dir}"


@pytest.fixture(scope="module")
def composed(request):
    """Each model preset + the local-jsonl data file, `--print_config`, two at a time."""
    return each_row_two_at_a_time(request, "test_model_configs_parse_and_compose_with_local_jsonl", lambda name: run_cli(
        "fit", "--config", str(REPO / "configs" / f"{name}.yaml"), "--config", str(REPO / "configs" / "data" / "local-jsonl.yaml"),
        "--print_config"))


@pytest.mark.parametrize("name", ["gpt2-small", "gpt2-medium", "gpt2-large", "gpt2-xl"])
def test_model_configs_parse_and_compose_with_local_jsonl(composed, request, name):
    r = row_result(composed, request)
    assert r.returncode == 0, r.stderr
    cfg = yaml.safe_load(r.stdout)
    assert cfg["trainer"]["precision"] == "bf16-mixed"
    assert cfg["data"]["dataset_name"] is None and cfg["data"]["train_files"] == ["data/train/*.jsonl"]
    assert cfg["data"]["val_split"] is None and cfg["data"]["test_split"] is None
    from gpt2dist.data import TokenBlockDataModule

    TokenBlockDataModule(**cfg["data"])  # the composed data section passes the DataModule's own checks
    assert cfg["model"]["model_name_or_path"] == name.replace("gpt2-small", "gpt2")


def test_predict_reads_a_prompt_file_in_batches_and_samples_reproducibly(fitted, tmp_path):
    """`--data.predict_file`: a .txt file (one prompt per line) or .jsonl records. Batching the prompts
    (longest first, left-padded) changes no row, greedy or sampled; sampling writes samples_per_prompt rows
    per prompt in prompt order, each with its own seed, and another generation_seed draws other text."""
    tmp, cfg, _ = fitted
    ckpt = str(tmp / "run" / "checkpoints" / "last.ckpt")
    lines = ["def main(", "import os", "", "class Parser(object):", "x", "for i in range(10):"]
    prompts = [line for line in lines if line]
    (tmp_path / "prompts.txt").write_text("\n".join(lines) + "\n")
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p, "id": i}) + "\n" for i, p in enumerate(prompts)))

    def predict(name, *args):
        out = tmp_path / name
        r = run_cli("predict", "--config", str(cfg), "--ckpt_path", ckpt, "--trainer.default_root_dir", str(out),
                    "--trainer.logger", "false", "--data.predict_prompts", "null", "--model.max_new_tokens", "6", *args)
        assert r.returncode == 0, r.stderr[-3000:]
        return [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]

    txt = str(tmp_path / "prompts.txt")
    sample = ["--model.do_sample", "true", "--model.temperature", "1.3", "--model.samples_per_prompt", "2"]
    runs = {"greedy1": ["--data.predict_file", txt, "--data.predict_batch_size", "1"],
            "greedy4": ["--data.predict_file", str(tmp_path / "prompts.jsonl"), "--data.predict_batch_size", "4"],
            "sampled1": ["--data.predict_file", txt, "--data.predict_batch_size", "1", *sample],
            "sampled3": ["--data.predict_file", txt, "--data.predict_batch_size", "3", *sample],
            "seed9": ["--data.predict_file", txt, *sample, "--model.generation_seed", "9"]}
    got = two_at_a_time(lambda name: predict(name, *runs[name]), runs)
    one, s1, other = got["greedy1"], got["sampled1"], got["seed9"]
    assert [(r["index"], r["sample"], r["prompt"]) for r in one] == [(i, 0, p) for i, p in enumerate(prompts)]
    assert all(r["text"].startswith(r["prompt"]) and len(r["text"]) > len(r["prompt"]) for r in one)
    assert got["greedy4"] == one
    stop = one[0]["text"][len(prompts[0])]  # the first new character: row 0 stops after its first token
    stopped = predict("stopped", "--data.predict_file", txt, "--model.stop_strings", json.dumps([stop]))
    assert all(b["text"].startswith(a["text"]) for a, b in zip(stopped, one))
    assert len(stopped[0]["text"]) < len(one[0]["text"]) and stop in stopped[0]["text"][len(prompts[0]):]
    assert [(r["index"], r["sample"]) for r in s1] == [(i, j) for i in range(len(prompts)) for j in (0, 1)]
    assert sum(a["text"] != b["text"] for a, b in zip(s1[::2], s1[1::2])) >= 3  # two samples of a prompt differ
    assert sum(a["text"] != b["text"] for a, b in zip(s1[::2], one)) >= 3  # and sampling is not greedy
    assert got["sampled3"] == s1
    assert sum(a["text"] != b["text"] for a, b in zip(other, s1)) >= 6


@pytest.mark.parametrize("args, says", [
    (["--data.predict_file", "{d}/prompts.txt"], "set either data.predict_prompts or data.predict_file, not both; "
                                                 "unset one (e.g. --data.predict_prompts null)"),
    (["--data.predict_prompts", "null", "--data.predict_file", "{d}/missing.txt"],
     "data.predict_file: file '{d}/missing.txt' does not exist"),
    (["--data.predict_prompts", "null", "--data.predict_file", "{d}/blank.txt"], "data.predict_file {d}/blank.txt holds no prompt"),
    (["--data.predict_prompts", "null", "--data.predict_file", "{d}/prompts.jsonl"], "{d}/prompts.jsonl:2: record has no field 'prompt'; set data.predict_text_field"),
    (["--data.predict_prompts", "null", "--data.predict_file", "{d}/binary.txt"],
     "data.predict_file {d}/binary.txt: looks binary (NUL bytes); give UTF-8 text (one prompt per line) or JSON lines"),
    (["--model.samples_per_prompt", "3"], "model.samples_per_prompt=3 needs model.do_sample=true"),
    (["--model.do_sample", "true", "--model.top_p", "1.5"], "model.top_p=1.5 must be in (0, 1]"),
    (["--model.stop_strings", '["\\n\\n", ""]'], "model.stop_strings must not hold an empty string"),
    # As fit says it (Lightning's own refusal here was a RuntimeError traceback, exit 1).
    (["--config", str(REPO / "configs/strategy/fsdp1.yaml")], "(FSDP1) needs CUDA GPUs, but the accelerator is cpu"),
])
def test_bad_predict_input_is_one_line(bad_predict_runs, request, args, says):
    d, r = row_result(bad_predict_runs, request)
    errors = [line for line in r.stderr.splitlines() if line.startswith("gpt2dist: error:")]
    assert r.returncode == 2 and len(errors) == 1 and says.replace("{d}", str(d)) in errors[0], r.stderr[-2000:]
    assert "Traceback" not in r.stderr and not (d / "out" / "predictions.jsonl").exists()


@pytest.fixture(scope="module")
def bad_predict_runs(fitted, tmp_path_factory, request):
    """Each row's `predict`, two at a time, each in a folder of its own with the same prompt files."""
    tmp, cfg, _ = fitted

    def run(args, says):
        d = tmp_path_factory.mktemp("bad_predict")
        (d / "prompts.txt").write_text("def \n")
        (d / "blank.txt").write_text("\n  \n")
        (d / "binary.txt").write_bytes(b"def \x00\x01\x02\n")
        (d / "prompts.jsonl").write_text('{"prompt": "def "}\n{"text": "import "}\n')
        return d, run_cli("predict", "--config", str(cfg), "--ckpt_path", str(tmp / "run/checkpoints/last.ckpt"),
                          "--trainer.default_root_dir", str(d / "out"), "--trainer.logger", "false",
                          *[a.replace("{d}", str(d)) for a in args])

    return each_row_two_at_a_time(request, "test_bad_predict_input_is_one_line", run)


def test_export_source_best_exports_the_best_checkpoint(fitted, tmp_path):
    """`export.source: best` exports the best_checkpoint's weights, not the final ones. best_checkpoint.mode
    max makes the worse of the two validations (step 15) the "best", so the two cannot coincide."""
    from safetensors.torch import load_file

    from gpt2dist.export import export_checkpoint

    _, cfg, _ = fitted
    root = ["--trainer.default_root_dir", str(tmp_path / "run"), "--trainer.logger", "false"]
    r = run_cli("fit", "--config", str(cfg), *root, "--export.source", "best", "--best_checkpoint.mode", "max")
    assert r.returncode == 0, r.stderr[-3000:]
    [best] = (tmp_path / "run" / "checkpoints").glob("best-*.ckpt")
    assert best.name == "best-step0000015.ckpt"
    assert f"exported Hugging Face model to {tmp_path / 'run' / 'hf_model'} from the best checkpoint {best} (step 15, val/loss" \
        in r.stdout + r.stderr
    export_checkpoint(best, tmp_path / "from_best")
    export_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt", tmp_path / "from_last")
    got, want, last = (load_file(tmp_path / d / "model.safetensors") for d in ("run/hf_model", "from_best", "from_last"))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)
    assert not all(torch.equal(got[k], last[k]) for k in got)  # the final weights differ: the check can fail
    # Up to a step: a rollback's export (after_fit, nothing left to train) skips a later branch's best files.
    from gpt2dist.errors import CheckpointError
    from gpt2dist.resume import best_checkpoint

    ck = tmp_path / "run" / "checkpoints"
    assert best_checkpoint(ck, "best-step{step:07d}", "val/loss", "max") == str(best)
    with pytest.raises(CheckpointError, match="none of"):
        best_checkpoint(ck, "best-step{step:07d}", "val/loss", "max", max_step=14)


def test_predict_from_an_exported_model_needs_no_training_data(fitted, tmp_path):
    """predict needs a model and a tokenizer: it required data.train_files and packed the whole training
    corpus (with the gpt2-* presets: WikiText-103 from the hub) before generating a token."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gpt2dist.generation import generate_texts

    hf = fitted[0] / "run" / "hf_model"
    prompts = ["def main(", "import "]
    r = run_cli("predict", "--model.model_name_or_path", str(hf), "--data.tokenizer", str(hf),
                "--data.predict_prompts", json.dumps(prompts), "--model.max_new_tokens", "8",
                "--data.cache_dir", str(tmp_path / "cache"), "--trainer.default_root_dir", str(tmp_path / "out"),
                "--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.logger", "false")
    assert r.returncode == 0, r.stderr[-3000:]
    preds = [json.loads(line) for line in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()]
    model = AutoModelForCausalLM.from_pretrained(hf, local_files_only=True).eval()
    expected = generate_texts(model, AutoTokenizer.from_pretrained(hf, local_files_only=True), prompts, 8)
    assert [p["text"] for p in preds] == expected and all(len(t) > len(p) for t, p in zip(expected, prompts))
    assert not (tmp_path / "cache" / "blocks").exists()  # nothing packed
    fit = run_cli("fit", "--model.model_name_or_path", str(hf), "--data.tokenizer", str(hf),
                  "--data.cache_dir", str(tmp_path / "cache"), "--trainer.default_root_dir", str(tmp_path / "fit"))
    errors = [line for line in fit.stderr.splitlines() if line.startswith("gpt2dist: error:")]
    assert fit.returncode == 2 and errors == ["gpt2dist: error: no training data: set data.train_files (paths or globs) "
                                              "or data.dataset_name"], fit.stderr[-2000:]


@pytest.mark.parametrize("devices, world", [("0,1", 2), ("3,", 1), ([0, 1, 2], 3), ("4", 4), (2, 2)])
def test_prepare_counts_device_ids_as_lightning_does(devices, world):
    from types import SimpleNamespace

    from gpt2dist.cli import _epoch_line

    data = SimpleNamespace(batch_size=8, block_size=64, optimizer_steps_per_epoch=lambda w, a: 1000 // (w * a))
    trainer = SimpleNamespace(devices=devices, num_nodes=1, accumulate_grad_batches=1, max_steps=-1)
    assert _epoch_line(data, trainer) == (f"one epoch = {1000 // world:,} optimizer steps of 8 seqs x 1 accum x {world} "
                                          f"process(es) = {8 * world} seqs x 64 tokens = {8 * world * 64:,} tokens/step")


def test_a_gpu_preset_trains_as_shipped_but_for_its_hardware_size_and_data(tmp_path, corpus_dir, tokenizer_dir):
    """configs/gpt2-large.yaml with its own precision (bf16-mixed), clipping, accumulation, compile, vocabulary
    padding and optimizer settings; only the machine (1 CPU), the model size, the data and the step count
    are changed. The combination was never run whole: Lightning's AMP plugin refused to clip for the fused
    AdamW, so every GPU preset died at its first optimizer step."""
    root = tmp_path / "run"
    p = run_cli("fit", "--config", "configs/gpt2-large.yaml",
                "--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.max_steps=4", "--trainer.val_check_interval=4",
                "--trainer.limit_val_batches=2", "--trainer.log_every_n_steps=1", f"--trainer.default_root_dir={root}",
                "--trainer.logger=lightning.pytorch.loggers.CSVLogger", f"--trainer.logger.save_dir={root}",
                "--trainer.logger.name=logs", "--trainer.enable_progress_bar=false",
                "--model.from_scratch=true", f"--model.config_overrides={json.dumps(TINY)}", "--model.warmup_steps=1",
                "--data.dataset_name=null", "--data.dataset_config=null", "--data.val_split=null", "--data.test_split=null",
                "--data.dataset_rows=documents",
                f"--data.train_files=[{corpus_dir}/*.txt]", f"--data.tokenizer={tokenizer_dir}", "--data.val_fraction=0.2",
                "--data.block_size=64", "--data.batch_size=2", "--data.num_workers=0", f"--data.cache_dir={tmp_path / 'cache'}",
                "--export.sample_prompt=null", timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "GPT2Blocks compiled regionally" in p.stdout + p.stderr
    rows = metrics(root)
    losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    norms = [float(r["train/grad_norm"]) for r in rows if r.get("train/grad_norm")]
    assert len(losses) == len(norms) == 4 and all(math.isfinite(x) for x in losses + norms), rows
    config = yaml.safe_load((root / "logs" / "version_0" / "config.yaml").read_text())
    assert (config["trainer"]["precision"], config["trainer"]["gradient_clip_val"], config["trainer"]["accumulate_grad_batches"],
            config["model"]["compile"], config["model"]["pad_vocab_to_multiple_of"]) == ("bf16-mixed", 1.0, 2, True, 128)
    from safetensors.torch import load_file

    assert load_file(root / "hf_model" / "model.safetensors")["transformer.wte.weight"].shape[0] == 512  # unpadded


def test_a_resume_from_last_keeps_the_best_its_validation_saved(tmp_path, corpus_dir, tokenizer_dir):
    """At a validation the step callback writes last.ckpt before best_checkpoint saves: a finished run's last.ckpt
    (step 30) holds the best state of before step 30's validation (best-step0000015.ckpt, deleted by
    save_top_k 1). Extended from it with a far higher lr, the new best (step 30) was forgotten and the worse
    step 45 exported as "best". The run folder's best files up to the resumed step are read back."""
    cfg = write_config(tmp_path, corpus_dir, tokenizer_dir)
    run = tmp_path / "run"
    r = run_cli("fit", "--config", str(cfg), "--trainer.logger", "false", "--export.sample_prompt", "null")
    assert r.returncode == 0, r.stderr[-3000:]
    assert [p.name for p in (run / "checkpoints").glob("best-*")] == ["best-step0000030.ckpt"]
    r = run_cli("fit", "--config", str(cfg), "--trainer.logger", "false", "--export.sample_prompt", "null",
                "--export.source", "best", "--model.lr", "0.3", "--trainer.max_steps", "45", "--ckpt_path", "last")
    assert r.returncode == 0, r.stderr[-3000:]
    out = " ".join((r.stdout + r.stderr).split())
    best = run / "checkpoints" / "best-step0000030.ckpt"
    assert "resume: val/loss's best checkpoint(s) best-step0000030.ckpt (" in out, out[-3000:]
    assert sorted(p.name for p in (run / "checkpoints").glob("best-*")) == ["best-step0000030.ckpt"]  # 45 is worse
    assert f"exported Hugging Face model to {run / 'hf_model'} from the best checkpoint {best} (step 30" in out, out[-2000:]


def test_a_fit_killed_while_exporting_gets_its_export_on_the_rerun(tmp_path, corpus_dir, tokenizer_dir):
    """SIGKILL right after the export wrote its temporary folder (an OOM in the gather, SLURM's kill after the
    grace period): last.ckpt is at max_steps, so the rerun's fit loop did not run, nor the export, and it exited
    0 with no hf_model and a model-sized .hf_model.tmp-* left for good. The rerun exports from the checkpoint,
    from another working directory (the recorded tokenizer path is absolute), and removes the dead temp."""
    from safetensors.torch import load_file

    from gpt2dist.export import load_checkpoint_file

    cfg = write_config(tmp_path, corpus_dir, tokenizer_dir, max_steps=15)
    run = tmp_path / "run"
    killer = ("import os, signal, sys, transformers.modeling_utils as mu\n"
              "o = mu.PreTrainedModel.save_pretrained\n"
              "def s(self, d, *a, **k):\n    o(self, d, *a, **k); os.kill(os.getpid(), signal.SIGKILL)\n"
              "mu.PreTrainedModel.save_pretrained = s\n"
              "sys.argv = ['gpt2dist', *sys.argv[1:]]\nfrom gpt2dist.__main__ import run\nrun()\n")
    args = ["fit", "--config", str(cfg), "--trainer.logger", "false", "--export.sample_prompt", "null",
            "--data.tokenizer", os.path.relpath(tokenizer_dir, tmp_path)]  # relative to where fit runs
    p = run_group([sys.executable, "-c", killer, *args], 600, cwd=tmp_path, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert p.returncode == -9, p.stderr[-3000:]
    assert not (run / "hf_model").exists() and len(list(run.glob(".hf_model.tmp-*"))) == 1
    r = run_cli(*args, "--ckpt_path", "last", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    out = " ".join((r.stdout + r.stderr).split())
    assert "its Hugging Face export is missing (killed while exporting?)" in out
    assert f"exported Hugging Face model to {run / 'hf_model'} from" in out
    assert not list(run.glob(".hf_model.tmp-*"))
    exported = load_file(run / "hf_model" / "model.safetensors")
    trained = load_checkpoint_file(run / "checkpoints" / "last.ckpt")["state_dict"]
    assert all(torch.equal(exported[k], trained[f"model.{k}"]) for k in exported)
    assert (run / "hf_model" / "tokenizer.json").is_file()
    # The recorded tokenizer is the folder's absolute path: tools/export_hf.py finds it from anywhere.
    assert load_checkpoint_file(run / "checkpoints" / "last.ckpt")["tokenizer_name_or_path"] == str(tokenizer_dir)
    p = subprocess.run([sys.executable, str(REPO / "tools" / "export_hf.py"), str(run / "checkpoints" / "last.ckpt"),
                        str(tmp_path / "again")], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert p.returncode == 0 and (tmp_path / "again" / "tokenizer.json").is_file(), p.stderr[-2000:]


def test_a_rollback_whose_best_checkpoint_is_gone_saves_and_exports_its_own_best(tmp_path, corpus_dir, tokenizer_dir):
    """Rolled back to step 16 (its best then: best-step0000015.ckpt, which save_top_k 1 deleted at step 30) with a
    far higher lr: the run never beat the restored score, saved no best, and export.source=best failed after
    training ("does not exist"), leaving the abandoned run's hf_model in place. The missing best is forgotten
    at train start, so step 30's validation saves this run's best, which is exported."""
    cfg = write_config(tmp_path, corpus_dir, tokenizer_dir)
    run = tmp_path / "run"
    every = ["--checkpoint.every_n_train_steps", "1", "--checkpoint.save_top_k", "-1"]  # a step file per step, all kept
    r = run_cli("fit", "--config", str(cfg), "--trainer.logger", "false", "--export.sample_prompt", "null", *every)
    assert r.returncode == 0, r.stderr[-3000:]
    assert [p.name for p in (run / "checkpoints").glob("best-*")] == ["best-step0000030.ckpt"]  # 15's was deleted
    r = run_cli("fit", "--config", str(cfg), "--trainer.logger", "false", "--export.sample_prompt", "null", *every,
                "--export.source", "best", "--model.lr", "0.3", "--ckpt_path", str(run / "checkpoints" / "step0000016.ckpt"))
    assert r.returncode == 0, r.stderr[-3000:]
    out = " ".join((r.stdout + r.stderr).split())
    assert f"resume: val/loss's best checkpoint(s) {run / 'checkpoints' / 'best-step0000015.ckpt'} no longer exist" in out
    best = run / "checkpoints" / "best-step0000030.ckpt"  # this run's, written at its step 30
    assert f"exported Hugging Face model to {run / 'hf_model'} from the best checkpoint {best} (step 30" in out, out[-2000:]
