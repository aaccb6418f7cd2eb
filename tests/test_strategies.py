"""Strategies on CPU with real processes (gloo): overlays parse, single vs DDP x2 vs FSDP2 x2
loss parity, FSDP2 sharded resume + export, two-node emulation, and the GPU check's CPU smoke."""

from __future__ import annotations

import csv
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from conftest import REPO, TINY, run_cli, two_at_a_time

TESTS = Path(__file__).resolve().parent

OVERLAYS = ["ddp", "fsdp", "fsdp1", "deepspeed_zero1", "deepspeed_zero2", "deepspeed_zero3", "deepspeed_zero3_offload"]
STEPS = 10
GLOBAL_BATCH = 4  # sequences per optimizer step, whatever the number of processes


def write_config(tmp: Path, corpus_dir: Path, tokenizer_dir: Path, name: str, devices: int, *, model: dict | None = None,
                 sections: dict | None = None, **trainer) -> Path:
    root = tmp / name
    cfg = {
        "seed_everything": 7,
        "trainer": {"accelerator": "cpu", "devices": devices, "precision": "32-true", "max_steps": STEPS,
                    "val_check_interval": STEPS, "check_val_every_n_epoch": None, "limit_val_batches": 2,
                    "num_sanity_val_steps": 0, "log_every_n_steps": 1, "enable_progress_bar": False,
                    "enable_model_summary": False, "default_root_dir": str(root),
                    # As every preset: the tiny model's norms are 1.0 to 2.1 here, so each strategy clips at
                    # most steps (FSDP1 refused to: Lightning's FSDPPrecision has no norm clipping).
                    "gradient_clip_val": 1.0,
                    "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger",
                               "init_args": {"save_dir": str(root), "name": "logs", "version": 0}}, **trainer},
        "model": {"model_name_or_path": "gpt2", "from_scratch": True, "config_overrides": TINY, "dropout": 0.0,
                  "lr": 1e-3, "warmup_steps": 2, **(model or {})},
        "data": {"train_files": [str(corpus_dir / "*.txt")], "tokenizer": str(tokenizer_dir), "block_size": 32,
                 # DDP/FSDP x2 get half the sequences per rank: the same global batch of 4.
                 "batch_size": GLOBAL_BATCH // (devices * trainer.get("num_nodes", 1)), "num_workers": 0,
                 "val_fraction": 0.1, "cache_dir": str(tmp / "cache")},
        "export": {"sample_prompt": None},
        **(sections or {}),
    }
    root.mkdir(parents=True, exist_ok=True)
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def train_losses(root: Path, version: int = 0, key: str = "train/loss") -> dict[int, float]:
    """Per-step `key` from the CSV log (step = global step - 1, as Lightning logs it)."""
    with open(root / "logs" / f"version_{version}" / "metrics.csv") as f:
        return {int(r["step"]): float(r[key]) for r in csv.DictReader(f) if r.get(key)}


def fit(config: Path, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    p = run_cli("fit", "--config", str(config), *args, timeout=timeout)
    assert p.returncode == 0, p.stderr[-3000:]
    return p


@pytest.fixture(scope="module")
def runs(tmp_path_factory, corpus_dir, tokenizer_dir):
    """10 steps each: single process, DDP x2, FSDP2 x2 (saving a checkpoint every 5 steps), FSDP2 x2 with
    cpu_offload (CPUOffloadPolicy without pinned memory: it needs an accelerator)."""
    tmp = tmp_path_factory.mktemp("strategies")
    single = write_config(tmp, corpus_dir, tokenizer_dir, "single", 1)
    fit(single)  # also prepares the token cache the two-process runs share
    extra = {"ddp": ["--config", str(REPO / "configs/strategy/ddp.yaml")],
             "fsdp": ["--config", str(REPO / "configs/strategy/fsdp.yaml"), "--checkpoint.every_n_train_steps", "5",
                      "--checkpoint.save_top_k", "-1"],
             "fsdp_offload": ["--config", str(REPO / "configs/strategy/fsdp.yaml"), "--trainer.strategy.cpu_offload", "true"]}

    def run(name):
        p = fit(write_config(tmp, corpus_dir, tokenizer_dir, name, 2), *extra[name])
        (tmp / name / "fit.log").write_text(p.stdout + p.stderr)

    # Side by side: 4 processes (1 thread each) on 2 cores; a failed run raises here.
    two_at_a_time(run, extra)
    return tmp


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_overlay_parses(overlay):
    """A preset, then each strategy overlay: the overlay's strategy and knobs, the rest of the preset.
    configs/gpt2-*.yaml compile and pad the vocabulary; the overlays of strategies where compile is not
    measured turn it off, and ZeRO-3's (which cannot resize a partitioned embedding) the padding too."""
    p = run_cli("fit", "--print_config", "--config", "configs/gpt2-large.yaml", "--config", f"configs/strategy/{overlay}.yaml",
                timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    # The whole of stdout is the config, ready to save and read back (DeepSpeed's import logged a line
    # "[date] [WARNING] ... accelerator to CPU" into it).
    printed = yaml.safe_load(p.stdout)
    overlay_cfg = yaml.safe_load((REPO / "configs/strategy" / f"{overlay}.yaml").read_text())
    assert printed["trainer"]["strategy"]["class_path"] == overlay_cfg["trainer"]["strategy"]["class_path"]
    for key, value in overlay_cfg["trainer"]["strategy"]["init_args"].items():
        assert printed["trainer"]["strategy"]["init_args"][key] == value, key
    fast = overlay in ("ddp", "fsdp")  # compile measured on a GPU under these two
    model = printed["model"]
    assert (model["compile"], model["pad_vocab_to_multiple_of"], model["tf32"]) == (fast, 1 if "zero3" in overlay else 128, True)
    # The rest of the preset is untouched by the overlay.
    base = yaml.safe_load((REPO / "configs/gpt2-large.yaml").read_text())
    assert model["model_name_or_path"] == base["model"]["model_name_or_path"] == "gpt2-large"
    assert printed["data"]["block_size"] == base["data"]["block_size"] == 1024


def test_a_later_overlay_replaces_the_earlier_ones_strategy_knobs():
    """Overlays of one class merge (jsonargparse keeps the init_args a later file does not name): ZeRO-2
    after ZeRO-3 offload must not keep offloading."""
    p = run_cli("fit", "--print_config", "--config", "configs/quickstart.yaml", "--config",
                "configs/strategy/deepspeed_zero3_offload.yaml", "--config", "configs/strategy/deepspeed_zero2.yaml", timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    args = yaml.safe_load(p.stdout)["trainer"]["strategy"]["init_args"]
    assert (args["stage"], args["offload_optimizer"], args["offload_parameters"]) == (2, False, False)


def test_presets_turn_the_speed_knobs_on():
    """configs/gpt2-large.yaml alone compiles and pads the vocabulary (each overlay: test_every_overlay_parses)."""
    p = run_cli("fit", "--print_config", "--config", "configs/gpt2-large.yaml", timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    model = yaml.safe_load(p.stdout)["model"]
    assert (model["compile"], model["pad_vocab_to_multiple_of"], model["tf32"]) == (True, 128, True)


@pytest.mark.parametrize("overlay", ["ddp", "fsdp", "fsdp1", "deepspeed_zero2", "deepspeed_zero3"])
def test_compiled_padded_model_under_two_processes_gives_one_eager_processs_losses(runs, overlay, tmp_path, corpus_dir,
                                                                                  tokenizer_dir, request):
    """The presets' speed knobs (regional compile, vocabulary padded 512 -> 768 rows) under DDP x2 and
    FSDP2 x2, gloo: the 10 losses of the eager, unpadded single process, and the export keeps 512 rows.
    FSDP1, ZeRO-2 and ZeRO-3 (their overlays turn compile off until a GPU measures it) take it when
    asked; ZeRO-3 unpadded (it cannot resize a partitioned embedding)."""
    zero3 = overlay == "deepspeed_zero3"
    model, single = {"compile": True, "pad_vocab_to_multiple_of": 1 if zero3 else 384}, runs / "single"
    if zero3:  # deepspeed.zero.Init draws a from-scratch init in another order: both load ds_runs' weights
        ds = request.getfixturevalue("ds_runs")
        model.update(model_name_or_path=str(ds / "pretrained"), from_scratch=False)
        single = ds / "single"
    cfg = write_config(tmp_path, corpus_dir, tokenizer_dir, overlay, 2, model=model)
    if overlay in GPU_ONLY:
        p = ds_fit(cfg, overlay, "--model.compile", "true")
    else:
        p = fit(cfg, "--config", str(REPO / f"configs/strategy/{overlay}.yaml"), timeout=600)
    assert "2 GPT2Blocks compiled regionally" in p.stdout + p.stderr
    single, other = train_losses(single), train_losses(tmp_path / overlay)
    assert sorted(other) == sorted(single) == list(range(STEPS))
    diff = max(abs(single[s] - other[s]) for s in single)
    assert diff < 1e-4, (diff, single, other)
    from safetensors.torch import load_file

    weights = load_file(tmp_path / overlay / "hf_model" / "model.safetensors")
    assert weights["transformer.wte.weight"].shape[0] == 512


def test_single_ddp_fsdp2_losses_agree(runs):
    single, ddp, fsdp, offload = (train_losses(runs / n) for n in ("single", "ddp", "fsdp", "fsdp_offload"))
    assert sorted(single) == list(range(STEPS)) and sorted(ddp) == sorted(fsdp) == sorted(offload) == sorted(single)
    # cpu_offload on a CPU mesh: pinned memory (its default) stopped the run at fully_shard, after data packing
    assert "CPU offload True" in (runs / "fsdp_offload" / "fit.log").read_text()
    for other in (ddp, fsdp, offload):
        diff = max(abs(single[s] - other[s]) for s in single)
        assert diff < 1e-5, (diff, single, other)
    assert single[STEPS - 1] < single[0] - 0.05  # it trained: equal losses are not equal constants


def test_strided_evaluation_under_ddp_gives_one_processs_loss(runs, tmp_path):
    """`test --data.eval_stride 8` on DDP x2 from the single run's checkpoint: the windows are shared out
    with a padded, weight-0 tail and each window's scored count travels with it, so the token-weighted
    loss is one process's."""
    def test_loss(name: str, *args: str) -> float:
        p = run_cli("test", "--config", str(runs / "single" / "config.yaml"), "--ckpt_path",
                    str(runs / "single" / "checkpoints" / "last.ckpt"), "--trainer.logger", "false",
                    "--trainer.default_root_dir", str(tmp_path / name), "--data.eval_stride", "8", *args, timeout=300)
        assert p.returncode == 0, p.stderr[-3000:]
        [line] = [x for x in p.stdout.splitlines() if x.startswith("test ") and "test/loss " in x]
        return float(line.split("test/loss ")[1].split()[0])

    cases = {"one": [], "ddp": ["--config", str(REPO / "configs/strategy/ddp.yaml"), "--trainer.devices", "2"],
             "disjoint": ["--data.eval_stride", "32"]}
    loss = two_at_a_time(lambda name: test_loss(name, *cases[name]), cases)
    assert loss["ddp"] == pytest.approx(loss["one"], abs=1e-4)
    assert abs(loss["disjoint"] - loss["one"]) > 1e-3  # disjoint blocks score another loss: the check can fail


def test_fsdp2_sharded_checkpoint_resumes_exactly(runs):
    ckpt = runs / "fsdp" / "checkpoints" / "step0000005.ckpt"
    assert ckpt.is_dir() and (ckpt / ".metadata").is_file()
    assert sorted(p.name for p in ckpt.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]  # one shard per rank
    fit(runs / "fsdp" / "config.yaml", "--config", str(REPO / "configs/strategy/fsdp.yaml"),
        "--trainer.logger.init_args.version", "1", "--ckpt_path", str(ckpt), "--export.enabled", "false")
    full, resumed = train_losses(runs / "fsdp"), train_losses(runs / "fsdp", version=1)
    assert sorted(resumed) == list(range(5, STEPS))  # steps 6..10 (logged 0-based)
    for s in resumed:
        assert abs(resumed[s] - full[s]) < 1e-6, (s, resumed[s], full[s])


def test_sharded_folder_under_one_process_is_one_line(runs):
    """An FSDP2 folder resumed without the FSDP2 overlay: Lightning would torch.load a folder (a traceback
    per rank). One line names the checkpoint, the overlay that loads it and the export route."""
    p = run_cli("fit", "--config", str(runs / "fsdp" / "config.yaml"), "--trainer.devices", "1",
                "--ckpt_path", str(runs / "fsdp" / "checkpoints" / "step0000005.ckpt"), timeout=300)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-3000:]
    line = [l for l in p.stderr.splitlines() if l.startswith("gpt2dist: error:")]
    assert len(line) == 1 and "sharded (torch.distributed.checkpoint) folder" in line[0]
    assert "configs/strategy/fsdp.yaml" in line[0] and "tools/export_hf.py" in line[0]


@pytest.mark.parametrize("source, target", [("single", "fsdp"), ("fsdp_file", "fsdp"), ("single", "fsdp1")])
def test_fsdp_resumes_a_single_file_checkpoint_exactly(source, target, tmp_path, corpus_dir, tokenizer_dir):
    """FSDP2 (or FSDP1) x2 from one file: a one-process run's (switching strategy after an OOM), or FSDP2's own with
    save_distributed_checkpoint false. AdamW's groups (decay first) are not model.parameters() order,
    which is how Lightning matched a file's optimizer state to parameters (moments of other shapes; FSDP1
    first died on the state_dict it had popped, then corrupted the heap in the fused step)."""
    from cpu_strategies import cpu_overlay

    fsdp = ["--config", str(REPO / "configs/strategy/fsdp.yaml"), "--trainer.strategy.init_args.save_distributed_checkpoint", "false"]
    first = fsdp if source == "fsdp_file" else []
    config = write_config(tmp_path, corpus_dir, tokenizer_dir, source, 2 if first else 1)
    fit(config, *first, "--checkpoint.every_n_train_steps", "5", "--checkpoint.save_top_k", "-1", "--export.enabled", "false")
    ckpt = tmp_path / source / "checkpoints" / "step0000005.ckpt"
    assert ckpt.is_file()
    if target == "fsdp1":
        fsdp = ["--config", str(cpu_overlay("fsdp1", tmp_path))]
    p = run_cli("fit", "--config", str(config), *fsdp, "--trainer.devices", "2", "--data.batch_size", str(GLOBAL_BATCH // 2),
                "--trainer.logger.init_args.version", "1", "--ckpt_path", str(ckpt), "--export.enabled", "false",
                timeout=300, env={"PYTHONPATH": f"{TESTS}{os.pathsep}{REPO}"})  # the CPU FSDP1 class
    assert p.returncode == 0, p.stderr[-3000:]
    full, resumed = train_losses(tmp_path / source), train_losses(tmp_path / source, version=1)
    assert sorted(resumed) == list(range(5, STEPS))
    for s in resumed:
        assert abs(resumed[s] - full[s]) < 1e-5, (s, resumed[s], full[s])


def _logits(folder: Path) -> torch.Tensor:
    from transformers import GPT2LMHeadModel

    model = GPT2LMHeadModel.from_pretrained(str(folder)).eval()
    x = torch.arange(2 * 32).view(2, 32) % model.config.vocab_size  # a fixed batch
    with torch.no_grad():
        return model(x).logits


def test_fsdp2_checkpoint_exports_the_trained_model(runs, tmp_path):
    out = tmp_path / "hf"
    p = subprocess.run([sys.executable, str(REPO / "tools/export_hf.py"), str(runs / "fsdp/checkpoints/step0000010.ckpt"),
                        str(out)], capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert p.returncode == 0, p.stderr[-2000:]
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= {f.name for f in out.iterdir()}
    # The end-of-fit export gathered the live (sharded) module's weights after step 10.
    trained = _logits(runs / "fsdp" / "hf_model")
    assert torch.equal(_logits(out), trained)
    assert (_logits(runs / "single" / "hf_model") - trained).abs().max() < 1e-4  # FSDP2 trained what 1 process trains
    subprocess.run([sys.executable, str(REPO / "tools/export_hf.py"), str(runs / "fsdp/checkpoints/step0000005.ckpt"),
                    str(tmp_path / "hf5")], check=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert not torch.allclose(_logits(tmp_path / "hf5"), trained)  # step 5 differs: the check can fail


@pytest.mark.parametrize("overlay", ["fsdp", "deepspeed_zero3"])
def test_export_source_best_exports_a_sharded_best_checkpoint(overlay, tmp_path, corpus_dir, tokenizer_dir):
    """`export.source: best` under FSDP2 / ZeRO-3 x2: rank 0 consolidates the best checkpoint folder (step 5;
    best_checkpoint.mode max makes the worse validation "best") while the other waits, and exports it."""
    from safetensors.torch import load_file

    from gpt2dist.export import export_checkpoint

    config = write_config(tmp_path, corpus_dir, tokenizer_dir, overlay, 2, val_check_interval=5)
    args = ["--export.source", "best", "--best_checkpoint.mode", "max"]
    if overlay == "fsdp":
        p = fit(config, "--config", str(REPO / "configs/strategy/fsdp.yaml"), *args)
    else:
        p = ds_fit(config, overlay, *args)
        assert p.returncode == 0, p.stderr[-3000:]
    [best] = (tmp_path / overlay / "checkpoints").glob("best-*.ckpt")
    assert best.name == "best-step0000005.ckpt" and best.is_dir()
    assert f"from the best checkpoint {best} (step 5, val/loss" in p.stdout + p.stderr
    export_checkpoint(best, tmp_path / "from_best")
    export_checkpoint(tmp_path / overlay / "checkpoints" / "last.ckpt", tmp_path / "from_last")
    got, want, last = (load_file(tmp_path / d / "model.safetensors") for d in (f"{overlay}/hf_model", "from_best", "from_last"))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)
    assert not all(torch.equal(got[k], last[k]) for k in got)  # the final weights differ: the check can fail


def test_ddp_and_fsdp2_predict_give_every_prompt_once_in_order_as_one_process_does(runs, tmp_path):
    """`gpt2dist predict` x2 ranks, 3 prompts (uneven), sampled: under DDP each rank generates its share and rank 0
    writes them all back in prompt order; under FSDP2 `generate` needs the root's parameters unsharded,
    and every rank runs every prompt (each forward gathers collectively). One file, as one process writes."""
    import json

    prompts = ["def ", "import os\n", "class "]
    # Sampled, 2 rows per prompt, in batches of 2: each row's draws are its own, whatever rank runs it.
    args = ["--data.predict_prompts", json.dumps(prompts), "--model.max_new_tokens", "8", "--model.do_sample", "true",
            "--model.samples_per_prompt", "2", "--data.predict_batch_size", "2"]
    # One process, from the same weights (the end-of-fit export of the FSDP2 run).
    # No logger: the fixtures' configs pin logs/version_0, which a run writing there would empty.
    hf = ["--model.model_name_or_path", str(runs / "fsdp" / "hf_model"), "--model.from_scratch", "false"]
    cases = {"single": ["--config", str(runs / "single" / "config.yaml"), *hf],
             "fsdp": ["--config", str(runs / "fsdp" / "config.yaml"), "--config", str(REPO / "configs/strategy/fsdp.yaml"),
                      "--ckpt_path", str(runs / "fsdp" / "checkpoints" / "last.ckpt")],
             "ddp": ["--config", str(runs / "fsdp" / "config.yaml"), "--config", str(REPO / "configs/strategy/ddp.yaml"), *hf]}
    done = two_at_a_time(lambda name: run_cli("predict", *cases[name], "--trainer.default_root_dir", str(tmp_path / name),
                                              "--trainer.logger", "false", *args, timeout=300), cases)
    rows = {}
    for name, p in done.items():
        assert p.returncode == 0, (name, p.stderr[-3000:])
        out = tmp_path / name
        assert sorted(f.name for f in out.glob("predictions*")) == ["predictions.jsonl"], name
        rows[name] = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    single = rows["single"]
    assert [(r["index"], r["sample"], r["prompt"]) for r in single] == [(i, j, p) for i, p in enumerate(prompts) for j in (0, 1)]
    assert all(len(r["text"]) > len(r["prompt"]) for r in single)
    assert rows["fsdp"] == single and rows["ddp"] == single


# ----------------------------------------------------------------------------- "GPU-only" strategies on CPU
# Real FSDP1 and DeepSpeed on gloo (tests/cpu_strategies.py swaps only the class of the shipped overlays).
GPU_ONLY = ["fsdp1", "deepspeed_zero1", "deepspeed_zero2", "deepspeed_zero3", "deepspeed_zero3_offload"]


def ds_fit(config: Path, overlay: str, *args: str) -> subprocess.CompletedProcess:
    from cpu_strategies import cpu_overlay

    p = run_cli("fit", "--config", str(config), "--config", str(cpu_overlay(overlay, config.parent)), *args, timeout=300,
                env={"PYTHONPATH": f"{TESTS}{os.pathsep}{REPO}", "DS_ACCELERATOR": "cpu"})
    assert p.returncode == 0, p.stderr[-3000:]
    return p


@pytest.fixture(scope="module")
def ds_runs(tmp_path_factory, corpus_dir, tokenizer_dir, tokenizer):
    """10 steps from the same small pretrained folder: one process, then FSDP1 and each DeepSpeed
    overlay x2 (checkpoints every 5 steps, greedy samples every 5). ZeRO-3 loads the weights into
    partitions."""
    from transformers import GPT2Config, GPT2LMHeadModel

    tmp = tmp_path_factory.mktemp("deepspeed")
    torch.manual_seed(0)
    eos = tokenizer.eos_token_id
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), bos_token_id=eos, eos_token_id=eos, **TINY)).save_pretrained(
        tmp / "pretrained")
    model = {"model_name_or_path": str(tmp / "pretrained"), "from_scratch": False}
    sections = {"samples": {"sample_every_n_steps": 5, "prompts": ["def ", "The"], "max_new_tokens": 8},
                "export": {"sample_prompt": "import ", "sample_tokens": 12}}
    p = fit(write_config(tmp, corpus_dir, tokenizer_dir, "single", 1, model=model, sections=sections))
    (tmp / "single" / "fit.log").write_text(p.stdout + p.stderr)
    for name in GPU_ONLY:
        p = ds_fit(write_config(tmp, corpus_dir, tokenizer_dir, name, 2, model=model, sections=sections), name,
                   "--checkpoint.every_n_train_steps", "5", "--checkpoint.save_top_k", "-1")
        (tmp / name / "fit.log").write_text(p.stdout + p.stderr)
    return tmp


def end_of_fit_sample(log: Path) -> str:
    """The greedy sample HFExport prints after the export (from the gathered model when sharded): the
    fit's last output, so all of the log after its header. Whole, not its first line: a tiny model's
    continuation may start with newlines (then the first line was only the prompt)."""
    return log.read_text().split("sample ('import ', greedy):\n", 1)[1].rstrip("\n")


@pytest.mark.parametrize("name", GPU_ONLY)
def test_gpu_only_strategy_matches_single_process(ds_runs, name):
    """Losses and pre-clipping grad norms (DeepSpeed's own, or over FSDP1's flat shards) equal one
    process's, and the greedy samples (all ranks take part in ZeRO-3's gathers; FSDP1 routes them
    through its wrapper's forward) are the same text."""
    for key in ("train/loss", "train/grad_norm"):
        single, ds = train_losses(ds_runs / "single", key=key), train_losses(ds_runs / name, key=key)
        assert sorted(ds) == sorted(single) == list(range(STEPS)), key
        diff = max(abs(single[s] - ds[s]) / max(1.0, abs(single[s])) for s in single)
        assert diff < 1e-5, (key, diff, single, ds)
    loss = train_losses(ds_runs / "single")
    assert loss[STEPS - 1] < loss[0] - 0.05
    samples = (ds_runs / name / "checkpoints" / "samples.txt").read_text()
    assert samples.count("=== step") == 4  # 2 prompts at steps 5 and 10
    assert samples == (ds_runs / "single" / "checkpoints" / "samples.txt").read_text()
    sample = end_of_fit_sample(ds_runs / name / "fit.log")
    assert sample.startswith("import ") and len(sample) > len("import ")
    assert sample == end_of_fit_sample(ds_runs / "single" / "fit.log")


@pytest.mark.parametrize("name", GPU_ONLY)
def test_gpu_only_strategy_checkpoint_resumes_and_exports(ds_runs, name, tmp_path):
    ck = ds_runs / name / "checkpoints"
    marker = ".metadata" if name == "fsdp1" else "latest"  # a sharded distcp folder / a DeepSpeed folder
    assert (ck / "step0000005.ckpt" / marker).is_file() and not list(ck.glob(".*tmp*"))  # complete, atomic
    ds_fit(ds_runs / name / "config.yaml", name, "--trainer.logger.init_args.version", "1",
           "--ckpt_path", str(ck / "step0000005.ckpt"), "--export.enabled", "false")
    full, resumed = train_losses(ds_runs / name), train_losses(ds_runs / name, version=1)
    assert sorted(resumed) == list(range(5, STEPS))  # steps 6..10
    for s in resumed:
        assert abs(resumed[s] - full[s]) < 1e-6, (s, resumed[s], full[s])

    env = {**os.environ, "PYTHONPATH": str(REPO), "DS_ACCELERATOR": "cpu"}
    for step in (5, 10):
        p = subprocess.run([sys.executable, str(REPO / "tools/export_hf.py"), str(ck / f"step{step:07d}.ckpt"),
                            str(tmp_path / f"hf{step}")], capture_output=True, text=True, timeout=300, env=env)
        assert p.returncode == 0, p.stderr[-2000:]
    trained = _logits(ds_runs / name / "hf_model")  # end of fit: gathered from the live engine
    assert torch.equal(_logits(tmp_path / "hf10"), trained)
    assert (_logits(ds_runs / "single" / "hf_model") - trained).abs().max() < 1e-4
    assert not torch.allclose(_logits(tmp_path / "hf5"), trained)


def ds_eval(sub: str, run: Path, overlay: str | None, devices: int, *args: str) -> subprocess.CompletedProcess:
    """`gpt2dist SUB` of a ds_runs run under `overlay` (None: no strategy overlay) with `devices` processes."""
    from cpu_strategies import cpu_overlay

    strategy = ["--config", str(cpu_overlay(overlay, run))] if overlay else []
    return run_cli(sub, "--config", str(run / "config.yaml"), *strategy, "--trainer.devices", str(devices),
                   "--data.batch_size", str(GLOBAL_BATCH // devices), *args, timeout=300,
                   env={"PYTHONPATH": f"{TESTS}{os.pathsep}{REPO}", "DS_ACCELERATOR": "cpu"})


@pytest.mark.parametrize("sub, name, overlay, devices, version", [
    ("validate", "deepspeed_zero3", "deepspeed_zero3", 2, 20),  # as written
    ("validate", "deepspeed_zero3", "deepspeed_zero3_offload", 1, 21),  # another world size, offloaded
    ("test", "deepspeed_zero3", "deepspeed_zero2", 2, 22),  # another ZeRO stage
    ("validate", "deepspeed_zero2", None, 1, 23),  # one process without DeepSpeed
])
def test_deepspeed_checkpoint_evaluates_the_trained_weights(ds_runs, sub, name, overlay, devices, version):
    """validate/test of a DeepSpeed folder (`last`) gives the val/loss the fit logged at its last step: the
    trained fp32 weights, whatever overlay and number of processes evaluate it. ZeRO-3 inference engines
    have no optimizer, and DeepSpeed's own load failed there ('_restore_from_bit16_weights')."""
    limit = ["--trainer.limit_test_batches", "2"] if sub == "test" else []  # `test` evaluates the validation split
    p = ds_eval(sub, ds_runs / name, overlay, devices, "--ckpt_path", "last", "--trainer.logger.init_args.version", str(version),
                *limit)
    assert p.returncode == 0 and "Traceback" not in p.stderr, p.stderr[-3000:]
    fitted = train_losses(ds_runs / name, key="val/loss")
    assert sorted(fitted) == [STEPS - 1]
    loss = train_losses(ds_runs / name, version=version, key=f"{'val' if sub == 'validate' else 'test'}/loss")
    assert len(loss) == 1 and abs(next(iter(loss.values())) - fitted[STEPS - 1]) < 1e-5, (loss, fitted)
    assert fitted[STEPS - 1] < train_losses(ds_runs / name)[0] - 0.05  # it trained: other weights give another loss


@pytest.mark.parametrize("name", ["deepspeed_zero2", "deepspeed_zero3"])
def test_deepspeed_export_needs_no_temporary_copy(ds_runs, name, tmp_path, monkeypatch):
    """Exporting a ZeRO folder gives the end-of-fit export's weights, bitwise, and writes no temporary
    file: Lightning's converter first saved the whole fp32 model to /tmp (XL: 6.2 GB there)."""
    import tempfile

    from safetensors.torch import load_file

    from gpt2dist.export import export_checkpoint

    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "absent"))  # any temporary file fails: no such folder
    export_checkpoint(ds_runs / name / "checkpoints" / f"step{STEPS:07d}.ckpt", tmp_path / "hf")
    end_of_fit, exported = load_file(ds_runs / name / "hf_model" / "model.safetensors"), load_file(tmp_path / "hf" / "model.safetensors")
    assert end_of_fit.keys() == exported.keys() and all(torch.equal(end_of_fit[k], exported[k]) for k in end_of_fit)
    assert not (tmp_path / "absent").exists()


def test_deepspeed_zero3_predict_gives_what_one_process_gives_from_the_export(ds_runs, tmp_path):
    """`gpt2dist predict --ckpt_path last` under ZeRO-3 x2 (sampled, in batches) generates what one process
    generates from the end-of-fit Hugging Face export of the same run."""
    import json

    prompts = ["def ", "import os\n", "class "]
    # Sampled, 2 rows per prompt, in batches of 2: each row's draws are its own, whatever rank runs it.
    args = ["--data.predict_prompts", json.dumps(prompts), "--model.max_new_tokens", "8", "--model.do_sample", "true",
            "--model.samples_per_prompt", "2", "--data.predict_batch_size", "2"]
    run = ds_runs / "deepspeed_zero3"
    p = ds_eval("predict", run, "deepspeed_zero3", 2, "--ckpt_path", "last", "--trainer.logger.init_args.version", "24", *args)
    assert p.returncode == 0 and "Traceback" not in p.stderr, p.stderr[-3000:]
    zero3 = [json.loads(line) for line in (run / "predictions.jsonl").read_text().splitlines()]
    p = run_cli("predict", "--config", str(ds_runs / "single" / "config.yaml"), "--trainer.default_root_dir", str(tmp_path),
                "--trainer.logger", "false", "--model.model_name_or_path", str(run / "hf_model"), *args, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    single = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert [(r["index"], r["sample"], r["prompt"]) for r in zero3] == [(i, j, p) for i, p in enumerate(prompts) for j in (0, 1)]
    assert zero3 == single
    assert all(len(r["text"]) > len(r["prompt"]) for r in zero3)


def test_deepspeed_folder_under_fsdp2_evaluation_is_one_line(ds_runs):
    """FSDP2 cannot read a DeepSpeed folder: one line before launch naming it, where it evaluates, and the export."""
    ckpt = ds_runs / "deepspeed_zero3" / "checkpoints" / "step0000010.ckpt"
    p = run_cli("validate", "--config", str(ds_runs / "deepspeed_zero3" / "config.yaml"), "--config",
                str(REPO / "configs/strategy/fsdp.yaml"), "--trainer.logger", "false", "--ckpt_path", str(ckpt), timeout=300)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-3000:]
    line = [l for l in p.stderr.splitlines() if l.startswith("gpt2dist: error:")]
    assert len(line) == 1 and str(ckpt) in line[0] and "DeepSpeed checkpoint folder" in line[0], p.stderr[-2000:]
    assert "deepspeed_*" in line[0] and "tools/export_hf.py" in line[0]


@pytest.mark.parametrize("name", ["fsdp", "fsdp1", "deepspeed_zero2", "deepspeed_zero3"])
def test_bf16_mixed_exports_fp32_master_weights(ds_runs, corpus_dir, tokenizer_dir, name, tmp_path):
    """As on a GPU: bf16-mixed. DeepSpeed trains bf16 copies of the weights, FSDP1 computes in bf16;
    both exports (end of fit, and tools/export_hf.py of the checkpoint) must hold the fp32 master
    weights, the same ones. Greedy samples are generated from the bf16 compute weights."""
    model = {"model_name_or_path": str(ds_runs / "pretrained"), "from_scratch": False}
    samples = {"samples": {"sample_every_n_steps": 5, "prompts": ["def ", "The"], "max_new_tokens": 8}}
    config = write_config(ds_runs, corpus_dir, tokenizer_dir, f"{name}_bf16", 2, model=model, sections=samples,
                          precision="bf16-mixed")
    ds_fit(config, name, "--checkpoint.every_n_train_steps", str(STEPS))
    texts = (ds_runs / f"{name}_bf16" / "checkpoints" / "samples.txt").read_text().split("=== step ")[1:]
    assert [t.split(" |")[0] for t in texts] == ["5", "5", "10", "10"]
    for t in texts:  # "5 | prompt 'def '\ndef <continuation>\n\n": the prompt, then new tokens
        prompt = t.split("prompt ", 1)[1].split("\n")[0].strip("'")
        body = t.split("\n", 1)[1].strip("\n")
        assert body.startswith(prompt) and len(body) > len(prompt), t
    losses, fp32 = train_losses(ds_runs / f"{name}_bf16"), train_losses(ds_runs / "single")
    assert sorted(losses) == sorted(fp32) and max(abs(losses[s] - fp32[s]) for s in fp32) < 2e-2  # bf16 rounding
    p = subprocess.run([sys.executable, str(REPO / "tools/export_hf.py"), str(ds_runs / f"{name}_bf16/checkpoints/step{STEPS:07d}.ckpt"),
                        str(tmp_path / "hf")], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": str(REPO), "DS_ACCELERATOR": "cpu"})
    assert p.returncode == 0, p.stderr[-2000:]
    from safetensors.torch import load_file

    end_of_fit, exported = load_file(ds_runs / f"{name}_bf16" / "hf_model" / "model.safetensors"), load_file(tmp_path / "hf" / "model.safetensors")
    assert end_of_fit.keys() == exported.keys() and all(torch.equal(end_of_fit[k], exported[k]) for k in end_of_fit)
    assert {v.dtype for v in exported.values()} == {torch.float32}
    # Not bf16 copies cast up: after 10 AdamW steps almost no fp32 master weight is a bf16 number.
    off_grid = sum((v != v.bfloat16().float()).sum().item() for v in exported.values())
    assert off_grid > 0.9 * sum(v.numel() for v in exported.values())


@pytest.mark.parametrize("devices", [1, 2])
def test_fsdp1_accumulates_bf16_mixed_gradients(ds_runs, corpus_dir, tokenizer_dir, devices):
    """Every preset accumulates under bf16-mixed. Lightning ran FSDP1 under no_sync between micro-batches:
    on one process (FSDP1's NO_SHARD) the second micro-batch died assigning the tied head's bf16 gradient to
    its fp32 weight, and on two each rank kept the whole gradient in bf16. 2 micro-batches x 4 / devices
    sequences: the losses of the single process's 4-sequence steps, within bf16 rounding."""
    model = {"model_name_or_path": str(ds_runs / "pretrained"), "from_scratch": False}
    name = f"fsdp1_accumulate_{devices}"
    config = write_config(ds_runs, corpus_dir, tokenizer_dir, name, devices, model=model, precision="bf16-mixed",
                          accumulate_grad_batches=2)
    ds_fit(config, "fsdp1", "--data.batch_size", str(GLOBAL_BATCH // (2 * devices)))
    losses, fp32 = train_losses(ds_runs / name), train_losses(ds_runs / "single")
    assert sorted(losses) == sorted(fp32) and max(abs(losses[s] - fp32[s]) for s in fp32) < 2e-2, (losses, fp32)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("overlay", ["ddp", "fsdp"])
def test_two_node_emulation(overlay, tmp_path, corpus_dir, tokenizer_dir):
    config = write_config(tmp_path, corpus_dir, tokenizer_dir, overlay, 1, num_nodes=2, max_steps=3, val_check_interval=3)
    port = str(_free_port())
    procs = []
    for node in (0, 1):
        env = {**os.environ, "PYTHONPATH": str(REPO), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port,
               "NODE_RANK": str(node), "WANDB_MODE": "offline"}
        procs.append(subprocess.Popen([sys.executable, "-m", "gpt2dist", "fit", "--config", str(config), "--config",
                                       str(REPO / f"configs/strategy/{overlay}.yaml")], cwd=REPO, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=300)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [0, 0], f"rcs {[p.returncode for p in procs]}\n" + outs[0][-2000:] + outs[1][-2000:]
    assert "Starting with 2 processes" in outs[0]  # one world of 2 ranks across the two "nodes"
    losses = train_losses(tmp_path / overlay)
    assert sorted(losses) == [0, 1, 2]
    assert (tmp_path / overlay / "hf_model" / "model.safetensors").exists()


def test_gpu_check_script_refuses_bad_arguments_before_any_row(tmp_path):
    """An unknown overlay started a fit that failed, and an odd --steps gave a false export FAIL (no
    checkpoint at the last step), each after the other rows had spent device time."""
    for args, says in ((["--rows", "ddp,fsdp2"], "row 'fsdp2': no configs/strategy/fsdp2.yaml"),
                       (["--steps", "5"], "--steps 5: give an even number >= 2")):
        p = subprocess.run([sys.executable, str(REPO / "tools/gpu_check_strategies.py"), "--cpu-smoke", *args],
                           capture_output=True, text=True, timeout=120, env={**os.environ, "OUT": str(tmp_path / "o")})
        assert p.returncode != 0 and says in p.stderr and "Traceback" not in p.stderr, p.stderr[-2000:]
        assert not list(tmp_path.glob("o/*"))


def test_gpu_check_script_cpu_smoke(tmp_path):
    # $OUT does not exist yet: the script makes it (it wrote its result files into a missing folder at the end)
    out = tmp_path / "out"
    p = subprocess.run(["bash", str(REPO / "tools/gpu_check_strategies.sh"), "--cpu-smoke"], capture_output=True, text=True,
                       timeout=600, env={**os.environ, "OUT": str(out)})
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-2000:]
    assert (out / "strategies_logs.txt").read_text().count("===== ") == 4  # the 3 rows + fsdp's resume
    tables = [[[c.strip() for c in line.split("|")[1:-1]] for line in block.splitlines() if line.startswith("| ")
               and "---" not in line] for block in p.stdout.split("\n\n")]
    measured, logged = [t for t in tables if t]
    assert [r[0] for r in measured[1:]] == [r[0] for r in logged[1:]] == ["ddp", "fsdp", "fsdp+compile"]
    for r in measured[1:]:
        assert r[1] == "ok" and float(r[2]) > 0 and float(r[3].replace(",", "")) > 0
        assert r[6].startswith("'def "), r  # the last step's greedy sample (6 steps in: mostly EOS, skipped)
    # The +compile row ran the compiled blocks (its log) and ended on the eager row's loss (fp32; the table
    # rounds to 4 decimals, so equal values may print 1e-4 apart).
    assert abs(float(measured[2][2]) - float(measured[3][2])) <= 1.01e-4, measured
    assert re.search(r"^fsdp\+compile: ok in \d+s, blocks compiled$", p.stdout, re.M), p.stdout
    assert re.search(r"^fsdp: ok in \d+s$", p.stdout, re.M), p.stdout
    # TrainMonitor's own numbers: tokens/s and grad norm; no MFU and no GPU memory on a CPU.
    assert logged[0][1:] == ["throughput/tokens_per_sec", "throughput/mfu", "memory/peak_allocated_gib",
                             "memory/peak_reserved_gib", "train/grad_norm"]
    for r in logged[1:]:
        assert float(r[1].replace(",", "")) > 0 and r[2] == r[3] == r[4] == "-" and float(r[5]) > 0
    assert "fsdp: resume from step 3: steps [4, 5]" in p.stdout and p.stdout.count("PASS") == 2


def _fp32_reduce_worker(rank, world, init_file, out_q):
    import gc

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from gpt2dist.strategies import fp32_allreduce_hook

    # In a function, so DDP's Reducer dies when it returns, while the process group lives on. Kept alive
    # past destroy_process_group, it was the group's last owner: ~ProcessGroupGloo then joined gloo's
    # worker thread at exit with the GIL held, while that thread waited for the GIL to free the barrier's
    # work (a rank hung for good, seen once; py-spy showed both threads).
    def reduced_grad(hook, row: torch.Tensor) -> torch.Tensor:
        layer = torch.nn.Linear(4096, 1, bias=False).to(torch.bfloat16)
        ddp = DistributedDataParallel(layer)
        if hook is not None:
            ddp.register_comm_hook(None, hook)
        # Through DDP's forward: d(w . g_rank)/dw = g_rank, each rank contributes its own bf16 row.
        ddp(row.unsqueeze(0)).sum().backward()
        return layer.weight.grad.detach().clone().view(-1)

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        grads = torch.randn(world, 4096, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
        results = [reduced_grad(hook, grads[rank]) for hook in (None, fp32_allreduce_hook)]
        gc.collect()  # and any DDP object a reference cycle kept
        exact = grads.float().mean(0).to(torch.bfloat16)
        out_q.put((rank, *(t.float().tolist() for t in (results[0], results[1], exact))))  # plain lists: no shared memory
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_fp32_allreduce_hook_takes_the_bf16_gradient_mean_in_fp32(tmp_path):
    """4 ranks (gloo), bf16 gradients: with the hook every rank gets the fp32 mean rounded once to
    bf16, exactly; DDP's own bf16 all-reduce rounds every partial sum and misses it on some elements."""
    from conftest import spawn_ranks

    for rank, default, hooked, exact in spawn_ranks(_fp32_reduce_worker, 4, str(tmp_path / "init")):
        assert hooked == exact, rank  # bf16 values, compared exactly
        assert sum(a != b for a, b in zip(default, exact)) > 0  # the problem the hook solves


def test_zero3_pretrained_weights_that_do_not_fit_are_one_line_and_extra_layers_are_dropped(tmp_path):
    """Under ZeRO-3 the weights load by hand (strategies.build_zero3_model): a folder without weights and a
    config they do not fit were tracebacks (the second raised on rank 0 inside the gather, with the other
    ranks waiting in it); fewer layers than the weights hold loads, as from_pretrained does under DDP."""
    import shutil
    from types import SimpleNamespace

    from transformers import GPT2Config, GPT2LMHeadModel

    from gpt2dist.errors import ConfigError
    from gpt2dist.strategies import build_zero3_model

    config = GPT2Config(vocab_size=128, bos_token_id=0, eos_token_id=0, **TINY)
    torch.manual_seed(0)
    GPT2LMHeadModel(config).save_pretrained(tmp_path / "full")
    (tmp_path / "no_weights").mkdir()
    shutil.copy(tmp_path / "full" / "config.json", tmp_path / "no_weights")

    def build(folder, **overrides):
        hparams = SimpleNamespace(from_scratch=False, model_name_or_path=str(tmp_path / folder))
        return build_zero3_model(GPT2Config(**{**config.to_dict(), **overrides}), hparams)

    with pytest.raises(ConfigError, match=r"^cannot load pretrained weights from model.model_name_or_path='.*no_weights' "
                                          r"under ZeRO-3 \(FileNotFoundError: no \*.safetensors.*model.from_scratch=true$"):
        build("no_weights")
    with pytest.raises(ConfigError, match=r"^pretrained weights from .*'.*full' do not fit the model config \(missing "
                                          r"\[\], shapes \['transformer.wte.weight \(128, 64\) != \(128, 96\)'"):
        build("full", n_embd=96)
    with pytest.warns(UserWarning, match="12 tensors the model config has no place for are not used"):
        one_layer = build("full", n_layer=1)
    full = GPT2LMHeadModel.from_pretrained(tmp_path / "full")
    for name, p in one_layer.state_dict().items():
        torch.testing.assert_close(p, full.state_dict()[name], rtol=0, atol=0, msg=name)


def test_fsdp2_cpu_offload_keeps_the_modules_device_the_accelerators():
    """cpu_offload leaves the parameter shards on the CPU (only buffers move), and skipped the .to() that records
    the LightningModule's device: pl_module.device read cpu on a GPU run (validation sums made on the CPU, CPU
    tensors to NCCL). `meta` stands in for cuda:0 here."""
    import lightning.pytorch as pl

    from gpt2dist.strategies import FSDP2Strategy

    class Tiny(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(2, 2)
            self.register_buffer("scale", torch.ones(2))

    strategy = FSDP2Strategy(cpu_offload=True)
    strategy.parallel_devices, strategy._local_rank = [torch.device("meta")], 0
    module = Tiny()
    strategy.model = strategy._lightning_module = module
    strategy.model_to_device()
    assert module.device == torch.device("meta") and module.scale.device == torch.device("meta")
    assert module.layer.weight.device == torch.device("cpu")  # the offloaded parameters stay where FSDP2 put them
