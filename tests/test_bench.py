"""tools/bench.py on CPU with a micro model: rows, ratio, JSON (speed itself is never asserted)."""

from __future__ import annotations

import json
import math
import os
import re
import statistics
import subprocess
import sys
import warnings

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / "tools"))
import bench  # noqa: E402

MICRO = ["--cpu", "--config", str(REPO / "configs/perf/tiny-cpu.yaml"),
         "-o", "model.config_overrides={n_layer: 1, n_embd: 32, n_head: 2, n_positions: 32, vocab_size: 200}",
         "-o", "data.block_size=32", "-o", "data.batch_size=2", "--steps", "2", "--warmup", "1"]


@pytest.mark.parametrize("baseline", ["torch", "hf-trainer"])
def test_bench_rows_and_json(tmp_path, capsys, baseline):
    if baseline == "hf-trainer":
        pytest.importorskip("accelerate")
    extra = ["--callbacks"] if baseline == "torch" else []  # + the row with gpt2dist fit's per-step callbacks
    res = bench.main([*MICRO, "--baseline", baseline, *extra, "--out", str(tmp_path / "b.json")])
    out = capsys.readouterr().out
    assert "| gpt2dist |" in out and f"| {baseline} |" in out
    saved = json.loads((tmp_path / "b.json").read_text())
    runs = ["gpt2dist", *(["gpt2dist + fit callbacks"] if extra else []), baseline]
    assert saved["attention"] == "attention: flash"  # the kernel SDPA picks, named in the header too
    assert saved["tokens_per_step"] == 64 and [r["run"] for r in saved["rows"]] == runs
    for r in res["rows"]:
        assert "error" not in r, r
        assert len(r["step_times_s"]) == 3 and r["steps_timed"] == 2  # 1 warmup + 2 timed steps ran
        assert r["tokens_per_s"] == pytest.approx(64 / r["median_step_s"]) and r["mfu"] is None  # no CPU peak
    ours, base = res["rows"][0], res["rows"][-1]
    assert ours["ratio"] == 1.0 and base["ratio"] == pytest.approx(ours["tokens_per_s"] / base["tokens_per_s"])
    if extra:
        assert "fit callbacks (TrainMonitor, NaN guard):" in out


def test_bench_bad_override_exits_with_message():
    with pytest.raises(SystemExit, match="must be key.path=value"):
        bench.main([*MICRO, "-o", "model.compile"])
    with pytest.raises(SystemExit, match="--profile-top 0 must be >= 1"):
        bench.main([*MICRO, "--profile", "2", "--profile-top", "0"])


def test_sdpa_backend_is_named_and_forced_process_wide():
    from types import SimpleNamespace

    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    gpt2 = SimpleNamespace(n_embd=64, n_head=4)
    cpu = torch.device("cpu")
    assert bench.use_sdpa_backend("auto", gpt2, 32, cpu, torch.float32) == "attention: flash"  # CPU's own kernel
    everything = [SDPBackend.MATH, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]
    with sdpa_kernel(everything):  # its exit restores the flags the forced choices leave set
        assert bench.use_sdpa_backend("math", gpt2, 32, cpu, torch.float32) == "attention: math (--sdpa math)"
        assert torch.backends.cuda.math_sdp_enabled() and not torch.backends.cuda.flash_sdp_enabled()
        assert not torch.backends.cuda.mem_efficient_sdp_enabled() and not torch.backends.cuda.cudnn_sdp_enabled()
        q = torch.randn(1, 4, 8, 16)
        assert torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True).isfinite().all()
        # cuDNN attention is CUDA's: on CPU nothing is left, said in the header (the rows then fail)
        assert bench.use_sdpa_backend("cudnn", gpt2, 32, cpu, torch.float32) == "attention: none viable (--sdpa cudnn)"
    assert torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.math_sdp_enabled()


def test_profile_steps_come_after_the_timed_ones_and_are_split_by_kind(capsys):
    # Every op listed: on a busy 2-core CI machine fused AdamW once fell out of the default top 12.
    res = bench.main([*MICRO, "--baseline", "none", "--profile", "2", "--profile-top", "1000"])
    row = res["rows"][0]
    assert "error" not in row and row["steps_timed"] == 2 and len(row["step_times_s"]) == 3  # profiled steps: untimed
    prof = res["profile"]
    assert prof["steps"] == 2 and prof["clock"] == "CPU ops (self time)"
    assert sum(prof["kinds"].values()) == pytest.approx(prof["total_ms_per_step"])
    # The ops' self times fit in a step (their share of the timed median; profiled steps run slower)
    assert prof["median_step_ms"] == pytest.approx(1e3 * statistics.median(row["step_times_s"][1:]))
    assert prof["kinds"]["matmul"] > 0 and prof["kinds"]["optimizer"] > 0  # aten::mm/addmm, fused AdamW
    top = {t["name"]: t for t in prof["top"]}
    assert top["aten::_fused_adamw_"]["calls_per_step"] == 2  # one call per parameter group, every step
    out = capsys.readouterr().out
    assert "| kind | ms/step | share |" in out and "| matmul |" in out and "median timed step" in out


def test_gpu_profile_leaves_out_user_annotations():
    """On the H200, `Optimizer.step#AdamW.step` (a range on the GPU timeline, spanning the optimizer's
    kernels) was summed as a kernel: 371 ms of kernels in a 191 ms step, half of it "optimizer"."""
    from types import SimpleNamespace as E

    import torch
    from torch.autograd import DeviceType

    events = [E(key="Optimizer.step#AdamW.step", count=2, self_device_time_total=380e3, device_type=DeviceType.CUDA,
                is_user_annotation=True),
              E(key="void at::native::multi_tensor_apply_kernel<FusedAdamMathFunctor>", count=92,
                self_device_time_total=12e3, device_type=DeviceType.CUDA, is_user_annotation=False),
              E(key="nvjet_sm90_tst_320x128_64x3_1x2_h_bz_coopB_TNT", count=288, self_device_time_total=62e3,
                device_type=DeviceType.CUDA, is_user_annotation=False),
              E(key="aten::mm", count=288, self_device_time_total=0.0, device_type=DeviceType.CPU,
                is_user_annotation=False)]
    out = bench.kernel_table(E(key_averages=lambda: events), torch.device("cuda"), steps=2, step_ms=40.0)
    assert out["total_ms_per_step"] == pytest.approx(37.0)  # (12 + 62) ms over 2 steps
    assert out["kinds"] == pytest.approx({"matmul": 31.0, "optimizer": 6.0})
    assert "37.0 ms/step in all, 92% of the 40.0 ms median timed step" in out["text"]


def test_kernels_are_sorted_into_kinds():
    import re

    def kind(name):
        return next((k for k, pat in bench.KERNEL_KINDS if re.search(pat, name, re.I)), "other")

    assert kind("cudnn_generated_fort_native_sdpa_sm90_knob_7_64x128x128_4x1x1_kernel0_0") == "attention"
    assert kind("void pytorch_flash::flash_bwd_dq_dk_dv_loop_seqk_parallel_kernel<...>") == "attention"
    assert kind("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64") == "matmul"
    assert kind("nvjet_tst_192x192_64x3_2x1_v_bz_coopA_NNT") == "matmul"
    assert kind("triton_per_fused_native_layer_norm_0") == "fused elementwise (Inductor)"
    assert kind("## Call CompiledFxGraph f6tmtf72jircdiralkvfthn4z2nxwgyj3j6iyfldgf4kwehe4yoz ##") == "fused elementwise (Inductor)"
    assert kind("void at::native::multi_tensor_apply_kernel<FusedAdamMathFunctor>") == "optimizer"
    assert kind("Memcpy HtoD (Pageable -> Device)") == "copy / cast"


def test_gpu_check_perf_script_cpu_smoke(tmp_path):
    """The issue's GPU check, as a GPU session runs it (default rows), on a tiny model on CPU: every
    row ends with a table, the baselines run, and the planner reads the JSON back."""
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable}
    p = subprocess.run(["bash", str(REPO / "tools/gpu_check_perf.sh"), "--cpu-smoke"], capture_output=True, text=True,
                       timeout=900, env=env, cwd=REPO)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-2000:]
    summary = (tmp_path / "summary.md").read_text()
    sections = {b.split("\n", 1)[0]: b for b in summary.split("\n### ")[1:]}
    assert list(sections) == ["large", "small", "large-bf16true", "small-data",
                              "memory planner vs measured (tools/plan.py --validate)"]
    runs = {name: [line.split("|")[1].strip() for line in body.splitlines() if line.startswith("| gpt2dist")
                   or line.startswith("| hf-trainer")] for name, body in sections.items()}
    assert runs["large"] == ["gpt2dist", "hf-trainer"] and runs["large-bf16true"] == ["gpt2dist"]
    assert runs["small"] == ["gpt2dist", "gpt2dist + fit callbacks", "hf-trainer"]
    assert runs["small-data"] == ["gpt2dist", "gpt2dist (real data)"]
    assert summary.count("speed-up over transformers.Trainer") == 2 and "no result" not in summary
    for name in ("large", "small", "large-bf16true", "small-data"):
        rows = json.loads((tmp_path / f"{name}.json").read_text())["rows"]
        assert all("error" not in r and r["tokens_per_s"] > 0 for r in rows), name
    assert "| gpt2 | 8 x 128 | bf16-true | True | False |" in sections["memory planner vs measured (tools/plan.py --validate)"]


def test_gpu_check_perf_script_reads_its_knobs_as_meant(tmp_path):
    """DEADLINE=560s failed the script's integer test and the call ran with no deadline (now refused before
    anything runs); DATA=yes turned a default row off (yes/true/on are 1, no/false/off 0); a value that is not
    ours (an HPC site's DATA=/scratch/...) leaves the row at its default, and says so."""
    script = REPO / "tools/gpu_check_perf.sh"
    p = subprocess.run(["bash", str(script), "--cpu-smoke"], capture_output=True, text=True, timeout=60,
                       env={**os.environ, "OUT": str(tmp_path / "out"), "DEADLINE": "560s"})
    assert p.returncode == 2 and p.stderr.strip() == "gpu_check_perf: DEADLINE=560s must be whole seconds (e.g. 540)"
    assert not (tmp_path / "out").exists()
    # The knob block as the script runs it (from START= to the loop's end), then the values it leaves.
    block = re.search(r"^START=.*?^done$", script.read_text(), re.M | re.S).group(0)
    env = {**os.environ, "DATA": "yes", "BF16TRUE": "off", "B32": "1", "EXTRA": "/scratch/me"}
    p = subprocess.run(["bash", "-c", block + '\necho "$DATA $BF16TRUE $B32 ${EXTRA-unset}"'], capture_output=True,
                       text=True, timeout=60, env=env)
    assert p.stdout.strip() == "1 0 1 unset" and "EXTRA=/scratch/me is not 0 or 1: ignored" in p.stderr, p.stderr


def test_gpu_check_perf_script_fails_when_a_row_fails(tmp_path):
    """Its exit status was tee's (0) even when every row timed out: a device run read it as a success."""
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable, "T_LARGE": "1", "T_SMALL": "1",
           "BF16TRUE": "0", "DATA": "0"}
    p = subprocess.run(["bash", str(REPO / "tools/gpu_check_perf.sh"), "--cpu-smoke"], capture_output=True, text=True,
                       timeout=300, env=env, cwd=REPO)
    assert p.returncode == 1, p.stdout[-3000:] + p.stderr[-2000:]
    assert "row large: exit 124 (timed out)" in p.stdout and "FAILED rows: large small" in (tmp_path / "summary.md").read_text()


def test_bench_exits_1_when_a_row_fails(tmp_path):
    """bench.py caught a row's error (e.g. a CUDA OOM), printed it in the table and exited 0, so
    gpu_check_perf.sh, which reads the exit status, passed a row that had no number."""
    stub = tmp_path / "stub" / "accelerate"
    stub.mkdir(parents=True)
    (stub / "__init__.py").write_text("raise ImportError('accelerate stubbed out by the test')\n")
    env = {**os.environ, "PYTHONPATH": f"{stub.parent}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    p = subprocess.run([sys.executable, str(REPO / "tools/bench.py"), *MICRO, "--baseline", "hf-trainer",
                        "--out", str(tmp_path / "b.json")], capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode == 1, p.stdout[-2000:] + p.stderr[-2000:]
    # transformers' GPT-2 imports accelerate too once it finds it, so both rows fail here
    assert "bench: failed rows: gpt2dist, hf-trainer" in p.stderr and "| hf-trainer | failed: " in p.stdout
    rows = json.loads((tmp_path / "b.json").read_text())["rows"]
    assert rows[0]["error"] == "ImportError: accelerate stubbed out by the test"
    assert rows[1]["error"].startswith("RuntimeError: hf-trainer baseline needs `accelerate`")


def test_hf_trainer_baseline_checkpoints_activations_and_fuses_adamw_as_ours_does(monkeypatch):
    """A fair baseline: with model.activation_checkpointing on, transformers.Trainer recomputes its blocks
    too, set through the current TrainingArguments name (no deprecation warning, so nothing breaks in v6);
    and its AdamW is fused, as ours is on CPU."""
    pytest.importorskip("accelerate")
    from transformers import GPT2LMHeadModel, Trainer

    fused = []
    original_create = Trainer.create_optimizer
    monkeypatch.setattr(Trainer, "create_optimizer",
                        lambda self, *a, **k: (opt := original_create(self, *a, **k), fused.append(opt.defaults.get("fused")))[0])

    # Which row turned checkpointing on: the gpt2dist row runs first, then run_hf_trainer.
    row, enabled = ["gpt2dist"], []
    original_enable, original_hf = GPT2LMHeadModel.gradient_checkpointing_enable, bench.run_hf_trainer
    monkeypatch.setattr(GPT2LMHeadModel, "gradient_checkpointing_enable",
                        lambda self, *a, **k: (enabled.append(row[0]), original_enable(self, *a, **k))[1])
    monkeypatch.setattr(bench, "run_hf_trainer", lambda *a: (row.__setitem__(0, "hf-trainer"), original_hf(*a))[1])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = bench.main([*MICRO, "-o", "model.activation_checkpointing=true", "--baseline", "hf-trainer"])
    assert [r["run"] for r in res["rows"]] == ["gpt2dist", "hf-trainer"] and not any("error" in r for r in res["rows"])
    assert set(enabled) == {"gpt2dist", "hf-trainer"}, enabled  # each row checkpoints its own model
    assert not [w for w in caught if "checkpointing` is deprecated" in str(w.message)]
    assert fused == [True], fused  # the baseline's one optimizer: fused AdamW, like configure_optimizers() on CPU


@pytest.mark.parametrize("precision,baseline", [("bf16-mixed", "hf-trainer"), ("bf16", "hf-trainer"), ("16", "torch")])
def test_every_row_runs_in_the_precision_lightning_runs(monkeypatch, precision, baseline):
    """The baselines read trainer.precision themselves: hf-trainer ran fp32 on CPU against our bf16 AMP and
    ignored the aliases (bf16, 16); the torch loop ran alias 16 in fp32, where Lightning (fp16 AMP is CUDA's)
    runs bf16-mixed on CPU. Every row's matmuls (GPT-2's Conv1D) now come out in one dtype."""
    if baseline == "hf-trainer":
        pytest.importorskip("accelerate")
    import torch
    from transformers.pytorch_utils import Conv1D

    row, seen = ["gpt2dist"], {}
    original = Conv1D.forward

    def forward(self, x):
        out = original(self, x)
        seen.setdefault(row[0], set()).add(out.dtype)
        return out

    monkeypatch.setattr(Conv1D, "forward", forward)
    for name in ("run_torch", "run_hf_trainer"):  # the gpt2dist row runs first, then the baseline
        monkeypatch.setattr(bench, name, lambda *a, f=getattr(bench, name): (row.__setitem__(0, baseline), f(*a))[1])
    res = bench.main([*MICRO, "-o", f"trainer.precision={precision}", "--baseline", baseline])
    assert [r["run"] for r in res["rows"]] == ["gpt2dist", baseline] and not any("error" in r for r in res["rows"])
    assert seen == {"gpt2dist": {torch.bfloat16}, baseline: {torch.bfloat16}}, seen
    assert res["precision"] == "bf16-mixed"  # Lightning's name for it, in the header and the JSON


def test_the_trainer_baselines_libraries_are_loaded_before_the_first_row():
    """On CPU the memory column is process RSS: transformers.Trainer and accelerate, first imported inside the
    Trainer row, put ~86 MiB into its peak alone (the tiny table read the Trainer as 18% larger, where from its
    own start it used less). A fresh interpreter: what is loaded when the gpt2dist row starts."""
    script = f"""
import sys
sys.path.insert(0, {str(REPO / 'tools')!r})
import bench
seen = []
def ours(*a, **k):
    seen.append(sorted(m for m in ("transformers.trainer", "accelerate") if m in sys.modules))
    raise RuntimeError("stop here")
bench.run_ours = ours
bench.run_hf_trainer = ours
bench.main({[*MICRO, "--baseline", "hf-trainer"]!r})
print("SEEN", seen[0])
"""
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=REPO,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert "SEEN ['accelerate', 'transformers.trainer']" in p.stdout, (p.stdout[-2000:], p.stderr[-2000:])


def test_ratio_is_against_a_row_of_ours_never_a_baseline(monkeypatch, capsys):
    """A failed gpt2dist row made the first good row the reference: the baseline got ratio 1.000."""
    original = bench.run_ours

    def run_ours(cfg, args, device, real, callbacks=False):
        if not callbacks:
            raise RuntimeError("the gpt2dist row broke")
        return original(cfg, args, device, real, callbacks)

    monkeypatch.setattr(bench, "run_ours", run_ours)
    res = bench.main([*MICRO, "--baseline", "torch"])
    ours, base = res["rows"]
    assert ours["error"] == "RuntimeError: the gpt2dist row broke" and math.isnan(base["ratio"])
    assert [line for line in capsys.readouterr().out.splitlines() if line.startswith("| torch |")][0].endswith("| - |")
    # Another row of ours stands in for it.
    res = bench.main([*MICRO, "--baseline", "torch", "--callbacks"])
    _, callbacks, base = res["rows"]
    assert callbacks["run"] == "gpt2dist + fit callbacks" and callbacks["ratio"] == 1.0
    assert base["ratio"] == pytest.approx(callbacks["tokens_per_s"] / base["tokens_per_s"])


@pytest.mark.parametrize("override,message", [
    ("trainer.precison=bf16-mixed", "-o 'trainer.precison=bf16-mixed': trainer has no 'precison'; "
                                    "did you mean trainer.precision?"),  # was silently ignored
    ("data.batch_sise=4", "data has no 'batch_sise'; did you mean data.batch_size?"),
    ("model.no_such_knob=1", "model has no 'no_such_knob' (see gpt2dist.model.GPT2Module)"),
    ("model.lr=[1", "-o 'model.lr=[1': the value is not valid YAML"),  # was a yaml traceback
    ("model.dropout.p=1", "-o 'model.dropout.p=1': model.dropout is 0.0, not a section"),  # was an AttributeError
    # A misspelt section, or none: the row ran with the config's value, saying nothing.
    ("date.batch_size=2", "-o 'date.batch_size=2': 'date' is not a section; did you mean data?"),
    ("compile=false", "-o 'compile=false': 'compile' is not a section; sections: trainer, model, data, seed_everything"),
    ("model=3", "-o 'model=3': give a key of the model section, e.g. -o model."),
    ("model.config_overrides.n_head=3", "n_embd=32 is not divisible by n_head=3"),  # was a traceback
    ("data.batch_size=abc", "data.batch_size='abc' must be a whole number >= 1"),  # a ValueError traceback
    ("data.block_size=null", "data.block_size=None must be a whole number >= 1"),  # a TypeError traceback
    ("data.batch_size=0", "data.batch_size=0 must be a whole number >= 1"),  # every row failed, after running
])
def test_bench_refuses_unknown_or_malformed_overrides(override, message):
    with pytest.raises(SystemExit) as e:
        bench.main([*MICRO, "-o", override])
    assert e.value.code.startswith("bench: error: ") and message in e.value.code and "\n" not in e.value.code


def test_overrides_reach_nested_and_init_args_configs(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model:\n  class_path: gpt2dist.model.GPT2Module\n  init_args: {lr: 0.1, config_overrides: null}\n")
    c = bench.load_config([str(cfg)], ["model.lr=0.5", "model.config_overrides.n_layer=1", "trainer.precision=bf16"])
    assert c["model"] == {"lr": 0.5, "config_overrides": {"n_layer": 1}} and c["trainer"] == {"precision": "bf16"}


@pytest.mark.parametrize("value, shown", [("-5", "-5.0"), ("0", "0.0"), ("nan", "nan")])
def test_bench_refuses_a_peak_it_cannot_divide_by(value, shown):
    # -5 printed an MFU of -0.5% (exit 0); 0 fell back to the table lookup, silently
    with pytest.raises(SystemExit, match=rf"^bench: error: --peak-tflops {shown} must be a positive number"):
        bench.main([*MICRO, "--peak-tflops", value])


@pytest.mark.parametrize("flag,value,least", [("--steps", 0, 1), ("--repeats", 0, 1), ("--warmup", -1, 0)])
def test_bench_refuses_counts_it_cannot_run(flag, value, least):
    # --steps 0 ran every row and failed them all; --repeats 0 was an IndexError
    with pytest.raises(SystemExit, match=f"^bench: error: {flag} {value} must be >= {least}$"):
        bench.main([*MICRO, flag, str(value)])


@pytest.mark.parametrize("flag,value,least", [("--repeats", "0", 1), ("--block-size", "0", 2), ("--num-proc", "0", 1),
                                             ("--mb", "-5", 1)])
def test_bench_data_refuses_counts_it_cannot_run(flag, value, least):
    p = subprocess.run([sys.executable, str(REPO / "tools/bench_data.py"), flag, value], capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 1 and p.stderr.strip() == f"bench_data: error: {flag} {value} must be >= {least}", p.stderr


def test_bench_read_reads_every_document_each_way(tmp_path):
    """tools/bench_read.py: every way reads the file's every document (the tool checks the count), one row each."""
    out = tmp_path / "read.json"
    p = subprocess.run([sys.executable, str(REPO / "tools/bench_read.py"), "--mb", "0.5", "--formats", "jsonl,parquet",
                        "--ways", "gpt2dist,whole", "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr
    rows = json.loads(out.read_text())
    assert [(r["format"], r["way"]) for r in rows] == [("jsonl", "gpt2dist"), ("jsonl", "whole"),
                                                       ("parquet", "gpt2dist"), ("parquet", "whole")]
    assert all(r["docs"] == rows[0]["docs"] > 200 and r["peak"] >= r["start"] > 0 for r in rows), rows
    table = [line.split() for line in p.stdout.splitlines() if line.startswith(("jsonl", "parquet"))]
    assert [(t[0], t[1], t[-1]) for t in table if t[1] == "gpt2dist"] == [("jsonl", "gpt2dist", "1.00"),
                                                                        ("parquet", "gpt2dist", "1.00")]
    bad = subprocess.run([sys.executable, str(REPO / "tools/bench_read.py"), "--ways", "gpt2dist,pandas"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and bad.stderr.strip() == \
        "bench_read: error: --ways 'pandas' is not one of gpt2dist,whole,datasets", bad.stderr


def test_bench_read_reports_a_killed_child_and_leaves_no_temp_folder(tmp_path):
    """A child the OOM killer ends writes no stderr: its row says how it ended (the tool died of an
    IndexError, every measured row lost). No child leaves its datasets cache behind (3.4 GB had piled
    up in /tmp here). An --out that cannot be written is refused before the corpus is made."""
    kill = tmp_path / "kill"
    kill.mkdir()
    (kill / "sitecustomize.py").write_text(
        "import os, signal, sys\nif '--child' in sys.argv and 'whole' in sys.argv:\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n")
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = dict(os.environ, PYTHONPATH=str(kill), TMPDIR=str(tmp))
    out = tmp_path / "read.json"
    p = subprocess.run([sys.executable, str(REPO / "tools/bench_read.py"), "--mb", "0.2", "--formats", "jsonl",
                        "--ways", "gpt2dist,whole,datasets", "--out", str(out)], capture_output=True, text=True,
                       timeout=600, env=env)
    assert p.returncode == 0, p.stderr
    rows = json.loads(out.read_text())
    assert rows[1] == {"format": "jsonl", "way": "whole", "error": "killed by signal 9"}, rows
    assert rows[0]["docs"] == rows[2]["docs"] > 50 and "jsonl    whole     failed: killed by signal 9" in p.stdout
    assert [p.name for p in tmp.iterdir() if p.name.startswith("bench-read")] == []  # torch's own caches may stay

    (tmp_path / "a-file").write_text("")
    for bad, why in ((tmp_path, "is a folder; give a file path"), (tmp_path / "a-file" / "r.json", "is a file, not a folder")):
        p = subprocess.run([sys.executable, str(REPO / "tools/bench_read.py"), "--out", str(bad)], capture_output=True,
                           text=True, timeout=120, env=env)
        assert p.returncode == 1 and p.stderr.strip().startswith(f"bench_read: error: --out {bad}") and why in p.stderr
        assert "Traceback" not in p.stderr and p.stdout == "", p.stderr


def test_bench_and_bench_data_refuse_an_unwritable_out_before_running(tmp_path):
    (tmp_path / "a-file").write_text("")
    bad = tmp_path / "a-file" / "b.json"
    with pytest.raises(SystemExit, match=r"^bench: error: --out .*a-file/b.json: .*a-file is a file, not a folder"):
        bench.main([*MICRO, "--out", str(bad)])
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "tokenizer.json").write_text("")
    p = subprocess.run([sys.executable, str(REPO / "tools/bench_data.py"), "--tokenizer", str(tok), "--out", str(bad)],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 1 and p.stderr.startswith("bench_data: error: --out ") and "corpus:" not in p.stdout


def test_bench_data_names_a_failed_run_in_one_line(tmp_path):
    """A tokenizer.json cut short failed the child: its traceback, then the parent's CalledProcessError
    with the whole command line. Now one line names the way, its error and the tokenizer."""
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "tokenizer.json").write_text('{"version": "1.0", "trunc')
    p = subprocess.run([sys.executable, str(REPO / "tools/bench_data.py"), "--tokenizer", str(tok), "--mb", "1",
                        "--repeats", "1"], capture_output=True, text=True, timeout=300)
    err = p.stderr.strip().splitlines()
    assert p.returncode == 1 and len(err) == 1 and "Traceback" not in p.stderr, p.stderr
    assert err[0].startswith("bench_data: error: the ref run failed: ") and err[0].endswith(f"(tokenizer {tok})"), err


def _hf_trainer_args(monkeypatch, overrides: list[str]) -> dict:
    """Build the hf-trainer row as bench does, but stop at Trainer.train: its arguments, and the
    Inductor config in force while it would train."""
    pytest.importorskip("accelerate")
    import argparse

    import torch
    from torch._inductor import config as inductor_config
    from transformers import Trainer

    seen = {}

    def train(self, *a, **k):
        seen.update(args=self.args, coordinate_descent_tuning=inductor_config.coordinate_descent_tuning)

    monkeypatch.setattr(Trainer, "train", train)
    cfg = bench.load_config([str(REPO / "configs/perf/tiny-cpu.yaml")], [*MICRO[2:-4:2][1:], *overrides])
    cfg["trainer"]["precision"] = "32-true"
    bench.run_hf_trainer(cfg, argparse.Namespace(warmup=1, steps=2, batch=2, block=32), torch.device("cpu"))
    return seen


def test_hf_trainer_baseline_is_one_device_even_when_several_gpus_are_visible(monkeypatch):
    """A single-process Trainer wraps the model in nn.DataParallel over every visible GPU (n_gpu =
    device_count) and multiplies the batch: on an 8-GPU node the baseline timed DataParallel on 8x our batch."""
    import torch
    from transformers import TrainingArguments

    real = TrainingArguments.__dict__["_setup_devices"].func  # a cached_property

    def setup_devices(self):  # what TrainingArguments does on a node with 2 visible GPUs
        if "_device" not in self.__dict__:
            self._device = real(self)
            self._n_gpu = 2
        return self._device

    monkeypatch.setattr(TrainingArguments, "_setup_devices", property(setup_devices))
    args = _hf_trainer_args(monkeypatch, [])["args"]
    assert args.n_gpu == 1 and args.train_batch_size == 2  # was 2 GPUs x 2 = 4


def test_hf_trainer_baseline_compiles_with_our_compile_mode_and_inductor_options(monkeypatch):
    seen = _hf_trainer_args(monkeypatch, ["model.compile=true", "model.compile_mode=reduce-overhead"])
    assert seen["args"].torch_compile and seen["args"].torch_compile_mode == "reduce-overhead"  # was the default mode
    from torch._inductor import config as inductor_config

    before = inductor_config.coordinate_descent_tuning
    seen = _hf_trainer_args(monkeypatch, ["model.compile=true", "model.compile_options={coordinate_descent_tuning: true}"])
    assert seen["coordinate_descent_tuning"] is True and seen["args"].torch_compile_mode is None  # was not applied
    assert inductor_config.coordinate_descent_tuning == before  # only while it trains
    seen = _hf_trainer_args(monkeypatch, ["model.compile=false", "model.compile_mode=reduce-overhead"])
    assert not seen["args"].torch_compile  # a mode alone would turn Trainer's compile on, ours stays eager


@pytest.mark.parametrize("override", ["trainer.accumulate_grad_batches=4", "trainer.strategy=fsdp", "trainer.devices=8"])
def test_bench_refuses_trainer_keys_no_row_uses(override):
    """They passed the key check, then every row ran one device, accumulation 1, no strategy, silently."""
    with pytest.raises(SystemExit) as e:
        bench.main([*MICRO, "-o", override])
    key = override.split("=")[0]
    assert e.value.code.startswith(f"bench: error: -o {override!r}: bench does not use {key} (every row is one device")
    assert e.value.code.endswith("drop it") and "\n" not in e.value.code


def test_init_args_override_on_a_flat_section_keeps_the_rest_of_it():
    """`-o model.init_args.lr=0.5` on a flat model section replaced the whole section with {lr: 0.5}:
    config_overrides gone, the row would build (download) full GPT-2 small."""
    flat = bench.load_config([str(REPO / "configs/perf/tiny-cpu.yaml")], [])["model"]
    c = bench.load_config([str(REPO / "configs/perf/tiny-cpu.yaml")], ["model.init_args.lr=0.5"])
    assert c["model"] == {**flat, "lr": 0.5} and c["model"]["config_overrides"]


def test_default_block_is_the_datamodules_and_must_fit_the_model(tmp_path):
    """Without data.block_size bench took n_positions, where the DataModule (and so `fit` and the real-data
    row) takes 1024: tokens/s and MFU counted tokens no row trained. An overlong block is refused up front."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model:\n  from_scratch: true\n  config_overrides: {n_layer: 1, n_embd: 32, n_head: 2, "
                   "n_positions: 64, vocab_size: 200}\ndata:\n  batch_size: 2\ntrainer:\n  precision: 32-true\n")
    with pytest.raises(SystemExit) as e:
        bench.main(["--cpu", "--config", str(cfg), "--steps", "1", "--warmup", "0", "--baseline", "none"])
    assert e.value.code == ("bench: error: data.block_size=1024 exceeds the model's n_positions=64; "
                            "lower data.block_size to at most 64")


def test_sync_counting_covers_every_timed_step_without_warmup(monkeypatch):
    """With --warmup 0 counting never started and CUDA rows reported 0.0 syncs/step."""
    import torch

    class Event:
        def __init__(self, **k):
            pass

        def record(self):
            pass

    modes = []
    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", modes.append)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda *a: None)
    monkeypatch.setattr(bench, "sync", lambda device: None)
    meter = bench.Meter(torch.device("cuda"), warmup=0, steps=2)
    meter.begin()
    warnings.warn("called a synchronizing CUDA operation")  # what sync debug mode "warn" raises
    meter.step_end()
    meter.step_end()
    assert modes == ["warn", "default"] and len(meter.syncs) == 1


def test_tool_outputs_keep_symlinks_modes_and_pipes(tmp_path):
    """tools/outfile.py (every tool's --out/--json) renamed a temporary over the name given: a symlink became a
    file (its target kept the old result), a 0600 file 0644, and /dev/stdout or >(...) failed or was replaced."""
    import outfile

    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "target.json").write_text("old")
    (tmp_path / "latest.json").symlink_to(tmp_path / "shared" / "target.json")
    outfile.write_out(tmp_path / "latest.json", "new", "t")
    assert (tmp_path / "latest.json").is_symlink() and (tmp_path / "shared" / "target.json").read_text() == "new"
    (tmp_path / "private.json").write_text("old")
    (tmp_path / "private.json").chmod(0o600)
    outfile.write_out(tmp_path / "private.json", "new", "t")
    assert (tmp_path / "private.json").stat().st_mode & 0o777 == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest.json", "private.json", "shared"]  # no temporary left
    p = subprocess.run(["bash", "-c", f"{sys.executable} {REPO / 'tools/plan.py'} --model gpt2 --gpus 1 --json /dev/stdout "
                        "| tail -n 3; ls -l /dev/stdout | cut -c1"], capture_output=True, text=True, timeout=120)
    # The JSON reached the pipe (it ends without a newline, so ls's "l", /dev/stdout still a link, follows it).
    assert p.returncode == 0 and p.stdout.splitlines()[-2:] == [' "min_micro_batch": 4', "}l"], p.stdout + p.stderr
