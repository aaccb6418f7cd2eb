"""Read one large corpus file (JSON lines, CSV, Parquet, paragraphs of text) three ways: memory and speed.

    python tools/bench_read.py                          # 300 MB of records in each format
    python tools/bench_read.py --mb 1000 --formats jsonl --out read.json

The file is synthetic (~2 KB English-like documents with newlines and non-ASCII text, the shape of a
web or domain corpus). Each way runs in a fresh subprocess that goes over every document (counting
characters, as the packer hands them on to the tokenizer in 4 MB batches) and reports its peak RSS:

- gpt2dist: `gpt2dist.data.read_documents`, as `prepare_data` reads a corpus file (`.txt` with
  `text_unit=paragraph`): checked whole for bad bytes first, then read a piece (READ_CHUNK), a line or
  a Parquet batch at a time.
- whole: the file read at once (gpt2dist before it streamed): the bytes, their text and every line
  (JSON lines) or paragraph (text), or the whole table and its column as a Python list (pyarrow
  read_csv / read_table).
- datasets: Hugging Face `datasets.load_dataset(json|csv|parquet|text)` (text: `sample_by="paragraph"`)
  into a fresh cache folder (it converts the file to Arrow on disk, then memory-maps it), then every
  text read in batches.

`over start` is the peak RSS less the process's RSS after its imports; the ratio column divides it by
gpt2dist's. MB/s is the file's size over the wall time of the read (and, for datasets, its conversion).
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tools/outfile.py, also under runpy or an import
from outfile import check_out, write_out  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
FORMATS, WAYS = ("jsonl", "csv", "parquet", "txt"), ("gpt2dist", "whole", "datasets")
WORDS = ("the of and to in is that for it as with was on be by this are or from at an which café naïve "
         "Zürich über résumé model data training loss token gradient batch layer attention").split()


def write_corpus(path: Path, mb: float, seed: int = 0) -> int:
    """Records of ~2 KB until the file holds `mb` MiB; returns the document count."""
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    rng, target = random.Random(seed), int(mb * 2**20)
    docs, size = [], 0
    while size < target:
        lines = [" ".join(rng.choices(WORDS, k=rng.randint(5, 30))) for _ in range(rng.randint(5, 20))]
        doc = "\n".join(lines)
        docs.append(doc)
        size += len(doc.encode()) + 30
    if path.suffix == ".jsonl":
        with open(path, "w", encoding="utf-8") as f:
            for i, d in enumerate(docs):
                f.write(json.dumps({"id": i, "text": d}, ensure_ascii=False) + "\n")
    elif path.suffix == ".txt":
        path.write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    elif path.suffix == ".csv":
        pacsv.write_csv(pa.table({"id": list(range(len(docs))), "text": docs}), path)
    else:
        pq.write_table(pa.table({"id": list(range(len(docs))), "text": docs}), path, row_group_size=10_000)
    return len(docs)


def read_whole(path: Path):
    if path.suffix == ".jsonl":
        text = path.read_bytes().decode("utf-8")
        for line in text.split("\n"):
            if line.strip():
                yield json.loads(line)["text"]
        return
    if path.suffix == ".txt":
        import re

        for para in re.split(r"\r?\n(?:[ \t]*\r?\n)+", path.read_bytes().decode("utf-8")):
            if para.strip():
                yield para.strip("\r\n")
        return
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    table = pq.read_table(path) if path.suffix == ".parquet" else \
        pacsv.read_csv(path, parse_options=pacsv.ParseOptions(newlines_in_values=True))
    yield from table.column("text").to_pylist()


def read_datasets(path: Path, cache: str):
    import datasets

    datasets.disable_progress_bars()
    kind = {".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}[path.suffix]
    extra = {"sample_by": "paragraph"} if kind == "text" else {}
    ds = datasets.load_dataset(kind, data_files=str(path), split="train", cache_dir=cache, **extra)
    for batch in ds.select_columns(["text"]).iter(batch_size=1000):
        yield from batch["text"]


def _status_bytes(key: str) -> int:
    """/proc/self/status's VmRSS (now) or VmHWM (peak): this process's own. getrusage's ru_maxrss is not:
    Linux carries a parent's peak into a child across fork and exec (here the parent's corpus writer)."""
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith(key + ":")).split()[1]) * 1024


def child(way: str, path: Path) -> None:
    # The datasets way's Arrow copy goes beside the corpus, in the parent's folder, removed with it.
    with tempfile.TemporaryDirectory(prefix="bench-read-ds-", dir=path.parent) as cache:
        _child(way, path, cache)


def _child(way: str, path: Path, cache: str) -> None:
    from gpt2dist.data import read_documents

    import datasets  # noqa: F401  (imported by every way: its RSS is in every start)
    import pyarrow.csv  # noqa: F401
    import pyarrow.parquet  # noqa: F401

    start_rss = _status_bytes("VmRSS")
    t0 = time.perf_counter()
    docs = read_documents(path, text_unit="paragraph") if way == "gpt2dist" else read_whole(path) if way == "whole" else read_datasets(path, cache)
    n = chars = 0
    for d in docs:
        n, chars = n + 1, chars + len(d)
    seconds = time.perf_counter() - t0
    peak = _status_bytes("VmHWM")
    print(json.dumps({"way": way, "docs": n, "chars": chars, "seconds": seconds, "peak": peak, "start": start_rss}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=float, default=300.0, help="file size in MiB")
    ap.add_argument("--formats", default=",".join(FORMATS))
    ap.add_argument("--ways", default=",".join(WAYS))
    ap.add_argument("--out", help="also write the results as JSON here")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child[0], Path(args.child[1]))
        return
    if not args.mb > 0:
        sys.exit(f"bench_read: error: --mb {args.mb:g} must be > 0")
    for flag, given, known in (("--formats", args.formats, FORMATS), ("--ways", args.ways, WAYS)):
        bad = [x for x in given.split(",") if x not in known]
        if bad:
            sys.exit(f"bench_read: error: {flag} {bad[0]!r} is not one of {','.join(known)}")
    check_out(args.out, "bench_read")
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-read-") as tmp:
        for fmt in args.formats.split(","):
            path = Path(tmp) / f"corpus.{fmt}"
            n_docs = write_corpus(path, args.mb)
            mb = path.stat().st_size / 2**20
            for way in args.ways.split(","):
                out = subprocess.run([sys.executable, __file__, "--child", way, str(path)], capture_output=True,
                                     text=True, cwd=REPO)
                if out.returncode:
                    # A child the OOM killer ends (the whole way at --mb 1000) says nothing on stderr.
                    said = out.stderr.strip().splitlines() or [
                        f"killed by signal {-out.returncode}" if out.returncode < 0 else f"exit {out.returncode}"]
                    rows.append({"format": fmt, "way": way, "error": said[-1][:120]})
                    continue
                r = json.loads(out.stdout.strip().splitlines()[-1])
                assert r["docs"] == n_docs, (way, fmt, r["docs"], n_docs)
                rows.append({"format": fmt, "file_mb": mb, **r, "over": r["peak"] - r["start"]})
    print(f"\n{'format':<8} {'way':<9} {'file MiB':>9} {'docs':>9} {'MB/s':>7} {'peak RSS MiB':>13} "
          f"{'over start MiB':>15} {'ratio':>7}")
    for r in rows:
        if "error" in r:
            print(f"{r['format']:<8} {r['way']:<9} failed: {r['error']}")
            continue
        ours = next((o for o in rows if o.get("format") == r["format"] and o.get("way") == "gpt2dist" and "over" in o), None)
        ratio = f"{r['over'] / ours['over']:7.2f}" if ours and ours["over"] > 0 else f"{'':>7}"
        print(f"{r['format']:<8} {r['way']:<9} {r['file_mb']:9.0f} {r['docs']:9d} {r['file_mb'] / r['seconds']:7.0f} "
              f"{r['peak'] / 2**20:13.0f} {r['over'] / 2**20:15.0f} {ratio}")
    if args.out:
        write_out(args.out, json.dumps(rows, indent=1), "bench_read")


if __name__ == "__main__":
    main()
