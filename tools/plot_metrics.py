"""Plot a run's loss (train, val), lr and tokens/s against step into a PNG, without W&B's UI.

    python tools/plot_metrics.py runs/quickstart            # CSVLogger folder(s): **/metrics.csv
    python tools/plot_metrics.py runs/mine/wandb            # W&B offline run(s): **/*.wandb
    python tools/plot_metrics.py RUN_DIR --out loss.png

Several CSV versions or W&B offline runs under RUN_DIR (a resumed run writes a new one) are
merged, CSV versions in Lightning's version order (version_0, version_1, ..., version_10), W&B runs
in time order; a later value for the same step wins. W&B runs are read with W&B's own
reader (`wandb leet inspect --json`), so no private file format is parsed here.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tools/outfile.py, also under runpy or an import
from outfile import check_out, write_out  # noqa: E402

SERIES = {  # panel -> metric names (the names gpt2dist logs whatever the logger)
    "loss": ["train/loss", "val/loss"],
    "lr": ["lr"],
    "tokens/s": ["throughput/tokens_per_sec"],
}


def _error(msg: str):
    print(f"plot_metrics: error: {msg}", file=sys.stderr)
    raise SystemExit(2)


def _merge(into: dict, step, row: dict) -> None:
    for key, value in row.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            into.setdefault(key, {})[int(step)] = float(value)


def _merge_log(into: dict, rows: list[dict], step_key: str) -> None:
    """One training log (a CSV version, a W&B session) over the earlier ones: from its first step on, its
    values replace theirs, and their later points go. A rollback (`--ckpt_path` of an earlier step, `best`)
    abandons that branch: kept, its points past the new log's last step were drawn after the new branch."""
    steps = [int(r[step_key]) for r in rows if step_key in r]
    if not steps:
        return
    start = min(steps)
    for points in into.values():
        for step in [s for s in points if s >= start]:
            del points[step]
    for row in rows:
        if step_key in row:
            _merge(into, row[step_key], row)


def _version(path: Path) -> tuple:
    """CSVLogger's logs/version_N/metrics.csv: N, not the mtime (a copy or a touch reorders mtimes,
    and then an older version's values would win on the steps a resumed run repeats)."""
    m = re.fullmatch(r"version_(\d+)", path.parent.name)
    return (int(m[1]) if m else -1, str(path))


# A fit's log has these; `gpt2dist validate` / `test` write their own version (CSV) or run (W&B) into the run
# folder too, at step 0: merged, the final model's val/loss was drawn as the training curve's first point.
TRAINING = ("train/loss", "lr")


def _training_log(rows: list[dict]) -> bool:
    return any(k in row for row in rows for k in TRAINING)


def _one_run(paths: list[Path], folder_of, root: Path) -> list[Path]:
    """The logs of one run, or a one-line refusal: a folder of several runs (runs/a, runs/b) merged each
    one's version_0 over the others' from step 0, a curve of no run."""
    folders = sorted({folder_of(p) for p in paths})
    if len(folders) > 1:
        names = ", ".join(str(f.relative_to(root)) for f in folders[:4]) + (", ..." if len(folders) > 4 else "")
        _error(f"{root} holds the logs of {len(folders)} runs ({names}); give one run's folder")
    return paths


def read_csv_runs(root: Path) -> dict[str, dict[int, float]]:
    series: dict = {}
    # CSVLogger writes <save_dir>/<name>/<version>/metrics.csv (version_N, or a name such as a job id): one
    # run's versions share the folder above them; a metrics.csv right under the folder given is its own.
    paths = [root] if root.is_file() else _one_run(
        list(root.rglob("metrics.csv")), lambda p: p.parent.parent if p.parent != root else p.parent, root)
    for path in sorted(paths, key=_version):
        rows = []
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                if not row.get("step"):
                    continue
                values = {}
                for k, v in row.items():
                    try:
                        values[k] = float(v)
                    except (TypeError, ValueError):
                        pass
                rows.append(values)
        if _training_log(rows) or root.is_file():
            _merge_log(series, rows, "step")
    return series


def _wandb_exe() -> str:
    exe = Path(sys.executable).with_name("wandb")
    return str(exe) if exe.exists() else (shutil.which("wandb") or "wandb")


def read_wandb_runs(root: Path) -> dict[str, dict[int, float]]:
    series: dict = {}
    # Oldest first, so a requeue's values win: by the start time in the run folder's name
    # (offline-run-YYYYMMDD_HHMMSS-<id>), which a copy keeps; modification times a copy may not.
    def started(p: Path) -> tuple[str, float]:
        stamp = re.search(r"\d{8}_\d{6}", p.parent.name)
        return (stamp.group(0) if stamp else "", p.stat().st_mtime)

    # <save_dir>/wandb/offline-run-<time>-<id>/run-<id>.wandb: a requeue adds a folder to the same wandb/.
    paths = _one_run(list(root.rglob("*.wandb")), lambda p: p.parent.parent, root)
    for path in sorted(paths, key=started):
        proc = subprocess.run([_wandb_exe(), "leet", "inspect", "--json", str(path)], capture_output=True, text=True,
                              timeout=300)
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            _error(f"could not read the W&B run file {path} (wandb leet inspect: {last}); check that wandb is installed")
        items = [rec["history"]["item"] for rec in map(json.loads, proc.stdout.splitlines()) if rec.get("type") == "history"]
        if _training_log(items):
            _merge_log(series, items, "trainer/global_step")
    return series


def read_run(root: Path) -> dict[str, dict[int, float]]:
    root = Path(root)
    if not root.exists():
        _error(f"{root} does not exist; give a run folder (CSVLogger or W&B offline)")
    if root.is_file():
        if root.name != "metrics.csv":
            _error(f"{root} is a file; give the run folder (CSVLogger save_dir or W&B offline run) or a metrics.csv")
        return read_csv_runs(root)
    series = read_csv_runs(root) if any(root.rglob("metrics.csv")) else {}
    if not series and any(root.rglob("*.wandb")):
        series = read_wandb_runs(root)
    if not series:
        _error(f"no metrics.csv or W&B *.wandb run under {root}; point it at the logger's save_dir")
    return series


def _pyplot():
    try:
        import matplotlib
    except ImportError:  # only the [dev] extra installs it
        _error("matplotlib is not installed (it is in gpt2dist's [dev] extra); pip install matplotlib")
    matplotlib.use("Agg")  # headless: clusters and CI have no display
    import matplotlib.pyplot as plt

    return plt


def out_path(given: str | Path) -> Path:
    """The file savefig writes: without an extension it adds .png, so say that name; a folder gets
    metrics.png in it; an unknown type or a place that cannot be written is refused before the run is read."""
    from matplotlib.backend_bases import FigureCanvasBase

    out = Path(given)
    if out.is_dir() or str(given).endswith(("/", os.sep)):  # Path("figs/") drops the slash: figs.png beside it
        out = out / "metrics.png"
    check_out(out, "plot_metrics")
    if not out.suffix:
        return out.with_name(out.name + ".png")
    kinds = FigureCanvasBase.get_supported_filetypes()
    if out.suffix[1:].lower() not in kinds:
        _error(f"--out {out}: unknown image type {out.suffix!r}; end it in one of "
               f"{', '.join('.' + k for k in sorted(kinds))}")
    return out


def plot(series: dict, out: Path, title: str) -> Path:
    plt = _pyplot()

    fig, axes = plt.subplots(len(SERIES), 1, figsize=(8, 8), sharex=True)
    for ax, (panel, names) in zip(axes, SERIES.items()):
        for name in names:
            points = sorted(series.get(name, {}).items())
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, ys, marker="o" if name.startswith("val") else None, markersize=3, label=name)
        ax.set_ylabel(panel)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(loc="best")
        else:
            ax.text(0.5, 0.5, f"no {', '.join(names)} logged", transform=ax.transAxes, ha="center")
    axes[0].set_title(title)
    axes[-1].set_xlabel("step (optimizer steps)")
    fig.tight_layout()
    write_out(out, lambda tmp: fig.savefig(tmp, dpi=100, format=out.suffix[1:].lower() or "png"), "plot_metrics")
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path, help="CSVLogger folder (or its metrics.csv) or W&B offline run/wandb folder")
    ap.add_argument("--out", help="image path, PNG unless it ends in another type, or a folder for metrics.png in it "
                                  "(default: RUN_DIR/metrics.png)")
    args = ap.parse_args(argv)
    _pyplot()  # before reading the run: W&B runs take a while to read
    folder = args.run_dir.parent if args.run_dir.is_file() else args.run_dir
    out = out_path(args.out or folder / "metrics.png")
    series = read_run(args.run_dir)
    out = plot(series, out, str(args.run_dir))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
