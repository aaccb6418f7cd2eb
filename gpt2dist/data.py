"""Corpus -> tokens -> packed blocks on disk -> resumable loaders.

`TokenBlockDataModule` reads local files (.txt/.md/.py/.rst, .jsonl/.json, .parquet, .csv)
or a Hugging Face dataset, tokenizes every document, appends EOS after each one, concatenates
and cuts the stream into blocks of exactly `block_size` tokens. Only the final remainder
(< block_size tokens) is dropped: unlike `run_clm.py`'s `group_texts`, which drops a remainder
per 1000-row map batch and joins documents with no separator.

The packed blocks are cached on disk (uint16 when the vocabulary fits), keyed by the files'
path/size/mtime, the tokenizer's content, the block size and the split settings. `prepare_data`
(local rank 0) writes the cache once; `setup` on every rank only memory-maps it.
"""

from __future__ import annotations

import codecs
import glob
import hashlib
import json
import logging
import math
import os
import re
import shutil
import sysconfig
import tempfile
from collections.abc import Iterator
from itertools import chain
from pathlib import Path
from typing import Literal

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import Dataset, Sampler

from gpt2dist.errors import DataError
from gpt2dist.tokenizer import load_tokenizer, tokenizer_fingerprint, train_bpe_tokenizer

log = logging.getLogger(__name__)

TEXT_SUFFIXES = {".txt", ".md", ".rst", ".py", ".text"}
SUFFIXES = TEXT_SUFFIXES | {".jsonl", ".json", ".parquet", ".csv"}
CACHE_VERSION = 5  # bump when the on-disk layout, packing or split rule changes (2: relative doc keys; 3: blank lines with spaces/CRLF split paragraphs; 4: hold-out by text; 5: no big-document overshoot)


# ----------------------------------------------------------------------------- sources


def expand_pattern(pattern: str) -> str:
    """`~`, `$VARS` and `{stdlib}` (this Python's standard library folder) in a path pattern."""
    pattern = pattern.replace("{stdlib}", sysconfig.get_paths()["stdlib"])
    return os.path.expanduser(os.path.expandvars(pattern))


def resolve_files(patterns: list[str], key: str) -> list[Path]:
    """Expand paths/globs; every pattern must match at least one supported file."""
    files: list[Path] = []
    for pat in patterns:
        expanded = expand_pattern(pat)
        # A name that exists is that file, brackets and all: `notes[1].txt` read as a glob matched
        # notes1.txt (another file, silently) or nothing.
        if glob.has_magic(expanded) and not os.path.exists(expanded):
            hits = sorted(p for p in glob.glob(_existing_prefix_escaped(expanded), recursive=True) if os.path.isfile(p))
            if not hits:
                raise DataError(f"{key}: glob {pat!r} matches no file; check the path (from {os.getcwd()}); "
                                f"[, ] and ? in a name are glob characters: write [[] for [ (glob.escape)")
        else:
            if not os.path.exists(expanded):
                raise DataError(f"{key}: file {pat!r} does not exist; check the path (from {os.getcwd()})")
            if os.path.isdir(expanded):
                raise DataError(f"{key}: {pat!r} is a folder; give files or a glob such as '{pat.rstrip('/')}/**/*.txt'")
            hits = [expanded]
        for h in hits:
            if Path(h).suffix.lower() not in SUFFIXES:
                raise DataError(
                    f"{key}: {h!r} has an unsupported extension; use one of {' '.join(sorted(SUFFIXES))}"
                )
            if not os.access(h, os.R_OK):
                raise DataError(f"{key}: {h!r} is not readable; fix its permissions or drop it from {key}")
        files.extend(Path(h) for h in hits)
    # The same file matched twice would silently double its weight, also when named two ways
    # (relative and absolute, via `..`, a symlink or a hard link): the first name given is kept.
    first: dict[tuple[int, int], Path] = {}
    for f in files:
        first.setdefault(file_identity(f), f)
    return list(first.values())


def _existing_prefix_escaped(pattern: str) -> str:
    """`set[a]/*.txt` with a folder named `set[a]`: that folder, escaped, then the glob below it (it matched
    a folder `seta`, or nothing)."""
    parts = Path(pattern).parts
    for i in range(len(parts) - 1, 0, -1):
        prefix = os.path.join(*parts[:i])
        if os.path.exists(prefix):
            return os.path.join(glob.escape(prefix), *parts[i:]) if glob.has_magic(prefix) else pattern
    return pattern


def file_identity(path: str | os.PathLike) -> tuple[int, int]:
    """One file whatever its name: device and inode (a hard link has no realpath of its own)."""
    st = os.stat(path)
    return st.st_dev, st.st_ino


class BadFileError(DataError):
    """A binary or non-UTF-8 file: the one kind `data.on_bad_file=skip` leaves out."""

    def __init__(self, path: Path, problem: str, fix: str):
        super().__init__(f"{path}: {problem}; {fix}, or set data.on_bad_file=skip")
        self.problem = f"{path}: {problem}"  # the skip warning's text: no advice to set what is already set


def _decode(path: Path, raw: bytes) -> str:
    _check_bytes(path, raw, 0)
    try:
        return raw.decode("utf-8-sig")  # a leading UTF-8 byte order mark is not text: it would be a token
    except UnicodeDecodeError as e:
        raise BadFileError(path, f"not UTF-8 (byte {e.start})", "convert it (e.g. iconv -t utf-8)") from None


def _check_bytes(path: Path, raw: bytes, offset: int) -> None:
    """The binary checks of the file's bytes `raw`, which start at byte `offset`."""
    if offset == 0 and raw[:2] in (b"\xff\xfe", b"\xfe\xff"):  # a Windows "Unicode" export: NUL bytes, but not binary
        raise BadFileError(path, "is UTF-16 (byte order mark)", "convert it (e.g. iconv -f utf-16 -t utf-8)")
    if b"\x00" in raw:  # anywhere: NUL is valid UTF-8, so a NUL-padded tail (a crashed writer) would be trained on
        raise BadFileError(path, "looks binary (NUL bytes)", "remove it from the file list")


# Bytes per read of a JSON-lines file (and of any record file's check): a 20 GB JSON-lines corpus is read
# in 16 MB pieces, not into 20 GB of bytes + ~20-80 GB of str + a list of its lines.
READ_CHUNK = 16 << 20


def _check_text_file(path: Path) -> None:
    """`_decode`'s checks (UTF-16, NUL bytes, invalid UTF-8 at byte N) over the file in READ_CHUNK pieces.
    Run before a record is read, so a bad file yields no document: `on_bad_file=skip` leaves out the whole
    file, never its first part."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with open(path, "rb") as f:
        while True:
            chunk = f.read(READ_CHUNK)
            _check_bytes(path, chunk, offset)
            try:
                decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as e:
                # e.object is the decoder's carried bytes (an unfinished character) + this chunk.
                raise BadFileError(path, f"not UTF-8 (byte {offset + len(chunk) - len(e.object) + e.start})",
                                   "convert it (e.g. iconv -t utf-8)") from None
            if not chunk:
                return
            offset += len(chunk)


def _json_lines(lines: Iterator[str], path: Path) -> Iterator[tuple[int, object]]:
    """(line number, record) of JSON lines; blank lines are skipped."""
    # "\n" only: splitlines() also splits at U+2028/U+2029/U+0085, which JSON allows raw inside strings.
    for lineno, line in enumerate(lines, 1):
        if line.strip():
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: invalid JSON line ({e.msg})") from None


def _file_lines(path: Path) -> Iterator[str]:
    """The "\n"-ended lines of a checked UTF-8 file, one at a time (a leading byte order mark dropped)."""
    with open(path, "rb", buffering=READ_CHUNK) as f:
        for i, raw in enumerate(f):  # a binary file splits at b"\n" only
            line = raw.decode("utf-8")
            yield line.removeprefix("\ufeff") if i == 0 else line


def _json_texts(path: Path, text: str, field: str, knob: str = "data.text_field", skip_null: bool = True) -> Iterator[str]:
    """The texts of a .json file (read whole: a list of records, one record, or JSON lines)."""
    stripped, rows = text.lstrip(), None
    if stripped.startswith("{"):
        try:  # one object (pretty-printed, or on one line), not JSON lines: JSON lines fail at their second line
            whole = json.loads(text)
        except json.JSONDecodeError:
            whole = None  # JSON lines, or broken: the line-by-line reader below names the line
        if isinstance(whole, dict) and field in whole:  # one record
            rows = [whole]
        elif isinstance(whole, dict):  # e.g. {"data": [...]}: valid JSON, but not records
            raise DataError(f"{path}: one JSON object with keys {sorted(whole)[:5]}, not records; give a list of "
                            f"records or JSON lines (one record per line), or set data.text_field to the text's key")
    elif stripped.startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: invalid JSON ({e.msg} at line {e.lineno})") from None
    numbered = enumerate(rows, 1) if rows is not None else _json_lines(iter(text.split("\n")), path)
    yield from _record_texts(path, numbered, field, knob, skip_null)


def _record_texts(path: Path, numbered, field: str, knob: str, skip_null: bool) -> Iterator[str]:
    for n, row in numbered:
        if not isinstance(row, dict) or field not in row:
            raise DataError(f"{path}:{n}: record has no field {field!r}; set {knob} to the text's key")
        value = row[field]
        if value is None and skip_null:  # a missing text, as a null in a Parquet/CSV column or a hub data set: no document
            continue
        if not isinstance(value, str):
            raise DataError(f"{path}:{n}: field {field!r} is {'null' if value is None else type(value).__name__}, not a string")
        try:  # JSON's "\ud83d" (an emoji cut in half) parses to a lone surrogate, which no tokenizer encodes
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            raise DataError(f"{path}:{n}: field {field!r} holds a lone surrogate (U+{ord(value[e.start]):04X} at character "
                            f"{e.start}), not valid Unicode; repair or drop that record") from None
        yield value


def _arrow_batches(path: Path, batches) -> Iterator:
    """`batches` (pyarrow record batches), a reader's failure as one line naming the file."""
    it = iter(batches)
    while True:
        try:
            batch = next(it)
        except StopIteration:
            return
        except Exception as e:
            raise DataError(f"{path}: cannot read ({type(e).__name__}: {str(e).splitlines()[0][:120]})") from None
        yield batch


def _csv_rows(path: Path, parse, convert, first_only: bool = False):
    """pyarrow's streaming CSV reader over `path` (record batches), or with `first_only` the opened reader.
    1 MB blocks (pyarrow's default): with 4 or 16 MB ones its peak grew with the file (99 -> 203 MiB over start
    for 60 -> 200 MB), and reading was slower (243 vs 423 MB/s). A row longer than a block (a book-length text)
    is refused by pyarrow ("straddling object"): read again with 8x the block, from the row it reached."""
    import pyarrow as pa
    import pyarrow.csv as pacsv

    block, size = 1 << 20, path.stat().st_size

    def opened():
        return pacsv.open_csv(path, read_options=pacsv.ReadOptions(block_size=block), parse_options=parse,
                              convert_options=convert)

    if first_only:
        while True:
            try:
                return opened()
            except pa.ArrowInvalid as e:
                if "straddl" not in str(e) or block > size:
                    raise
                block *= 8

    def rows():
        nonlocal block
        done = 0  # rows handed on
        while True:
            seen = 0
            try:
                for batch in opened():
                    if seen + batch.num_rows <= done:  # handed on before a retry
                        seen += batch.num_rows
                        continue
                    batch, seen = batch.slice(done - seen), done
                    seen = done = done + batch.num_rows
                    yield batch
                return
            except pa.ArrowInvalid as e:
                if "straddl" not in str(e) or block > size:
                    raise
                block *= 8

    return rows()


def _table_texts(path: Path, field: str, knob: str = "data.text_field", skip_null: bool = True) -> Iterator[str]:
    """The texts of a Parquet or CSV file's column `field`, read a batch at a time (1 MB of CSV, or 1,024
    Parquet rows of a row group), never the whole table."""
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    try:
        if path.suffix.lower() == ".parquet":
            # pre_buffer=False: pyarrow's default pre-buffers every row group it is asked for, and its peak
            # grew with the file (127 MiB over start for 200 MB, 71 MiB without at any size).
            pf = pq.ParquetFile(path, pre_buffer=False)
            names, schema = pf.schema_arrow.names, pf.schema_arrow
            if field in names:
                batches = pf.iter_batches(batch_size=1024, columns=[field])
        else:
            _check_text_file(path)  # NUL bytes, UTF-16, invalid UTF-8: a bad file, which on_bad_file=skip skips
            # newlines_in_values: a quoted text holding newlines (any real document); without it pyarrow
            # splits its read blocks inside such a field and the parse fails past the first block.
            parse = pacsv.ParseOptions(newlines_in_values=True)
            names = _csv_rows(path, parse, None, first_only=True).schema.names  # the header (and one block)
            if field in names:
                # The text column only, as written: type inference would turn "007" into 7 and "1e3" into
                # 1000.0; streamed, another column's types are inferred from the first block, which a
                # later block may break ("12" then "n/a").
                text_only = pacsv.ConvertOptions(column_types={field: pa.string()}, include_columns=[field])
                schema, batches = pa.schema([(field, pa.string())]), _csv_rows(path, parse, text_only)
    except BadFileError:
        raise
    except Exception as e:
        raise DataError(f"{path}: cannot read ({type(e).__name__}: {str(e).splitlines()[0][:120]})") from None
    if field not in names:
        raise DataError(f"{path}: no column {field!r} (has {names}); set {knob}")
    kind = schema.field(field).type
    # Text in any of Arrow's string layouts: plain, large, a view (newer writers), dictionary-encoded
    # (pandas' category dtype). Numbers are refused: str(3) would be packed as text.
    def texts(t) -> bool:
        return pa.types.is_string(t) or pa.types.is_large_string(t) or getattr(pa.types, "is_string_view", bool)(t) is True

    if not (texts(kind) or pa.types.is_dictionary(kind) and texts(kind.value_type)):
        raise DataError(f"{path}: column {field!r} is {kind}, not text; set {knob} to the text column")
    n = 0
    for batch in _arrow_batches(path, batches):
        column = batch.column(0)
        if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
            column = column.cast(pa.large_string())
        try:  # Parquet writers that skip UTF-8 checks (Spark's binary-as-string): a bad file, like a .txt's bytes
            column.validate(full=True)
        except pa.ArrowInvalid as e:
            raise BadFileError(path, f"column {field!r} near row {n + 1} is not UTF-8 text ({str(e).splitlines()[0][:80]})",
                               "re-encode the column as UTF-8") from None
        for value in column.to_pylist():
            n += 1
            if value is not None:
                yield str(value)
            elif not skip_null:
                raise DataError(f"{path}: row {n} of column {field!r} is null, not a string")


# A blank line may hold spaces or tabs, and end in CRLF (Windows files): splitting on "\n\n" alone made
# such a file one document.
_BLANK_LINE = re.compile(r"[ \t]*\r?\n")
_LINE_END = re.compile(r"\r\n|\r|\n")


def _paragraphs(path: Path) -> Iterator[str]:
    """The blank-line-separated paragraphs of a text file, read a line at a time (a multi-GB dump packs)."""
    _check_text_file(path)  # the whole file first: a bad one yields no paragraph
    lines: list[str] = []
    for i, line in enumerate(chain(_file_lines(path), ["\n"])):  # a blank line after the last ends the last paragraph
        # A blank line ends the paragraph before it; the first line has none before it, so it is text (as
        # the packed caches split it: whitespace then, unless the next line is blank too).
        if i == 0 or not _BLANK_LINE.fullmatch(line):
            lines.append(line)
        elif lines:
            para, lines = "".join(lines), []
            if para.strip():
                yield para.strip("\r\n")


def read_documents(path: Path, text_field: str = "text", text_unit: str = "file",
                   knob: str = "data.text_field", skip_null: bool = True) -> Iterator[str]:
    """The documents of one file. Text files are one document per file, or per blank-line
    separated paragraph when `text_unit="paragraph"`. `knob`: the setting an error names (the field's).
    `skip_null`: a null text is no document (training data); else an error (prompts: each is a row of output)."""
    suffix = path.suffix.lower()
    if suffix in {".parquet", ".csv"}:
        yield from _table_texts(path, text_field, knob, skip_null)
        return
    if suffix == ".jsonl":
        _check_text_file(path)  # the whole file first: a bad one yields no document
        yield from _record_texts(path, _json_lines(_file_lines(path), path), text_field, knob, skip_null)
        return
    if suffix != ".json" and text_unit == "paragraph":
        yield from _paragraphs(path)
        return
    text = _decode(path, path.read_bytes())
    if suffix == ".json":
        yield from _json_texts(path, text, text_field, knob, skip_null)
    else:
        yield text


# ----------------------------------------------------------------------------- packing


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def encode_documents(docs: list[str], tokenizer, dtype: np.dtype, literal_eos: str = "boundary",
                     eos: bool = True) -> np.ndarray:
    """Token ids of `docs` with EOS after each (`eos`; without: pieces of one running text), as one flat
    array. `literal_eos`: what a literal
    "<|endoftext|>" (any special token's text) in a document is: "boundary", that token, as `run_clm.py`'s
    tokenizer call reads it (TinyStories' .txt joins stories with it); "text", its characters (code or
    text about GPT; nanoGPT's encode_ordinary), so the only EOS is the one after each document.

    Uses the Rust tokenizer's parallel batch encode directly: 3.4x the tokens/s of
    `datasets.map` + `group_texts` on 2 cores (tools/bench_data.py).
    """
    if not docs:
        return np.zeros(0, dtype=dtype)
    backend = tokenizer.backend_tokenizer
    encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
    as_text = literal_eos == "text"
    if as_text and not hasattr(backend, "encode_special_tokens"):
        raise DataError("data.literal_eos=text needs tokenizers >= 0.15 (encode_special_tokens); "
                        "upgrade tokenizers or use data.literal_eos=boundary")
    # Set either way, on the shared backend, and put back: transformers leaves it as the tokenizer's
    # last __call__ had it (a tokenizer_config.json with split_special_tokens: true), and a boundary
    # run packed every literal "<|endoftext|>" as text.
    before = getattr(backend, "encode_special_tokens", None)
    if before is not None:
        backend.encode_special_tokens = as_text
    try:
        encodings = encode(docs, add_special_tokens=False)
    finally:
        if before is not None:
            backend.encode_special_tokens = before
    sep = [np.array([tokenizer.eos_token_id], dtype=dtype)] if eos else []
    parts = []
    for enc in encodings:
        parts.append(np.asarray(enc.ids, dtype=dtype))
        parts.extend(sep)
    return np.concatenate(parts)


class _BlockWriter:
    """Appends token arrays to a file; the blocks are the first n * block_size tokens."""

    def __init__(self, path: Path, dtype: np.dtype):
        self.path, self.dtype, self.n_tokens, self.n_docs = path, dtype, 0, 0
        self.f = open(path, "wb")

    def write(self, ids: np.ndarray, n_docs: int) -> None:
        ids.astype(self.dtype, copy=False).tofile(self.f)
        self.n_tokens += len(ids)
        self.n_docs += n_docs

    def close(self, block_size: int) -> dict:
        n_blocks = self.n_tokens // block_size
        self.f.truncate(n_blocks * block_size * self.dtype.itemsize)  # drop only the final remainder
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()
        return {
            "documents": self.n_docs,
            "tokens": self.n_tokens,
            "blocks": n_blocks,
            "dropped_tokens": self.n_tokens - n_blocks * block_size,
        }


def _doc_rank(doc_key: str, seed: int) -> int:
    return int.from_bytes(hashlib.blake2b(f"{seed}:{doc_key}".encode(), digest_size=8).digest(), "little")


def choose_val_docs(sizes: dict[str, int], fraction: float, seed: int) -> set[str]:
    """Whole documents for validation: in seeded-hash order until `fraction` of the text.

    Deterministic and mostly stable when files are added (a document's rank never changes);
    at least one document is held out when fraction > 0, and at least one is kept for training.
    A document that would take the hold-out past twice its target is passed over: otherwise one
    large file drawn early (5% asked, one 90% file among small ones) silently became the
    validation set and left training a tenth of the corpus.
    """
    if fraction <= 0 or len(sizes) < 2:
        return set()
    target, taken, chosen = fraction * sum(sizes.values()), 0, set()
    ranked = sorted(sizes, key=lambda k: _doc_rank(k, seed))
    for key in ranked:
        if taken >= target or len(chosen) == len(sizes) - 1:
            break
        if taken + sizes[key] <= 2 * target:
            chosen.add(key)
            taken += sizes[key]
    if not chosen:  # every document alone is over twice the target: hold out the smallest (lowest rank on ties)
        chosen.add(min(ranked, key=lambda k: sizes[k]))
    return chosen


# ----------------------------------------------------------------------------- datasets / samplers


class TokenBlocks(Dataset):
    """Memory-mapped (n_blocks, block_size) tokens. Items are dicts of int64 tensors.

    Index `i >= len(self)` returns block `i % len(self)` with `loss_weight=0`: the padding
    that lets every rank run the same number of validation steps without double counting.
    """

    def __init__(self, path: Path, block_size: int, dtype: np.dtype):
        self.path, self.block_size, self.dtype = Path(path), block_size, np.dtype(dtype)
        self.n = os.path.getsize(path) // (self.dtype.itemsize * block_size)
        self._map()

    def _map(self) -> None:
        self.blocks = np.memmap(self.path, dtype=self.dtype, mode="r", shape=(self.n, self.block_size)) if self.n else None

    # Pickled by path: a memmap pickles as an array of its whole data, so each spawned loader worker
    # (macOS's and Windows' default start method, or multiprocessing_context="spawn") got a private copy
    # of the split in memory (8 workers x a 20 GB train.bin).
    def __getstate__(self) -> dict:
        return {**self.__dict__, "blocks": None}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._map()

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        ids = torch.from_numpy(self.blocks[i % self.n].astype(np.int64))
        return {"input_ids": ids, "loss_weight": torch.tensor(1.0 if i < self.n else 0.0)}


class StridedWindows:
    """Overlapping evaluation windows over a split's token stream (its blocks end to end): window k
    starts at k x stride, and a last one ends at the stream's end. Each window scores only the targets
    the previous one did not reach, so (at stride < block_size) every token after the first is predicted
    exactly once, with at least block_size - stride tokens of context (Hugging Face's "perplexity of
    fixed-length models"). 97 blocks of 1,024 tokens at stride 512: 193 windows, ~2x the compute."""

    def __init__(self, blocks: TokenBlocks, stride: int):
        self.blocks, self.block_size, self.stride = blocks, blocks.block_size, stride
        total = blocks.n * blocks.block_size
        starts = list(range(0, total - self.block_size + 1, stride)) if total >= self.block_size else []
        if starts and starts[-1] + self.block_size < total:
            starts.append(total - self.block_size)  # the tail, with as much context as fits
        self.starts = starts
        self.n = len(starts)

    def __len__(self) -> int:
        return self.n

    @property
    def tokens(self) -> np.ndarray:
        """The split's tokens end to end: a view of the blocks' memmap (pickled by path with them)."""
        return self.blocks.blocks.reshape(-1) if self.blocks.n else np.zeros(0, self.blocks.dtype)

    def scored(self, k: int) -> int:
        """How many of window k's block_size - 1 targets are new (the last ones): all in window 0."""
        if k == 0:
            return self.block_size - 1
        # A window's first token is context only: at stride block_size (disjoint) it is never predicted.
        return min(self.starts[k] - self.starts[k - 1], self.block_size - 1)

    def __getitem__(self, i: int) -> dict:
        k = i % self.n
        start = self.starts[k]
        ids = torch.from_numpy(self.tokens[start:start + self.block_size].astype(np.int64))
        return {"input_ids": ids, "loss_weight": torch.tensor(1.0 if i < self.n else 0.0),
                "scored": torch.tensor(self.scored(k))}


class BlockSampler(Sampler[int]):
    """This rank's share of a seeded, per-epoch permutation of block indices.

    Rank r takes positions r, r+W, r+2W, ... so a global batch of B x W blocks is the same set
    whatever W is (single process, DDP x2, FSDP x2 see identical data per optimizer step).
    `pad=False` (training) drops the tail that does not divide by W; `pad=True` (evaluation)
    pads with indices >= n, which the dataset marks `loss_weight=0`.
    """

    def __init__(self, n: int, shuffle: bool, seed: int, num_replicas: int = 1, rank: int = 0, pad: bool = False):
        self.n, self.shuffle, self.seed = n, shuffle, seed
        self.num_replicas, self.rank, self.pad, self.epoch = num_replicas, rank, pad, 0
        self.resume_at: dict | None = None  # a loader position to start the next iterator at (_loader_class)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return math.ceil(self.n / self.num_replicas) if self.pad else self.n // self.num_replicas

    def indices(self, epoch: int) -> list[int]:
        """This rank's block indices for `epoch`, in order."""
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + epoch)
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        total = len(self) * self.num_replicas
        order += list(range(self.n, self.n + total - self.n)) if total > self.n else []
        return order[self.rank : total : self.num_replicas]

    def __iter__(self) -> Iterator[int]:
        return _BlockIterator(self)


class _BlockIterator:
    """A rank's index stream whose resume position is the epoch and the number of *global* samples consumed.

    StatefulDataLoader saves it with the checkpoint (rank 0's copy). Every rank takes the same
    number of indices per step, so global = local x world size; resuming under another world size
    W' starts each rank at global // W' of its own stride, i.e. at the same place of the epoch's
    permutation. Exact when the global batch (batch_size x W) is unchanged; see README, "Crash safety".
    """

    def __init__(self, sampler: BlockSampler):
        self.sampler, self.epoch, self.num_replicas, self.pos = sampler, sampler.epoch, sampler.num_replicas, 0
        self.indices = sampler.indices(self.epoch)
        pending = getattr(sampler, "resume_at", None)
        if pending is not None:  # a position saved under another num_workers (see _Loader.load_state_dict)
            # Kept until an index is taken: the loader builds its iterator twice (__init__, then _reset).
            self.load_state_dict(pending)

    def __iter__(self):
        return self

    def __next__(self) -> int:
        self.sampler.resume_at = None  # this iterator is the one in use: later epochs start at their start
        if self.pos >= len(self.indices):
            raise StopIteration
        self.pos += 1
        return self.indices[self.pos - 1]

    def state_dict(self) -> dict:
        return {"global_samples": self.pos * self.num_replicas, "epoch": self.epoch}

    def load_state_dict(self, state: dict) -> None:
        # Lightning restores the loader and creates this iterator (FitLoop.setup_data) before it calls
        # set_epoch (on_advance_start), so it was built with the sampler's epoch 0: rebuild it with the
        # checkpoint's epoch, or a resume in epoch >= 1 replays epoch 0's order. (No "epoch" in the
        # state: a checkpoint from before it was saved; nothing better to go on than the sampler's.)
        epoch = int(state.get("epoch", self.epoch))
        if epoch != self.epoch:
            self.sampler.set_epoch(epoch)
            self.epoch, self.indices = epoch, self.sampler.indices(epoch)
        consumed = int(state["global_samples"])
        if consumed % self.num_replicas:
            log.warning("resume: %d global samples consumed do not divide by %d processes; starting at sample %d",
                        consumed, self.num_replicas, consumed // self.num_replicas * self.num_replicas)
        self.pos = consumed // self.num_replicas
        # For start_the_epoch_a_resume_is_in (workers read ahead of it); False: a position without its epoch.
        self.sampler.restored = (self.epoch, self.pos) if "epoch" in state else False


def _loader_class():
    """torchdata's StatefulDataLoader, whose state also loads under another `data.num_workers`.

    Its state has one shape without workers and another with them, and it refuses the other shape (an
    AssertionError on `_snapshot`): a resume on other nodes with another num_workers failed. The
    dataset holds no state and the position is the BlockSampler's (epoch, global samples), so from a
    state of the other shape only that is taken: the next epoch iterator starts there."""
    from torchdata.stateful_dataloader import StatefulDataLoader

    class _Loader(StatefulDataLoader):
        def load_state_dict(self, state: dict) -> None:
            snapshot = state.get("_snapshot")
            saved_workers = snapshot["_main_snapshot"]["_num_workers"] if snapshot else 0
            if saved_workers == self.num_workers or not isinstance(self.sampler, BlockSampler):
                return super().load_state_dict(state)
            if state.get("_iterator_finished"):
                return  # the saved epoch was done: a fresh iterator, as torchdata starts one
            main = snapshot["_main_snapshot"] if snapshot else state
            position = dict((main.get("_sampler_iter_state") or {}).get("sampler_iter_state") or {})
            if snapshot and state.get("_steps_since_snapshot"):  # batches yielded after the snapshot's position
                position["global_samples"] += state["_steps_since_snapshot"] * self.batch_size * self.sampler.num_replicas
            if position:
                log.info("resume: the loader position was saved with %d worker(s), now %d: going on from sample %d of "
                         "epoch %d", saved_workers, self.num_workers, position["global_samples"], position.get("epoch", 0))
                self.sampler.resume_at = position

    return _Loader


def start_the_epoch_a_resume_is_in(trainer: pl.Trainer) -> None:
    """At train start of a resumed fit: the train iterator is the epoch the run goes on with.

    Lightning builds the iterator before it sets the sampler's epoch, and on a resume starts no new
    one, so three resumes trained the wrong data:
    - Restarted at the end of a training batch that ended an epoch (a SIGTERM or SLURM requeue save
      there, no validation): it moves to the next epoch but keeps the finished position, so that
      epoch had no batches (max_steps: the one after it trained instead); with limit_train_batches,
      it got the rest of the previous one.
    - Resumed from fit's end where max_steps ended an epoch (a finished run extended): it counts that
      epoch twice and keeps its batch counts, ending the next epoch after one batch. Ended inside an
      epoch, it counts that epoch done: the rest of it trains as the next one.
    - No loader position restored in epoch >= 1 (max_epochs runs save at on_train_epoch_end, where
      Lightning restores none): epoch 0's order.
    The loader position is the record of what was trained: its epoch is done when no whole
    micro-batch of the run's epoch length is left, and the next one starts at its first block."""
    fit = trainer.fit_loop
    loader = fit._combined_loader.flattened[0] if fit._combined_loader else None
    sampler = getattr(loader, "sampler", None)
    if not isinstance(sampler, BlockSampler) or not fit.is_resuming:
        return
    restored, sampler.restored = getattr(sampler, "restored", None), None
    if restored is False:
        return  # a checkpoint from before the epoch was stored with the position: as README says
    if restored is None:
        if sampler.epoch != trainer.current_epoch:
            sampler.set_epoch(trainer.current_epoch)
            sampler.resume_at = None  # a stored position is the finished epoch's: not re-applied below
            iter(fit._data_fetcher)  # the epoch it resumes in, from its first block
        return
    epoch, pos = restored
    if pos // loader.batch_size < trainer.num_training_batches:
        # Mid-epoch, Lightning continues it where it stopped. But fit's end-of-epoch save after max_steps
        # ended the fit inside the epoch counts that epoch done: a longer max_steps (a finished run
        # extended) trained the rest of it as the next epoch, then the one after's order (that epoch's
        # never), and max_epochs stopped an epoch short. The epoch is counted as the one going on.
        if trainer.current_epoch == epoch + 1 and not fit.epoch_loop.restarted_on_train_batch_end:
            progress = fit.epoch_progress
            for counts in (progress.current, progress.total):
                counts.ready = counts.started = counts.processed = counts.completed = epoch
        # Lightning counts the epoch's batches done in the checkpoint's batch size and ends the epoch at this
        # run's batch count: a larger global batch (data.batch_size, or more processes) ended it early,
        # dropping k x (b' - b) samples k batches in (doubled half-way: the whole second half). Counted again
        # in this loader's batches (drop_last: whole batches from the position on).
        left = len(sampler) - pos
        done = len(sampler) // loader.batch_size - left // loader.batch_size
        batches = fit.epoch_loop.batch_progress.current
        if done != batches.processed:
            shift = done - batches.processed
            batches.ready, batches.started = batches.ready + shift, batches.started + shift
            batches.processed, batches.completed = batches.processed + shift, batches.completed + shift
        return
    if trainer.current_epoch == epoch:
        # At the epoch's end with its epoch not yet counted done (saved after validation there), Lightning
        # ends the epoch and starts the next itself.
        return
    if not fit.epoch_loop.restarted_on_train_batch_end:
        # Resumed from fit's end: the finished epoch counted once, and the new epoch's batch counts as
        # at any epoch's start. (Restarted at a batch's end, Lightning counted the epoch done, and its
        # epoch loop's reset, which runs after this, starts the new epoch's counts.)
        progress = fit.epoch_progress
        for counts in (progress.current, progress.total):
            counts.ready = counts.started = counts.processed = counts.completed = epoch + 1
        loop = fit.epoch_loop
        loop.batch_progress.reset_on_run()
        loop.scheduler_progress.reset_on_run()
        loop.automatic_optimization.optim_progress.reset_on_run()
        loop.val_loop.batch_progress.total.reset()
    fit._last_train_dl_reload_epoch = epoch + 1  # reload_dataloaders_every_n_epochs: this loader is epoch + 1's
    sampler.set_epoch(epoch + 1)
    # The finished position, still pending when the loader's worker count changed (stored for the next
    # iterator, and cleared only once one takes a block: with 0 workers none had). The new iterator re-applied
    # it: epoch E again at its end, so epoch E + 1 got no batches (skipped; under max_epochs, not trained).
    sampler.resume_at = None
    iter(fit._data_fetcher)  # a new iterator: epoch + 1 from its first block


# ----------------------------------------------------------------------------- the DataModule


def _splits_overlap(a: str, b: str) -> bool:
    """Whether two `datasets` split specs (`train`, `train[:1%]`, `train[1%:]`, `train[:500]`) can share rows:
    the same split, one of them whole, or slices in one unit (percent, or rows) whose ranges meet. Others
    (percent against rows, negative indices, `+`): only the same spec counts, since split sizes are not
    known here."""
    def parse(spec: str):
        m = re.fullmatch(r"\s*([\w.-]+)\s*(?:\[\s*(-?\d*)\s*(%?)\s*:\s*(-?\d*)\s*(%?)\s*\])?\s*", spec)
        if not m:
            return None
        base, lo, lo_pct, hi, hi_pct = m.groups()
        if lo is None or not (lo or hi):  # no slice, or [:]: all of it
            return base, "all", 0.0, math.inf
        units = {pct for bound, pct in ((lo, lo_pct), (hi, hi_pct)) if bound}
        if lo.startswith("-") or hi.startswith("-") or len(units) > 1:
            return base, None, None, None  # negative indices, or [10:50%]: ranges unknown
        unit = units.pop() or "rows"
        return base, unit, float(lo or 0), float(hi) if hi else (100.0 if unit == "%" else math.inf)

    if a.strip() == b.strip():
        return True
    pa, pb = parse(a), parse(b)
    if pa is None or pb is None or pa[0] != pb[0]:
        return False
    if "all" in (pa[1], pb[1]):
        return True  # a whole split holds any slice of it
    if pa[1] is None or pb[1] is None or pa[1] != pb[1]:
        return False
    return pa[2] < pb[3] and pb[2] < pa[3]


class TokenBlockDataModule(pl.LightningDataModule):
    """Tokenizes and packs a corpus into fixed-size blocks, cached on disk, with resumable loaders."""

    def __init__(
        self,
        train_files: list[str] | None = None,
        val_files: list[str] | None = None,
        test_files: list[str] | None = None,
        dataset_name: str | None = None,
        dataset_config: str | None = None,
        dataset_revision: str | None = None,
        split: str = "train",
        val_split: str | None = None,
        test_split: str | None = None,
        text_field: str = "text",
        text_unit: Literal["file", "paragraph"] = "file",
        dataset_rows: Literal["documents", "lines"] = "documents",
        literal_eos: Literal["boundary", "text"] = "boundary",
        val_fraction: float = 0.05,
        tokenizer: str = "gpt2",
        train_tokenizer_vocab_size: int | None = None,
        block_size: int = 1024,
        batch_size: int = 8,
        num_workers: int = 2,
        shuffle: bool = True,
        seed: int = 1234,
        cache_dir: str = "~/.cache/gpt2dist",
        on_bad_file: Literal["error", "skip"] = "error",
        predict_prompts: list[str] | None = None,
        predict_file: str | None = None,
        predict_text_field: str = "prompt",
        predict_batch_size: int = 8,
        eval_stride: int | None = None,
    ):
        """
        Args:
            train_files: Training files or globs (.txt .md .py .rst .jsonl .json .parquet .csv); `{stdlib}` = Python's stdlib folder.
            val_files: Validation files or globs; if unset, `val_fraction` of the training documents is held out.
            test_files: Test files or globs for `gpt2dist test` (packed in a cache of their own); if unset, it evaluates the validation split.
            dataset_name: A Hugging Face dataset id (needs the network) or local folder (data files, or `save_to_disk` output), used instead of `train_files`.
            dataset_config: The dataset's configuration name (e.g. `wikitext-103-raw-v1`).
            dataset_revision: Hub dataset revision (commit sha, tag or branch) to load; part of the block cache key. Unset: the default branch, cached by name.
            split: The dataset split to train on.
            val_split: The dataset split to validate on; if unset, `val_fraction` of `split` is held out.
            test_split: The dataset split for `gpt2dist test` (e.g. `test`); if unset, it evaluates the validation split.
            text_field: The JSON key or table column holding each document's text.
            text_unit: For plain-text files: one document per `file`, or per blank-line separated `paragraph`.
            dataset_rows: For data.dataset_name: each row is one of the `documents` (EOS after it), or `lines` of one running text, joined with no EOS (WikiText, whose rows are headings and paragraphs).
            literal_eos: A literal "<|endoftext|>" in a document: `boundary` (read as EOS, as run_clm.py does; TinyStories' .txt joins stories with it) or `text` (its characters: code or text about GPT).
            val_fraction: Fraction of documents held out for validation when no validation source is given.
            tokenizer: Hub id or local folder of a Hugging Face tokenizer (ignored when training one).
            train_tokenizer_vocab_size: If set, train a byte-level BPE of this size on the training corpus instead.
            block_size: Tokens per training sequence (at most the model's n_positions).
            batch_size: Sequences per device per micro-batch.
            num_workers: DataLoader worker processes per rank.
            shuffle: Shuffle training blocks each epoch (seeded, identical on every rank).
            seed: Seed for the shuffle order and the validation hold-out.
            cache_dir: Where tokenized blocks (and trained tokenizers) are cached.
            on_bad_file: A binary or non-UTF-8 file: `error` names it and stops; `skip` warns and leaves it out.
            predict_prompts: Prompts for `gpt2dist predict` (the model continues each one).
            predict_file: A file (or a glob: its files in name order) of prompts for `gpt2dist predict` instead: .txt one per line, or .jsonl/.json/.csv/.parquet records (`predict_text_field`).
            predict_text_field: The JSON key or table column holding each prompt in `predict_file`.
            predict_batch_size: Prompts per `generate` call per device (left-padded; similar lengths are batched together).
            eval_stride: Validate/test on overlapping windows this many tokens apart, each scoring only its new tokens (more context per token, block_size/stride x the compute); None: disjoint blocks.
        """
        super().__init__()
        self.save_hyperparameters()
        if train_files and dataset_name:
            raise DataError("set either data.train_files or data.dataset_name, not both")
        for files, knob in ((val_files, "val_files"), (test_files, "test_files")):
            if files and dataset_name:
                raise DataError(f"data.{knob} goes with data.train_files, not data.dataset_name; "
                                f"use data.{knob.replace('files', 'split')} to name the data set's split")
        for name, knob in ((val_split, "val_split"), (test_split, "test_split")):
            if name and not dataset_name:
                raise DataError(f"data.{knob} names a split of data.dataset_name, which is unset; "
                                f"use data.{knob.replace('split', 'files')} with data.train_files")
            if name and _splits_overlap(name, split):  # evaluating on trained text reads as a better model than it is
                raise DataError(f"data.{knob}={name!r} is {'the training split' if name == split else 'part of the training split'}"
                                f" (data.split={split!r}); name a held-out split (e.g. split 'train[1%:]' and "
                                f"{knob} 'train[:1%]'), or unset data.{knob}")
        if test_split and val_split and _splits_overlap(test_split, val_split):
            # the split that picked the best checkpoint reads better than it is
            how = "is also" if test_split.strip() == val_split.strip() else "shares rows with"
            raise DataError(f"data.test_split={test_split!r} {how} data.val_split{'' if how == 'is also' else f'={val_split!r}'}; "
                            "name another split for the test, or unset data.test_split")
        if dataset_rows != "documents" and not dataset_name:
            raise DataError(f"data.dataset_rows={dataset_rows!r} goes with data.dataset_name; set data.dataset_rows="
                            "documents with data.train_files (data.text_unit picks what a document is)")
        if not 0.0 <= val_fraction < 1.0:
            raise DataError(f"data.val_fraction={val_fraction} must be in [0, 1)")
        if block_size < 2:
            raise DataError(f"data.block_size={block_size} must be at least 2")
        if predict_prompts and predict_file:
            raise DataError("set either data.predict_prompts or data.predict_file, not both; "
                            "unset one (e.g. --data.predict_prompts null)")
        if eval_stride is not None and not 1 <= eval_stride <= block_size:
            raise DataError(f"data.eval_stride={eval_stride} must be in [1, data.block_size={block_size}] (tokens between "
                            f"evaluation windows; e.g. {block_size // 2}); unset it for disjoint blocks")
        if predict_batch_size < 1:
            raise DataError(f"data.predict_batch_size={predict_batch_size} must be at least 1")
        if batch_size < 1:
            raise DataError(f"data.batch_size={batch_size} must be at least 1 (sequences per device per micro-batch)")
        self.train_files, self.val_files, self.test_files = train_files or [], val_files or [], test_files or []
        self.dataset_name, self.dataset_config, self.split, self.val_split = dataset_name, dataset_config, split, val_split
        self.test_split = test_split
        self.dataset_revision = dataset_revision
        self.text_field, self.text_unit, self.val_fraction = text_field, text_unit, val_fraction
        self.dataset_rows = dataset_rows
        self.literal_eos = literal_eos
        self.tokenizer_name, self.train_tokenizer_vocab_size = tokenizer, train_tokenizer_vocab_size
        self.block_size, self.batch_size, self.num_workers = block_size, batch_size, num_workers
        self.shuffle, self.seed, self.on_bad_file = shuffle, seed, on_bad_file
        self.cache_dir = Path(expand_pattern(cache_dir))
        self.predict_prompts = predict_prompts or []
        self.predict_file, self.predict_text_field, self.predict_batch_size = predict_file, predict_text_field, predict_batch_size
        self.eval_stride = eval_stride
        self.tokenizer = None
        self.train_set: TokenBlocks | None = None
        self.val_set: TokenBlocks | None = None
        self.test_set: TokenBlocks | None = None  # only with data.test_files / data.test_split
        self.stats: dict = {}
        self._skipped: set[str] = set()  # bad files already warned about
        self._distinct_texts: int | None = None  # of the documents val_fraction holds out from (_val_keys)
        self._splits: dict | None = None  # data.dataset_name's splits, loaded once (_dataset_splits)

    # --- sources -------------------------------------------------------------

    def _sources(self) -> dict[str, list[Path]]:
        if self.dataset_name:
            return {}
        out = {"train": resolve_files(self.train_files, "data.train_files")}
        for split, files in (("val", self.val_files), ("test", self.test_files)):
            if files:
                out[split] = resolve_files(files, f"data.{split}_files")
        # A cache_dir inside the corpus (data/cache with data/**/*.json): its own meta.json and trained
        # tokenizer.json would join the corpus on the next run.
        cache = os.path.realpath(self.cache_dir) + os.sep
        for split, files in out.items():
            ours = [p for p in files if os.path.realpath(p).startswith(cache)]
            if ours:
                if len(ours) == len(files):
                    raise DataError(f"data.{split}_files match only files in data.cache_dir={str(self.cache_dir)!r}; "
                                    "point them at the corpus, or move data.cache_dir out of it")
                if str(ours[0]) not in self._skipped:  # once, not per pass over the sources
                    self._skipped.add(str(ours[0]))
                    log.warning("data.%s_files: leaving out %d file(s) in data.cache_dir (e.g. %s): the cache is not corpus",
                                split, len(ours), ours[0])
                out[split] = [p for p in files if p not in ours]
        # By identity: `c/d0.txt`, `/abs/c/d0.txt` and a hard link to it (`cp -al`, DVC's cache) are one file.
        real = {split: {file_identity(p): p for p in files} for split, files in out.items()}
        for split, other, fix in (("val", "train", "take them out of data.train_files (its globs match them)"),
                                  ("test", "train", "take them out of data.train_files (its globs match them)"),
                                  ("test", "val", "a test split scored on the text that picked the best checkpoint "
                                                  "reads better than it is; give data.test_files other files")):
            shared = sorted(real.get(split, {}).keys() & real.get(other, {}).keys())
            if shared:  # evaluating on text the model trained on reads as a better model than it is
                raise DataError(f"data.{split}_files and data.{other}_files share {len(shared)} file(s), e.g. "
                                f"{real[split][shared[0]]}; {fix}")
        return out

    def _documents(self, files: list[Path]) -> Iterator[tuple[str, str]]:
        """(doc_key, text) for every non-empty document; bad files per `on_bad_file`.

        Keys are paths relative to the files' common folder, so the validation hold-out is the same
        wherever the corpus lies (another machine, another checkout)."""
        # Absolute: commonpath refuses a mix of relative and absolute paths.
        base = os.path.commonpath([os.path.abspath(p.parent) for p in files]) if files else ""
        for path in files:
            key = os.path.relpath(os.path.abspath(path), base)
            try:
                for i, doc in enumerate(read_documents(path, self.text_field, self.text_unit)):
                    if doc.strip():
                        yield f"{key}#{i}", doc
            except BadFileError as e:
                if self.on_bad_file != "skip":
                    raise
                # Once per file: the documents are read in two passes (validation hold-out, then packing).
                if e.problem not in self._skipped:
                    self._skipped.add(e.problem)
                    log.warning("skipping %s (data.on_bad_file=skip)", e.problem)

    LINES_CHUNK = 65_536  # characters of joined rows per document under dataset_rows=lines (~16k GPT-2 tokens)

    def _hf_documents(self, knob: str) -> Iterator[tuple[str, str]]:
        """(key, text) of the rows `data.<knob>` (split, val_split or test_split) names, as `datasets` reads
        the spec (`train[:1%]`, `train[1000:]`, `train+validation`), in order. Under dataset_rows=lines, runs
        of rows joined into ~LINES_CHUNK-character documents (whole rows, each ending in a newline)."""
        spec = getattr(self, knob)
        ds = self._split_rows(knob)
        key = f"{self.dataset_name}/{spec}#"
        rows = (t for batch in ds.select_columns([self.text_field]).iter(batch_size=4096) for t in batch[self.text_field])
        if self.dataset_rows == "documents":
            for i, text in enumerate(rows):
                if text and text.strip():
                    yield f"{key}{i}", text
            return
        chunk, size, n = [], 0, 0
        for i, text in enumerate(rows):
            text = text or ""
            chunk.append(text if text.endswith("\n") else text + "\n")  # "" is a blank line of the text
            size += len(chunk[-1])
            last = i == len(ds) - 1
            if size >= self.LINES_CHUNK or last:
                joined = "".join(chunk)
                if joined.strip():
                    yield f"{key}{n}", joined
                chunk, size, n = [], 0, n + 1

    def _dataset_splits(self) -> tuple[dict, bool]:
        """({split name: Dataset} of data.dataset_name, whether it is a saved single Dataset, whose rows are
        split `train`), loaded once. All splits: their sizes resolve the specs (_split_ranges)."""
        if self._splits is not None:
            return self._splits
        import datasets  # lazy: only users of hub data sets need it

        local = self._local_dataset_dir()
        if local is not None and ((local / "state.json").is_file() or (local / "dataset_dict.json").is_file()):
            try:  # load_dataset refuses save_to_disk folders
                ds = datasets.load_from_disk(str(local))
            except Exception as e:
                raise DataError(f"cannot load the saved data set {str(local)!r} ({type(e).__name__}: "
                                f"{str(e).splitlines()[0][:160]}); save it again with save_to_disk") from None
            single = not isinstance(ds, datasets.DatasetDict)
            self._splits = ({"train": ds} if single else dict(ds)), single
            return self._splits
        # A local folder has no revisions; a hub id loads the pinned one (None: default branch).
        revision = self.dataset_revision if local is None else None
        try:
            # The expanded path for a folder (`~/data`, `$DATA/wiki`): the raw name read as a hub id.
            ds = datasets.load_dataset(str(local) if local is not None else self.dataset_name, self.dataset_config,
                                       revision=revision)
        except Exception as e:
            raise DataError(
                f"cannot load dataset {self.dataset_name!r} (config {self.dataset_config!r}"
                f"{f', revision {revision!r}' if revision else ''}): {type(e).__name__}: {str(e).splitlines()[0][:160]}; "
                "check the name/revision/network or use data.train_files"
            ) from None
        self._splits = dict(ds), False
        return self._splits

    def _split_ranges(self, knob: str) -> list[tuple[str, int, int]]:
        """data.<knob>'s rows as (split, first row, end row) ranges, resolved against the splits' sizes as
        `load_dataset(split=...)` does (percent rounding included)."""
        import datasets

        spec = getattr(self, knob)
        splits, single = self._dataset_splits()
        if spec in splits:  # a split's own name, whatever it looks like (a saved DatasetDict's "my-split")
            return [(spec, 0, len(splits[spec]))]
        try:
            instruction = datasets.ReadInstruction.from_spec(spec)
        except (ValueError, AssertionError) as e:
            raise DataError(f"data.{knob}={spec!r} is not a split spec ({str(e).splitlines()[0][:120]}); write e.g. "
                            "'train', 'train[:1%]', 'train[1000:]' or 'train+validation'") from None
        try:
            return [(i.splitname, i.from_, i.to) for i in instruction.to_absolute({k: len(v) for k, v in splits.items()})]
        except (ValueError, AssertionError, KeyError):
            pass
        folder = str(self._local_dataset_dir() or self.dataset_name)
        if single:
            fix = {"val_split": "set data.val_split=null (data.val_fraction holds out documents), slice its rows "
                                "(e.g. data.split 'train[1%:]', data.val_split 'train[:1%]') or save a DatasetDict",
                   "test_split": "set data.test_split=null, slice its rows (e.g. 'train[:1%]', with data.split "
                                 "'train[1%:]') or save a DatasetDict"}.get(knob, "name its rows 'train' (e.g. 'train[:90%]')")
            raise DataError(f"saved data set {folder!r} is a single Dataset with no splits, so data.{knob}={spec!r} "
                            f"cannot be read from it (its rows are split 'train'); {fix}")
        raise DataError(f"data set {folder!r} has no split {spec!r} (has {sorted(splits)}); set data.{knob} to one of "
                        "them, or a slice of one (e.g. 'train[:1%]')")

    def _split_rows(self, knob: str):
        """The rows data.<knob> names, as one Dataset (a slice is a select: nothing is copied)."""
        import datasets

        splits, _ = self._dataset_splits()
        parts = [splits[name].select(range(lo, hi)) for name, lo, hi in self._split_ranges(knob)]
        ds = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
        if self.text_field not in ds.column_names:
            raise DataError(f"dataset {self.dataset_name!r} has no column {self.text_field!r} (has {ds.column_names}); set data.text_field")
        kind = getattr(ds.features[self.text_field], "dtype", type(ds.features[self.text_field]).__name__)
        if kind not in ("string", "large_string"):
            raise DataError(f"dataset {self.dataset_name!r} column {self.text_field!r} is {kind}, not text; "
                            "set data.text_field to the text column")
        return ds

    def _check_splits_apart(self) -> None:
        """No row of data.val_split / data.test_split is trained on, nor a test row validated on, with the
        split sizes known (the __init__ check cannot read `train+validation`, percent against rows, or
        negative indices: those let evaluation text be trained on)."""
        knobs = [k for k in ("split", "val_split", "test_split") if getattr(self, k)]
        ranges = {k: self._split_ranges(k) for k in knobs}
        for i, a in enumerate(knobs):
            for b in knobs[i + 1:]:
                for name, lo, hi in ranges[a]:
                    for other, lo2, hi2 in ranges[b]:
                        start, end = max(lo, lo2), min(hi, hi2)
                        if name == other and start < end:
                            raise DataError(
                                f"data.{b}={getattr(self, b)!r} shares rows {start}-{end - 1} of split {name!r} with "
                                f"data.{a}={getattr(self, a)!r} ({'evaluating on trained text' if a == 'split' else 'the split that picked the checkpoint'}"
                                f" reads better than it is); make them disjoint, e.g. split 'train[1%:]' and {b} 'train[:1%]'")

    def _split_streams(self) -> dict[str, Iterator[tuple[str, str]]]:
        """{'train': docs, 'val': docs}, holding out `val_fraction` of whole documents if needed."""
        if self.dataset_name:
            self._check_splits_apart()
            train = self._hf_documents("split")
            if self.val_split:
                return {"train": train, "val": self._hf_documents("val_split")}
        else:
            src = self._sources()
            train = self._documents(src["train"])
            if "val" in src:
                return {"train": train, "val": self._documents(src["val"])}
        return {"both": train}

    # --- cache keys ----------------------------------------------------------

    def _local_dataset_dir(self) -> Path | None:
        """`data.dataset_name` as a local folder (data files, or a `save_to_disk` data set); None for a hub id."""
        path = Path(expand_pattern(self.dataset_name)) if self.dataset_name else None
        return path if path is not None and path.is_dir() else None

    def _source_fingerprint(self) -> dict:
        if self.dataset_name:
            fp = {"dataset": [self.dataset_name, self.dataset_config, self.split, self.val_split]}
            local = self._local_dataset_dir()
            if local is None and self.dataset_revision:
                fp["revision"] = self.dataset_revision  # only when set: unpinned caches keep their keys
            if self.dataset_rows != "documents":
                fp["rows"] = self.dataset_rows  # other documents, no EOS between rows (default: keys as they were)
            if local is not None:
                # A local folder's content changes under the same name: key on its files, as for train_files
                # (the name alone reused the blocks of the folder's old content).
                fp["dataset_files"] = [[str(f.relative_to(local)), f.stat().st_size, f.stat().st_mtime_ns]
                                       for f in sorted(local.rglob("*")) if f.is_file()]
            return fp
        fp = {}
        for name, files in self._sources().items():
            if name != "test":  # packed on its own (_test_blocks_dir): adding one re-packs nothing else
                fp[name] = [[str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns] for p in files]
        return fp

    def _bad_file_key(self) -> dict:
        """Blocks packed with bad files skipped are not what `on_bad_file: error` asked for: another key, so
        that run reads the files again and stops at the bad one (error's keys stay as they were)."""
        return {"bad": "skip"} if self.on_bad_file == "skip" else {}

    def _hold_out_key(self) -> list | None:
        """What picks the held-out validation documents, when some are (val_fraction of the training source; not
        with data.val_files / data.val_split): a seed sweep over a given validation set re-tokenized the corpus."""
        held_out = not (self.val_files or self.val_split) and self.val_fraction > 0
        return [self.val_fraction, self.seed] if held_out else None

    def _reader_keys(self, splits: tuple[str, ...] = ("train", "val")) -> dict:
        """text_unit and text_field as far as they change what is read: the unit only for plain-text files, the
        field only for records (.jsonl/.json/.csv/.parquet) and data sets. A knob no file reads keys as its
        default (a .txt corpus re-tokenized when text_field changed), and caches keep their keys."""
        if self.dataset_name:
            return {"unit": "file", "field": self.text_field}
        suffixes = {p.suffix.lower() for name, files in self._sources().items() if name in splits for p in files}
        return {"unit": self.text_unit if suffixes & TEXT_SUFFIXES else "file",
                "field": self.text_field if suffixes - TEXT_SUFFIXES else "text"}

    def _key(self, payload: dict) -> str:
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:20]

    def _tokenizer_dir(self) -> Path:
        # The held-out documents (val_fraction, seed) are not trained on: another hold-out, another tokenizer.
        # Trained on the training documents only: a changed data.val_files retrained the same tokenizer.
        src = {k: v for k, v in self._source_fingerprint().items() if k != "val"}
        payload = {"src": src, **self._reader_keys(("train",)),
                   "vocab": self.train_tokenizer_vocab_size, "val": self._hold_out_key(), "v": CACHE_VERSION}
        return self.cache_dir / "tokenizers" / self._key(payload)

    def _load_or_train_tokenizer(self, train_if_missing: bool, missing_fix: str = "prepare_data did not run on this node"):
        tok = self._find_or_train_tokenizer(train_if_missing, missing_fix)
        # Prompts (predict, samples, the export's sample) are encoded as the documents were packed: under
        # literal_eos=text a quoted "<|endoftext|>" is its characters, not the document boundary the model
        # learned to start afresh after. (Packing sets the backend's own switch: encode_documents.)
        tok.split_special_tokens = self.literal_eos == "text"
        return tok

    def _find_or_train_tokenizer(self, train_if_missing: bool, missing_fix: str):
        if not self.train_tokenizer_vocab_size:
            return load_tokenizer(self.tokenizer_name)
        tok_dir = self._tokenizer_dir()
        if not (tok_dir / "tokenizer.json").exists():
            if not train_if_missing:
                raise DataError(f"trained tokenizer {tok_dir} is missing; {missing_fix}")
            log.info("training a %d-token byte-level BPE tokenizer on the training corpus", self.train_tokenizer_vocab_size)
            docs = (text for _, text in self._train_docs_for_tokenizer())
            train_bpe_tokenizer(docs, self.train_tokenizer_vocab_size, tok_dir)
        return load_tokenizer(str(tok_dir))

    def _val_keys(self) -> set[str]:
        """A first, cheap pass over the documents (no tokenizing) to pick the held-out ones.

        Chosen by the text, not the path: a path key is relative to the files' common folder, which
        a file added in a new folder moves, and then every document's rank (and the whole
        hold-out) changed, putting former validation text into training. Exact duplicates are one
        unit, so a copy of a validation document never lands in training."""
        units: dict[str, int] = {}  # text digest -> characters (all copies)
        digest_of: dict[str, str] = {}
        for key, text in self._split_streams()["both"]:
            digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()
            units[digest] = units.get(digest, 0) + len(text)
            digest_of[key] = digest
        chosen = choose_val_docs(units, self.val_fraction, self.seed)
        self._distinct_texts = len(units)  # for the too-small message: copies of one text are one unit
        return {key for key, digest in digest_of.items() if digest in chosen}

    def _train_docs_for_tokenizer(self) -> Iterator[tuple[str, str]]:
        streams = self._split_streams()
        if "both" in streams:
            # Train the tokenizer on training documents only, so validation stays unseen.
            val = self._val_keys()
            return ((k, t) for k, t in streams["both"] if k not in val)
        return streams["train"]

    def _blocks_dir(self) -> Path:
        payload = {"src": self._source_fingerprint(), "tok": tokenizer_fingerprint(self.tokenizer),
                   # tokenizer_config.json's pick: not in tokenizer.json's hash
                   "eos": self.tokenizer.eos_token_id, "literal_eos": self.literal_eos,
                   "block": self.block_size, **self._reader_keys(),
                   "val": self._hold_out_key(), "v": CACHE_VERSION, **self._bad_file_key()}
        return self.cache_dir / "blocks" / self._key(payload)

    def _test_blocks_dir(self) -> Path | None:
        """The test split's own cache (None without one): keyed by its source, not the training data's."""
        if self.dataset_name and self.test_split:
            src = {"dataset": [self.dataset_name, self.dataset_config, self.test_split], **{
                k: v for k, v in self._source_fingerprint().items() if k != "dataset"}}  # revision / local files
        elif self.test_files:
            src = {"test": [[str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns] for p in self._sources()["test"]]}
        else:
            return None
        payload = {"test_src": src, "tok": tokenizer_fingerprint(self.tokenizer), "eos": self.tokenizer.eos_token_id,
                   "literal_eos": self.literal_eos,
                   "block": self.block_size,
                   **self._reader_keys(("test",)), "v": CACHE_VERSION, **self._bad_file_key()}
        return self.cache_dir / "blocks" / self._key(payload)

    @property
    def vocab_size(self) -> int:
        """Number of token ids the tokenizer can emit (the model's vocabulary must cover it)."""
        if self.tokenizer is None:
            raise RuntimeError("the tokenizer is loaded in prepare_data/setup")
        return len(self.tokenizer)

    # --- Lightning hooks -----------------------------------------------------

    def _check_cache_dir(self) -> None:
        """data.cache_dir must be a folder we can write in: checked before any tokenizing."""
        try:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            tempfile.TemporaryFile(dir=self.cache_dir).close()
        except OSError as e:
            raise DataError(f"data.cache_dir={str(self.cache_dir)!r} is not a writable folder "
                            f"({e.strerror or type(e).__name__}); set data.cache_dir to a folder you can write to") from None

    def check_training_source(self) -> None:
        """fit / validate / test (and prepare) pack the training data; `predict` needs only the tokenizer."""
        if not self.train_files and not self.dataset_name:
            raise DataError("no training data: set data.train_files (paths or globs) or data.dataset_name")
        local = self._local_dataset_dir()
        if local is not None and Path(os.path.realpath(self.cache_dir)).is_relative_to(os.path.realpath(local)):
            # Its files key the cache (the packed blocks would change the key they are stored under), and
            # load_dataset reads a folder's every data file: the cache's val.bin became a "validation" split.
            raise DataError(f"data.cache_dir={str(self.cache_dir)!r} is inside the data set folder "
                            f"data.dataset_name={self.dataset_name!r}, which is read whole; move data.cache_dir out of it")

    def _predicting(self) -> bool:
        return self.trainer is not None and self.trainer.state.fn == TrainerFn.PREDICTING

    def _predict_tokenizer(self):
        """`predict`'s tokenizer, without packing anything: data.tokenizer, or the one trained for this data
        section at fit (its cache key is the training corpus's)."""
        if self.train_tokenizer_vocab_size:
            self.check_training_source()
        return self._load_or_train_tokenizer(train_if_missing=False, missing_fix=(
            "predict with the data section of the fit, where its data.cache_dir is, or set data.tokenizer to the "
            "run's exported hf_model folder"))

    def load_tokenizer(self):
        """The tokenizer: loaded, or trained once and cached (train_tokenizer_vocab_size). Checks cache_dir first."""
        self._check_cache_dir()
        self.tokenizer = self._load_or_train_tokenizer(train_if_missing=True)
        return self.tokenizer

    def is_prepared(self) -> bool:
        """The packed blocks of this data section (and of its test split) are in the cache (after `load_tokenizer`)."""
        return all((out / "meta.json").exists() for out in (self._blocks_dir(), self._test_blocks_dir()) if out)

    def prepare_data(self) -> None:
        """Tokenize + pack once per node (local rank 0) into the on-disk cache: train/val, then test if given.
        `predict` packs nothing: it loads the tokenizer only."""
        if self._predicting():
            self.tokenizer = self._predict_tokenizer()
            return
        self.check_training_source()
        try:
            self.load_tokenizer()
            self._write_cache(self._blocks_dir(), self._pack_into)
            if self._test_blocks_dir() is not None:
                self._write_cache(self._test_blocks_dir(), self._pack_test)
        finally:
            self._splits = None  # the loaded data set: not kept (nor pickled with the module) once packed

    def _write_cache(self, out: Path, pack) -> None:
        """`pack(tmp) -> meta` into a temporary folder, renamed to `out` once complete."""
        if (out / "meta.json").exists():
            log.info("using cached blocks %s", out)
            return
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=out.name + ".tmp-", dir=out.parent))
        try:
            meta = pack(tmp)
            (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
            from gpt2dist.export import apply_umask

            apply_umask(tmp)  # a shared cache_dir: other users' runs read these blocks
            try:
                os.replace(tmp, out)  # atomic: a crash never leaves a half-written cache
            except OSError:
                if (out / "meta.json").exists():  # a concurrent writer's finished cache
                    pass
                elif out.is_dir():  # e.g. a temp-file cleaner took meta.json: never filled in by us
                    raise DataError(f"the block cache {out} is incomplete (no meta.json); delete that folder and "
                                    "run again") from None
                else:
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _feed(self, docs_iter, route, writers: dict) -> None:
        """Tokenize (key, text) documents in ~4 MB batches into writers[route(key)]."""
        batch_chars = 4_000_000  # big enough for the Rust tokenizer's parallelism
        eos = not (self.dataset_name and self.dataset_rows == "lines")  # joined rows: one running text
        pending: dict[str, list[str]] = {s: [] for s in writers}
        size = 0
        for key, text in docs_iter:
            pending[route(key)].append(text)
            size += len(text)
            if size >= batch_chars:
                for s, docs in pending.items():
                    writers[s].write(encode_documents(docs, self.tokenizer, writers[s].dtype, self.literal_eos, eos), len(docs))
                    docs.clear()
                size = 0
        for s, docs in pending.items():
            writers[s].write(encode_documents(docs, self.tokenizer, writers[s].dtype, self.literal_eos, eos), len(docs))

    def _meta(self, splits: dict, dtype: np.dtype) -> dict:
        return {**splits, "block_size": self.block_size, "dtype": dtype.name, "eos_token_id": self.tokenizer.eos_token_id,
                "vocab_size": len(self.tokenizer), "version": CACHE_VERSION}

    def _pack_into(self, tmp: Path) -> dict:
        dtype = token_dtype(len(self.tokenizer))
        writers = {s: _BlockWriter(tmp / f"{s}.bin", dtype) for s in ("train", "val")}
        streams = self._split_streams()
        if "both" in streams:
            val = self._val_keys()
            self._feed(streams["both"], lambda k: "val" if k in val else "train", writers)
        else:
            self._feed(streams["train"], lambda k: "train", writers)
            self._feed(streams["val"], lambda k: "val", writers)
        meta = self._meta({s: w.close(self.block_size) for s, w in writers.items()}, dtype)
        self._check_sizes(meta)
        return meta

    def _pack_test(self, tmp: Path) -> dict:
        dtype = token_dtype(len(self.tokenizer))
        writer = _BlockWriter(tmp / "test.bin", dtype)
        if self.dataset_name:
            self._check_splits_apart()
            docs, src = self._hf_documents("test_split"), f"data.test_split={self.test_split!r}"
        else:
            docs, src = self._documents(self._sources()["test"]), "data.test_files"
        self._feed(docs, lambda k: "test", {"test": writer})
        meta = self._meta({"test": writer.close(self.block_size)}, dtype)
        m = meta["test"]
        if m["blocks"] == 0:
            what = "no non-empty documents" if m["documents"] == 0 else f"{m['tokens']} tokens in {m['documents']} documents"
            raise DataError(f"test split too small: {what} in {src}, fewer than data.block_size={self.block_size}; "
                            f"add text to {src.split('=')[0]} or lower data.block_size")
        return meta

    def _check_sizes(self, meta: dict) -> None:
        src = self.dataset_name or ", ".join(self.train_files)
        if meta["train"]["documents"] == 0:
            knobs = "data.dataset_name / data.split / data.text_field" if self.dataset_name else "data.train_files / data.text_field"
            raise DataError(f"empty corpus: no non-empty documents in {src}; check {knobs}")
        if meta["train"]["blocks"] == 0:
            raise DataError(
                f"corpus too small: {meta['train']['tokens']} training tokens < data.block_size={self.block_size}; "
                "add text or lower data.block_size"
            )
        if meta["val"]["blocks"] == 0 and (self.val_files or self.val_split or self.val_fraction > 0):
            given = "data.val_files" if self.val_files else "data.val_split" if self.val_split else None
            own = "data.val_split" if self.dataset_name else "data.val_files"
            if given:
                fix = f"add text to {given} or lower data.block_size"
            elif meta["train"]["documents"] + meta["val"]["documents"] < 2 or self._distinct_texts == 1:
                # Whole documents are held out and one is always kept for training: with a single
                # document no val_fraction gives a validation split. Nor with copies of one text (a
                # corpus of one file's duplicates): copies are held out together, as one document.
                n = meta["train"]["documents"] + meta["val"]["documents"]
                what = "1 document" if n < 2 else f"{n} copies of one text (held out together, or not at all)"
                fix = f"the corpus is {what}, so data.val_fraction cannot hold one out: give {own}"
                if self.text_unit == "file" and any(p.suffix.lower() in TEXT_SUFFIXES for p in self._sources().get("train", [])):
                    fix = f"{fix}, split it with data.text_unit=paragraph"
                fix += ", or set data.val_fraction=0 (no validation)"
            else:
                fix = f"raise data.val_fraction, give {own}, or lower data.block_size"
            raise DataError(
                f"validation split too small: {meta['val']['tokens']} tokens in {meta['val']['documents']} documents "
                f"< data.block_size={self.block_size}; {fix}"
            )

    def setup(self, stage: str | None = None) -> None:
        if stage == "predict":
            self.tokenizer = self.tokenizer or self._predict_tokenizer()  # every rank (prepare_data: one per node)
            return
        self.check_training_source()
        if self.tokenizer is None or self.train_tokenizer_vocab_size:
            self.tokenizer = self._load_or_train_tokenizer(train_if_missing=False)
        out = self._blocks_dir()
        meta_path = out / "meta.json"
        if not meta_path.exists():
            raise DataError(f"token cache {out} is missing: prepare_data has not run (on a shared cache_dir, every node must see it)")
        self.stats = json.loads(meta_path.read_text())
        dtype = np.dtype(self.stats["dtype"])
        self.train_set = TokenBlocks(out / "train.bin", self.block_size, dtype)
        self.val_set = TokenBlocks(out / "val.bin", self.block_size, dtype)
        test = self._test_blocks_dir()
        if test is not None:
            if not (test / "meta.json").exists():
                raise DataError(f"token cache {test} (the test split) is missing: prepare_data has not run "
                                "(on a shared cache_dir, every node must see it)")
            self.stats["test"] = json.loads((test / "meta.json").read_text())["test"]
            self.test_set = TokenBlocks(test / "test.bin", self.block_size, dtype)
        log.info("blocks: train %d, val %d%s (block_size %d)", len(self.train_set), len(self.val_set),
                 f", test {len(self.test_set)}" if self.test_set is not None else "", self.block_size)

    # --- what a checkpoint records of the data -----------------------------------

    def _train_identity(self) -> dict:
        """The training blocks as a resume sees them: their counts, a digest of up to 64 blocks spread over
        the file (cheap on any corpus size; catches edited text of equal length too), and the shuffle."""
        blocks = self.train_set
        picks = sorted({i * (len(blocks) - 1) // 63 for i in range(64)}) if len(blocks) > 1 else range(len(blocks))
        digest = hashlib.blake2b(digest_size=8)
        for i in picks:
            digest.update(np.ascontiguousarray(blocks.blocks[i]).tobytes())
        st = self.stats["train"]
        return {"blocks": len(blocks), "tokens": st["tokens"], "documents": st["documents"], "block_size": self.block_size,
                "digest": digest.hexdigest(), "shuffle": self.shuffle, "seed": self.seed}

    def state_dict(self) -> dict:
        """Saved in every checkpoint (Lightning's datamodule state): which training data the loader's
        position (epoch, samples consumed) indexes, so a resume can tell when that is no longer true."""
        return {"train_data": self._train_identity()} if self.train_set is not None else {}

    def load_state_dict(self, state: dict) -> None:
        fitting = self.trainer is None or self.trainer.state.fn == TrainerFn.FITTING  # validate/test: no position to resume
        saved, now = state.get("train_data"), self._train_identity() if fitting and self.train_set is not None else None
        if not saved or now is None:
            return  # a checkpoint from before this was recorded, or nothing here trains
        changed = [f"{k} {saved[k]} -> {now.get(k)}" for k in saved if saved[k] != now.get(k)]
        if changed:
            # A warning, not an error: continuing on more or other data is a legitimate choice. It must
            # not pass for an exact resume, though: the restored position now points into other blocks.
            rank_zero_warn(f"resume: the training data is not the checkpoint's ({', '.join(changed)}): the run goes on "
                           "from its step, but its place in the epoch now indexes other blocks, so this is not an "
                           "exact resume; resume with the same data section and files for one")

    def describe(self) -> list[str]:
        """What the cache holds, after `setup`: one line per split (blocks, tokens, documents, dropped)."""
        out = [f"token cache {self._blocks_dir()}: block_size {self.block_size}, {self.stats['dtype']} ids, "
               f"tokenizer of {self.stats['vocab_size']:,} tokens"]
        for split in ("train", "val", "test"):
            if split not in self.stats:
                continue
            s = self.stats[split]
            out.append(f"  {split + ':':6} {s['blocks']:,} blocks = {s['blocks'] * self.block_size:,} tokens, from "
                       f"{s['documents']:,} documents ({s['tokens']:,} tokens with an EOS after each; the last "
                       f"{s['dropped_tokens']:,} fill no whole block)"
                       + (f"; cached in {self._test_blocks_dir()}" if split == "test" else ""))
        if self.eval_stride:
            sets = [(name, blocks) for name, blocks in (("val", self.val_set), ("test", self.test_set)) if blocks is not None]
            windows = ", ".join(f"{name} {len(StridedWindows(blocks, self.eval_stride)):,} windows ({len(blocks):,} blocks)"
                                for name, blocks in sets)
            out.append(f"  eval_stride {self.eval_stride}: {windows}; trainer.limit_val_batches counts batches of windows")
        return out

    def _world(self) -> tuple[int, int]:
        if self.trainer is None:
            return 1, 0
        return self.trainer.world_size, self.trainer.global_rank

    def _loader(self, dataset, sampler, drop_last: bool):
        pin = self.trainer is not None and self.trainer.strategy.root_device.type == "cuda"
        return _loader_class()(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            drop_last=drop_last,
            num_workers=self.num_workers,
            pin_memory=pin,
            persistent_workers=False,
        )

    def optimizer_steps_per_epoch(self, world: int, accumulate: int) -> int:
        """Optimizer steps in one epoch, as the loaders and Lightning count them: each of `world` ranks takes
        n // world blocks in whole micro-batches (the loader drops a partial one), and Lightning steps every
        `accumulate` micro-batches and at the epoch's last. Refuses data that cannot fill one micro-batch."""
        if len(self.train_set) // world < self.batch_size:
            raise DataError(
                f"{len(self.train_set)} training blocks cannot fill one step of {self.batch_size} x {world} ranks; "
                "lower data.batch_size or data.block_size, or add data"
            )
        return math.ceil(len(self.train_set) // world // self.batch_size / accumulate)

    def train_dataloader(self):
        if self.train_set is None and self._predicting():
            # Lightning's DeepSpeedStrategy sizes its config from this loader's batch size, in predict too,
            # for which nothing is packed: an empty loader of the configured micro-batch answers it.
            return torch.utils.data.DataLoader([], batch_size=self.batch_size)
        world, rank = self._world()
        self.optimizer_steps_per_epoch(world, 1)  # enough blocks for one micro-batch per rank
        sampler = BlockSampler(len(self.train_set), self.shuffle, self.seed, world, rank, pad=False)
        return self._loader(self.train_set, sampler, drop_last=True)

    def val_dataloader(self):
        if not len(self.val_set):
            if self.trainer is not None and self.trainer.state.fn == TrainerFn.VALIDATING:  # else `validate` ran 0 batches, rc 0
                raise DataError(self._nothing_to_evaluate("validate"))
            return []  # no validation source: `fit` skips validation
        return self._eval_loader(self.val_set)

    def _nothing_to_evaluate(self, what: str) -> str:
        own = "data.val_split" if self.dataset_name else "data.val_files"
        test = "data.test_split, " if self.dataset_name else "data.test_files, "
        return (f"gpt2dist {what}: no validation split to evaluate (data.val_fraction={self.val_fraction}, no {own}); "
                f"give {test if what == 'test' else ''}{own}, or set data.val_fraction > 0")

    def _eval_loader(self, blocks: TokenBlocks):
        data = StridedWindows(blocks, self.eval_stride) if self.eval_stride else blocks
        world, rank = self._world()
        return self._loader(data, BlockSampler(len(data), False, self.seed, world, rank, pad=True), False)

    def test_dataloader(self):
        if self.test_set is None:
            if not len(self.val_set):
                raise DataError(self._nothing_to_evaluate("test"))
            # No test source: `gpt2dist test` evaluates the held-out validation split; say so.
            rank_zero_info("gpt2dist test: evaluating on the validation split (data.val_files / data.val_fraction); "
                           "set data.test_files or data.test_split for a test split of its own")
            return self.val_dataloader()
        return self._eval_loader(self.test_set)

    def prompts_with_origin(self) -> list[tuple[str, str]]:
        """(where, prompt) for every `predict` prompt, in order: `data.predict_prompts[i]`, or the file and
        line (or record) of `data.predict_file`, so an error can name it."""
        if not self.predict_file:
            return [(f"data.predict_prompts[{i}]", p) for i, p in enumerate(self.predict_prompts)]
        if getattr(self, "_file_prompts", None) is None:
            found = []
            paths = resolve_files([self.predict_file], "data.predict_file")  # a glob: its files in name order
            for path in paths:
                try:
                    if path.suffix.lower() in TEXT_SUFFIXES:
                        # One prompt per line; blank lines separate nothing and are not prompts. Lines end at
                        # \n, \r\n or \r only: splitlines() also split at form feeds (source files hold them)
                        # and U+2028 (web text), which made one line two prompts.
                        lines = _LINE_END.split(_decode(path, path.read_bytes()))
                        found += [(f"{path}:{n}", line) for n, line in enumerate(lines, 1) if line.strip()]
                    else:
                        found += [(f"{path} record {n}", t) for n, t in enumerate(
                            read_documents(path, self.predict_text_field, knob="data.predict_text_field",
                                           skip_null=False), 1)]  # skipped, every later record's number and output row would shift
                except BadFileError as e:  # its advice (data.on_bad_file=skip) is for training files, not this one
                    raise DataError(f"data.predict_file {e.problem}; give UTF-8 text (one prompt per line) or JSON lines") from None
            if not found:
                where = paths[0] if len(paths) == 1 else f"{self.predict_file!r} ({len(paths)} files)"
                raise DataError(f"data.predict_file {where} holds no prompt; write one per line (.txt) or one record "
                                f"with a {self.predict_text_field!r} field each (.jsonl)")
            self._file_prompts = found
        return self._file_prompts

    def predict_dataloader(self):
        if not self.predict_prompts and not self.predict_file:
            raise DataError("gpt2dist predict needs prompts: set data.predict_prompts or data.predict_file")
        prompts = [p for _, p in self.prompts_with_origin()]
        world, rank = self._world()
        from gpt2dist.monitor import generation_mode

        if self.trainer is not None and generation_mode(self.trainer) != "rank0":
            # Sharded weights: each forward of `generate` gathers them collectively, so every rank runs every
            # prompt in the same order (other prompts or fewer of them hang or crash the gathers); rank 0 writes.
            world, rank = 1, 0
        # Longest first, so a batch holds similar lengths (little padding) and an out-of-memory comes at once.
        # Each prompt keeps its index: the writer puts rows back in prompt order. Shares are padded to equal
        # length (3 prompts, 2 ranks: rank 1 gets a "pad" item, not generated or written), so every rank runs
        # the same batches and per-batch collectives (a stop signal's agreement) pair up.
        lengths = [len(self.tokenizer(p, add_special_tokens=False).input_ids) for p in prompts]
        order = sorted(range(len(prompts)), key=lambda i: (-lengths[i], i))
        n = len(order)
        items = [{"index": order[i % n], "prompt": prompts[order[i % n]], **({"pad": True} if i >= n else {})}
                 for i in range(math.ceil(n / world) * world)]
        return torch.utils.data.DataLoader(items[rank::world], batch_size=self.predict_batch_size, collate_fn=list)
