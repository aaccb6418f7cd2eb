"""tools/bench.py on CPU with a micro model: rows, ratio, JSON (speed itself is never asserted)."""

from __future__ import annotations

import json
import sys

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
