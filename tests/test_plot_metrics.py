"""tools/plot_metrics.py on real runs: a CSVLogger folder and a W&B offline run."""

from __future__ import annotations

import os
import subprocess
import sys

from PIL import Image

from conftest import REPO
from run_fixtures import csv_run, wandb_run  # noqa: F401 (fixtures)


def _plot(run_dir, out):
    proc = subprocess.run([sys.executable, str(REPO / "tools/plot_metrics.py"), str(run_dir), "--out", str(out)],
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    with Image.open(out) as im:
        im.verify()  # a valid PNG, not just bytes
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size == (800, 800)
        # Three panels with lines: many distinct colours, not a blank canvas.
        assert len(im.convert("RGB").getcolors(maxcolors=1 << 20)) > 50
    assert out.stat().st_size > 20_000


def test_plot_from_csv_run(csv_run, tmp_path):
    _plot(csv_run.root, tmp_path / "csv.png")


def test_plot_from_wandb_offline_run(wandb_run, tmp_path):
    _plot(wandb_run.root / "wandb", tmp_path / "wb.png")


def test_plot_names_a_folder_without_runs(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "tools/plot_metrics.py"), str(tmp_path)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "no metrics.csv or W&B *.wandb run under" in proc.stderr


def _write_csv(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("step,train/loss\n" + "".join(f"{s},{v}\n" for s, v in rows))


def test_resumed_csv_versions_merge_in_version_order_not_mtime(tmp_path):
    sys.path.insert(0, str(REPO / "tools"))
    import plot_metrics

    # version_10 resumed version_2 at step 2; a copy or touch left version_2 the newer file.
    _write_csv(tmp_path / "logs/version_2/metrics.csv", [(0, 5.0), (1, 4.0), (2, 3.0), (3, 2.5)])
    _write_csv(tmp_path / "logs/version_10/metrics.csv", [(2, 1.0), (3, 0.5)])
    os.utime(tmp_path / "logs/version_10/metrics.csv", (1_000_000, 1_000_000))
    os.utime(tmp_path / "logs/version_2/metrics.csv", (2_000_000, 2_000_000))
    assert plot_metrics.read_csv_runs(tmp_path)["train/loss"] == {0: 5.0, 1: 4.0, 2: 1.0, 3: 0.5}


def test_a_rollback_drops_the_abandoned_branch(tmp_path):
    """version_1 rolled back to step 3 of version_0 (which ran to step 7) and is at step 5: version_0's steps 6
    and 7, the abandoned branch, were drawn after the new one."""
    sys.path.insert(0, str(REPO / "tools"))
    import plot_metrics

    _write_csv(tmp_path / "logs/version_0/metrics.csv", [(s, 9.0 - s) for s in range(8)])
    _write_csv(tmp_path / "logs/version_1/metrics.csv", [(3, 0.3), (4, 0.4), (5, 0.5)])
    assert plot_metrics.read_csv_runs(tmp_path)["train/loss"] == {0: 9.0, 1: 8.0, 2: 7.0, 3: 0.3, 4: 0.4, 5: 0.5}


def test_an_evaluations_own_log_in_the_run_folder_is_not_part_of_the_training_curves(tmp_path, monkeypatch):
    """`gpt2dist validate` / `test` log their own CSV version (and W&B run) into the run folder, at step 0: the
    final model's val/loss was drawn as the training curve's first point."""
    import json
    import types

    sys.path.insert(0, str(REPO / "tools"))
    import plot_metrics

    (tmp_path / "logs/version_0").mkdir(parents=True)
    (tmp_path / "logs/version_0/metrics.csv").write_text("step,train/loss,val/loss\n1,5.0,\n1,,4.5\n3,4.0,\n3,,3.5\n")
    (tmp_path / "logs/version_1").mkdir(parents=True)
    (tmp_path / "logs/version_1/metrics.csv").write_text("step,val/loss,val/ppl\n0,3.5,33.1\n")  # validate, after fit
    series = plot_metrics.read_csv_runs(tmp_path)
    assert series["val/loss"] == {1: 4.5, 3: 3.5} and "val/ppl" not in series
    assert plot_metrics.read_csv_runs(tmp_path / "logs/version_1/metrics.csv")["val/loss"] == {0: 3.5}  # asked for by name
    items = {"offline-run-20261201_100000-fit": [{"trainer/global_step": 3, "train/loss": 4.0, "lr": 1e-3},
                                                 {"trainer/global_step": 3, "val/loss": 3.5}],
             "offline-run-20261202_100000-val": [{"trainer/global_step": 0, "val/loss": 3.5}]}
    for folder, rows in items.items():
        (tmp_path / "wandb" / folder).mkdir(parents=True)
        (tmp_path / "wandb" / folder / "run.wandb").write_text(
            "\n".join(json.dumps({"type": "history", "history": {"item": r}}) for r in rows))
    monkeypatch.setattr(plot_metrics.subprocess, "run", lambda cmd, **kw: types.SimpleNamespace(
        returncode=0, stdout=open(cmd[-1]).read(), stderr=""))
    assert plot_metrics.read_wandb_runs(tmp_path / "wandb")["val/loss"] == {3: 3.5}


def _run(*args, pre=""):
    code = (f"import runpy, sys\n{pre}\nsys.argv = ['plot_metrics.py', *sys.argv[1:]]\n"
            f"runpy.run_path({str(REPO / 'tools/plot_metrics.py')!r}, run_name='__main__')")
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, timeout=120)


def test_plot_without_matplotlib_says_how_to_install_it(tmp_path):
    _write_csv(tmp_path / "logs/version_0/metrics.csv", [(0, 1.0)])
    proc = _run(tmp_path, pre="sys.modules['matplotlib'] = None")  # as on a plain `pip install gpt2dist`
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "plot_metrics: error: matplotlib is not installed (it is in gpt2dist's [dev] extra); pip install matplotlib"]


def test_plot_out_path_names_the_written_file_and_refuses_unknown_types(tmp_path):
    csv = tmp_path / "run/logs/version_0/metrics.csv"
    _write_csv(csv, [(0, 2.0), (1, 1.0)])
    proc = _run(tmp_path / "run", "--out", tmp_path / "pm")  # matplotlib adds .png: say so
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"wrote {tmp_path / 'pm.png'}" and (tmp_path / "pm.png").is_file()

    proc = _run(tmp_path / "run", "--out", tmp_path / "x.jpgg")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"plot_metrics: error: --out {tmp_path / 'x.jpgg'}: unknown image type '.jpgg'")
    assert ".png" in err[0] and ".svg" in err[0] and not (tmp_path / "x.jpgg").exists()

    proc = _run(csv)  # the metrics.csv itself: plotted next to it
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"wrote {csv.parent / 'metrics.png'}" and (csv.parent / "metrics.png").is_file()
    (csv.parent / "hparams.yaml").write_text("{}\n")
    proc = _run(csv.parent / "hparams.yaml")
    assert proc.returncode == 2 and "give the run folder" in proc.stderr and "Traceback" not in proc.stderr


def test_requeued_wandb_runs_merge_in_start_order_not_mtime(tmp_path, monkeypatch, capsys):
    """A requeue's W&B offline run (a new offline-run-<time>-<id> folder) must win over the earlier one;
    by file mtime a copy without preserved times let the older values win. A file wandb cannot read is
    one line naming it (was a CalledProcessError traceback that hid wandb's stderr)."""
    import json
    import types

    import pytest

    sys.path.insert(0, str(REPO / "tools"))
    import plot_metrics

    runs = {"offline-run-20261201_100000-abc": 3.0, "offline-run-20261202_100000-abc": 1.0}
    for i, (folder, loss) in enumerate(runs.items()):
        f = tmp_path / folder / "run-abc.wandb"
        f.parent.mkdir()
        f.write_text(json.dumps({"type": "history", "history": {"item": {"trainer/global_step": 2, "train/loss": loss}}}))
        os.utime(f, (2_000_000 - i, 2_000_000 - i))  # the newer run has the older mtime
    monkeypatch.setattr(plot_metrics.subprocess, "run", lambda cmd, **kw: types.SimpleNamespace(
        returncode=0, stdout=open(cmd[-1]).read(), stderr=""))
    assert plot_metrics.read_wandb_runs(tmp_path)["train/loss"] == {2: 1.0}
    monkeypatch.setattr(plot_metrics.subprocess, "run", lambda cmd, **kw: types.SimpleNamespace(
        returncode=1, stdout="", stderr="Traceback...\nValueError: not a W&B file"))
    with pytest.raises(SystemExit):
        plot_metrics.read_wandb_runs(tmp_path)
    err = capsys.readouterr().err
    assert err.startswith("plot_metrics: error: could not read the W&B run file ") and "ValueError: not a W&B file" in err


def test_plot_out_may_be_a_folder_and_an_unwritable_out_is_refused_before_the_run_is_read(tmp_path):
    """`--out figs/` wrote figs.png beside the folder (Path drops the slash); an --out under a file was a
    traceback after the whole run had been read (W&B: a wandb call per file)."""
    _write_csv(tmp_path / "run/logs/version_0/metrics.csv", [(0, 2.0), (1, 1.0)])
    for given in (f"{tmp_path / 'figs'}/", tmp_path / "figs"):  # new with its slash, then an existing folder
        proc = _run(tmp_path / "run", "--out", given)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip() == f"wrote {tmp_path / 'figs' / 'metrics.png'}"
    assert not (tmp_path / "figs.png").exists() and [p.name for p in (tmp_path / "figs").iterdir()] == ["metrics.png"]

    (tmp_path / "a-file").write_text("")
    proc = _run(tmp_path / "nowhere", "--out", tmp_path / "a-file" / "p.png")  # refused before the run is read
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip() == (f"plot_metrics: error: --out {tmp_path / 'a-file' / 'p.png'}: {tmp_path / 'a-file'} "
                                   "is a file, not a folder; give a path in a folder")


def test_a_folder_of_several_runs_is_refused_not_merged(tmp_path):
    """runs/a and runs/b each have a version_0: the one later by path replaced the other from step 0 on,
    a curve of neither run. One run's versions (a requeue's) still merge."""
    _write_csv(tmp_path / "runs/a/logs/version_0/metrics.csv", [(0, 5.0), (1, 4.0)])
    _write_csv(tmp_path / "runs/a/logs/version_1/metrics.csv", [(1, 3.0)])
    _write_csv(tmp_path / "runs/b/logs/version_0/metrics.csv", [(0, 9.0)])
    proc = _run(tmp_path / "runs")
    assert proc.returncode == 2 and proc.stderr.strip() == (
        f"plot_metrics: error: {tmp_path / 'runs'} holds the logs of 2 runs (a/logs, b/logs); give one run's folder")
    sys.path.insert(0, str(REPO / "tools"))
    import plot_metrics

    assert plot_metrics.read_run(tmp_path / "runs/a")["train/loss"] == {0: 5.0, 1: 3.0}


def test_named_csv_versions_of_one_run_merge(tmp_path):
    """CSVLogger(version=<job id>) writes logs/job-101, logs/job-202 for one run's resubmissions: they are that
    run's versions (the folder above them is one), not two runs to refuse."""
    sys.path.insert(0, str(REPO / "tools"))
    import plot_metrics

    _write_csv(tmp_path / "run/logs/job-101/metrics.csv", [(0, 5.0), (1, 4.0)])
    _write_csv(tmp_path / "run/logs/job-202/metrics.csv", [(1, 3.0), (2, 2.0)])
    assert plot_metrics.read_run(tmp_path / "run")["train/loss"] == {0: 5.0, 1: 3.0, 2: 2.0}
