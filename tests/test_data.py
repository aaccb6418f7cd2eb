"""gpt2dist/data.py: sources, packing token counts, the cache, samplers and loaders."""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from gpt2dist import data as data_mod
from gpt2dist.data import BlockSampler, TokenBlockDataModule, encode_documents
from gpt2dist.errors import DataError

from conftest import corpus_texts


def make_dm(tmp_path, tokenizer_dir, **kw) -> TokenBlockDataModule:
    kw.setdefault("block_size", 64)
    kw.setdefault("batch_size", 4)
    kw.setdefault("num_workers", 0)
    kw.setdefault("cache_dir", str(tmp_path / "cache"))
    return TokenBlockDataModule(tokenizer=str(tokenizer_dir), **kw)


def prepared(dm) -> TokenBlockDataModule:
    dm.prepare_data()
    dm.setup("fit")
    return dm


def test_packing_keeps_every_token_but_the_final_remainder(tmp_path, corpus_dir, tokenizer_dir, tokenizer):
    dm = prepared(make_dm(tmp_path, tokenizer_dir, train_files=[str(corpus_dir / "*.txt")], val_fraction=0.0))
    docs = [p.read_text() for p in sorted(corpus_dir.glob("*.txt"))]
    lengths = [len(tokenizer(d, add_special_tokens=False).input_ids) for d in docs]
    expected = sum(lengths) + len(docs)  # + one EOS after every document
    st = dm.stats["train"]
    assert st["documents"] == len(docs)
    assert st["tokens"] == expected
    assert st["dropped_tokens"] == expected % 64 < 64
    assert st["blocks"] * 64 == expected - expected % 64
    flat = np.asarray(dm.train_set.blocks).reshape(-1)
    # Exactly one EOS per document (the last document's EOS may sit in the dropped remainder).
    eos = int((flat == tokenizer.eos_token_id).sum())
    assert eos in (len(docs), len(docs) - 1)
    # The stream is the documents in order, each followed by EOS.
    stream = np.concatenate([np.append(tokenizer(d, add_special_tokens=False).input_ids, tokenizer.eos_token_id)
                             for d in docs])
    np.testing.assert_array_equal(flat, stream[: len(flat)])
    assert dm.train_set.blocks.dtype == np.uint16  # compact: 2 bytes per token


def test_run_clm_group_texts_would_drop_more(tokenizer):
    """The reference packing drops a remainder per 1000-row batch; ours only once."""
    docs = [t for t in corpus_texts() for _ in range(200)]  # 2400 rows -> 3 map batches
    ours = encode_documents(docs, tokenizer, np.dtype(np.uint16))
    block = 64
    ref_kept = 0
    for i in range(0, len(docs), 1000):  # run_clm.group_texts per map batch, no separator
        total = sum(len(tokenizer(d, add_special_tokens=False).input_ids) for d in docs[i:i + 1000])
        ref_kept += total // block * block
    assert len(ours) // block * block > ref_kept
    assert len(ours) - len(ours) // block * block < block


def test_a_pretty_printed_json_record_is_one_document_and_an_object_of_records_is_named(tmp_path):
    one = tmp_path / "one.json"
    one.write_text(json.dumps({"text": "a single record\nover two lines", "id": 7}, indent=2))
    assert list(data_mod.read_documents(one)) == ["a single record\nover two lines"]
    wrapped = tmp_path / "export.json"  # a common export shape: valid JSON, but not records
    wrapped.write_text(json.dumps({"data": [{"text": "x"}], "version": 1}, indent=2))
    with pytest.raises(DataError) as err:
        list(data_mod.read_documents(wrapped))
    assert str(err.value) == (f"{wrapped}: one JSON object with keys ['data', 'version'], not records; give a list of "
                              "records or JSON lines (one record per line), or set data.text_field to the text's key")
    # On one line, as json.dump writes it: read as JSON lines, it said "record has no field 'text'; set
    # data.text_field", which cannot help (the value is a list).
    wrapped.write_text(json.dumps({"data": [{"text": "x"}], "version": 1}))
    with pytest.raises(DataError, match=r"one JSON object with keys \['data', 'version'\], not records"):
        list(data_mod.read_documents(wrapped))
    lines = tmp_path / "lines.json"  # JSON lines in a .json file: still records, one per line
    lines.write_text('{"text": "a"}\n{"text": "b"}\n')
    assert list(data_mod.read_documents(lines)) == ["a", "b"]


@pytest.mark.parametrize("fmt", ["jsonl", "json", "parquet", "csv", "paragraph"])
def test_formats(tmp_path, tokenizer_dir, tokenizer, fmt):
    docs = ["first document, with a comma", "second one\nhas two lines", "third: \"quoted\""] * 40
    path = tmp_path / f"docs.{'txt' if fmt == 'paragraph' else fmt}"
    if fmt == "jsonl":
        path.write_text("\n".join(json.dumps({"text": d, "id": i}) for i, d in enumerate(docs)))
    elif fmt == "json":
        path.write_text(json.dumps([{"body": d} for d in docs]))
    elif fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"text": docs}), path)
    elif fmt == "csv":
        import pyarrow as pa
        import pyarrow.csv as pacsv

        pacsv.write_csv(pa.table({"text": docs}), path)
    else:
        path.write_text("\n\n".join(docs))
    kw = {"text_field": "body"} if fmt == "json" else {}
    if fmt == "paragraph":
        kw["text_unit"] = "paragraph"
    got = [d for d in data_mod.read_documents(path, kw.get("text_field", "text"), kw.get("text_unit", "file"))]
    assert got == docs
    dm = prepared(make_dm(tmp_path, tokenizer_dir, train_files=[str(path)], val_fraction=0.0, block_size=16, **kw))
    expected = sum(len(tokenizer(d, add_special_tokens=False).input_ids) + 1 for d in docs)
    assert dm.stats["train"]["tokens"] == expected


@pytest.mark.parametrize("fmt", ["jsonl", "json", "parquet"])
def test_a_null_text_is_no_document_in_every_format(tmp_path, fmt):
    # A missing text is no document, the same in JSON as in a Parquet column (JSON lines stopped the run).
    rows = ["first", None, "third", "   "]
    path = tmp_path / f"docs.{fmt}"
    if fmt == "jsonl":
        path.write_text("\n".join(json.dumps({"text": t}) for t in rows))
    elif fmt == "json":
        path.write_text(json.dumps([{"text": t} for t in rows]))
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"text": rows}), path)
    assert [d for d in data_mod.read_documents(path) if d.strip()] == ["first", "third"]


def test_val_fraction_holds_out_whole_documents_deterministically(tmp_path, tokenizer_dir):
    files = []
    for i in range(40):
        f = tmp_path / f"doc{i:02d}.txt"
        f.write_text(f"document number {i:02d} " * 30)  # equal sizes: 25% is exactly 10 documents
        files.append(f)
    a = prepared(make_dm(tmp_path, tokenizer_dir, train_files=[str(tmp_path / "doc*.txt")], val_fraction=0.25,
                         block_size=16, cache_dir=str(tmp_path / "c1")))
    b = prepared(make_dm(tmp_path, tokenizer_dir, train_files=[str(tmp_path / "doc*.txt")], val_fraction=0.25,
                         block_size=16, cache_dir=str(tmp_path / "c2")))
    assert a.stats == b.stats
    n_val = a.stats["val"]["documents"]
    assert 0 < n_val < 40 and a.stats["train"]["documents"] + n_val == 40
    # Whole documents: ~25% of the text, all of equal size here.
    assert n_val == 10


def test_one_large_document_never_becomes_the_validation_split():
    """5% asked, one document 90% of the text: it was held out whenever it ranked before the target was
    reached (about 1 seed in 2 here), leaving training a tenth of the corpus."""
    sizes = {"big": 9000, **{f"small{i}": 100 for i in range(10)}}
    for seed in range(200):
        val = data_mod.choose_val_docs(sizes, 0.05, seed)
        assert "big" not in val and 0 < sum(sizes[k] for k in val) <= 2 * 0.05 * 10000, (seed, val)
    # Every document alone is over twice the target: the smallest is held out, one is kept for training.
    assert data_mod.choose_val_docs({"a": 500, "b": 300, "c": 900}, 0.01, 0) == {"b"}
    assert data_mod.choose_val_docs({"a": 1, "b": 1}, 0.9, 0) in ({"a"}, {"b"})


def test_val_hold_out_follows_the_text_not_the_folder_layout(tmp_path, tokenizer_dir):
    """A file added in a new folder widens the files' common folder, which changed every path key and
    so the whole hold-out (former validation text went into training). The hold-out now ranks the
    text: the same documents stay out, and an exact copy of one sits on the same side."""
    a = tmp_path / "corpus" / "a"
    a.mkdir(parents=True)
    for i in range(40):
        (a / f"doc{i:02d}.txt").write_text(f"document number {i:02d} " * 30)
    held = lambda dm: {k.split("#")[0].rsplit("/", 1)[-1] for k in dm._val_keys()}
    before = held(make_dm(tmp_path, tokenizer_dir, train_files=[str(a / "*.txt")], val_fraction=0.25))
    assert len(before) == 10
    b = tmp_path / "corpus" / "b"
    b.mkdir()
    (b / "extra.txt").write_text("another short document " * 2)
    copied = sorted(before)[0]
    (b / "copy.txt").write_text((a / copied).read_text())
    after = held(make_dm(tmp_path, tokenizer_dir, train_files=[str(a / "*.txt"), str(b / "*.txt")], val_fraction=0.25))
    # The copy weighs two documents, so one fewer may be needed to reach 25%; otherwise the same.
    assert len(before - after) <= 1 and after - before <= {"copy.txt", "extra.txt"}, (before, after)
    assert copied in after and "copy.txt" in after


def test_one_file_named_two_ways_is_read_once(tmp_path, corpus_dir, tokenizer_dir, monkeypatch):
    """Relative and absolute, through `..` or a symlink: one file, so one copy of its documents (not double weight)."""
    n = len(list(corpus_dir.glob("*.txt")))
    monkeypatch.chdir(corpus_dir.parent)
    (tmp_path / "link.txt").symlink_to(corpus_dir / "textwrap.txt")
    files = [f"{corpus_dir.name}/*.txt", str(corpus_dir / "abc.txt"), f"{corpus_dir}/../{corpus_dir.name}/keyword.txt",
             str(tmp_path / "link.txt")]
    resolved = data_mod.resolve_files(files, "data.train_files")
    assert len(resolved) == n and resolved[0] == Path(corpus_dir.name) / sorted(p.name for p in corpus_dir.glob("*.txt"))[0]
    dm = prepared(make_dm(tmp_path, tokenizer_dir, train_files=files, val_fraction=0.0))
    assert dm.stats["train"]["documents"] == n


def test_a_hard_link_is_the_same_file_and_a_bracketed_name_is_that_file(tmp_path, corpus_dir, tokenizer_dir):
    """A hard link (`cp -al`, DVC's cache) has its own realpath: inside the training glob it doubled that text's
    weight, as a validation file it was trained on and scored. `notes[1].txt` was read as a glob: it matched
    notes1.txt (another file, silently) or nothing; `set[a]/*.txt` matched a folder `seta`."""
    train = tmp_path / "train"
    train.mkdir()
    for name in ("abc.txt", "keyword.txt", "textwrap.txt"):
        (train / name).write_text((corpus_dir / name).read_text())
    (train / "abc_copy.txt").hardlink_to(train / "abc.txt")
    assert [p.name for p in data_mod.resolve_files([str(train / "*.txt")], "data.train_files")] == [
        "abc.txt", "keyword.txt", "textwrap.txt"]
    (tmp_path / "val.txt").hardlink_to(train / "keyword.txt")
    with pytest.raises(DataError, match=r"^data.val_files and data.train_files share 1 file\(s\), e.g. .*val.txt; "):
        prepared(make_dm(tmp_path, tokenizer_dir, train_files=[str(train / "*.txt")], val_files=[str(tmp_path / "val.txt")]))

    (tmp_path / "notes[1].txt").write_text("the real file\n")
    (tmp_path / "notes1.txt").write_text("another file\n")
    assert data_mod.resolve_files([str(tmp_path / "notes[1].txt")], "k") == [tmp_path / "notes[1].txt"]
    (tmp_path / "set[a]").mkdir()
    (tmp_path / "seta").mkdir()
    (tmp_path / "set[a]" / "x.txt").write_text("x\n")
    (tmp_path / "seta" / "y.txt").write_text("y\n")
    assert data_mod.resolve_files([str(tmp_path / "set[a]" / "*.txt")], "k") == [tmp_path / "set[a]" / "x.txt"]
    with pytest.raises(DataError, match=r"matches no file; .*\[, \] and \? in a name are glob characters"):
        data_mod.resolve_files([str(tmp_path / "note[2].txt")], "k")


def test_second_prepare_uses_cache_without_tokenizing(tmp_path, corpus_dir, tokenizer_dir, monkeypatch):
    dm = make_dm(tmp_path, tokenizer_dir, train_files=[str(corpus_dir / "*.txt")])
    dm.prepare_data()
    calls = []
    monkeypatch.setattr(data_mod, "encode_documents", lambda *a, **k: calls.append(1))
    dm2 = make_dm(tmp_path, tokenizer_dir, train_files=[str(corpus_dir / "*.txt")])
    dm2.prepare_data()
    dm2.setup("fit")
    assert calls == [] and len(dm2.train_set) > 0
    # A changed block size is a different cache entry.
    dm3 = make_dm(tmp_path, tokenizer_dir, train_files=[str(corpus_dir / "*.txt")], block_size=32)
    dm3.tokenizer = dm2.tokenizer
    assert dm3._blocks_dir() != dm2._blocks_dir()


def test_a_knob_no_file_reads_keeps_the_cache(tmp_path, corpus_dir, tokenizer_dir, tokenizer):
    """text_field keyed a .txt corpus's blocks and text_unit a .jsonl's, neither read there: changing one
    re-tokenized the corpus. A changed data.val_files retrained the corpus's tokenizer (trained on training
    documents only). What the readers do read still keys them."""
    (tmp_path / "r.jsonl").write_text(json.dumps({"text": "a record", "body": "another"}) + "\n")
    (tmp_path / "v.txt").write_text("held out\n")
    (tmp_path / "v2.txt").write_text("held out too\n")
    txt, rec = [str(corpus_dir / "*.txt")], [str(tmp_path / "r.jsonl")]

    def keys(**kw):
        dm = make_dm(tmp_path, tokenizer_dir, **kw)
        dm.tokenizer = tokenizer
        return dm._blocks_dir(), dm._tokenizer_dir()

    assert keys(train_files=txt, text_field="body") == keys(train_files=txt)
    assert keys(train_files=rec, text_unit="paragraph") == keys(train_files=rec)
    assert keys(train_files=txt, text_unit="paragraph")[0] != keys(train_files=txt)[0]
    assert keys(train_files=rec, text_field="body")[0] != keys(train_files=rec)[0]
    assert keys(train_files=txt + rec, text_field="body")[0] != keys(train_files=txt + rec)[0]
    a, b = keys(train_files=txt, val_files=[str(tmp_path / "v.txt")]), keys(train_files=txt, val_files=[str(tmp_path / "v2.txt")])
    assert a[1] == b[1] and a[0] != b[0]  # the same trained tokenizer; other validation blocks


def test_trained_tokenizer_is_cached_and_encodes_losslessly(tmp_path, corpus_dir):
    dm = TokenBlockDataModule(train_files=[str(corpus_dir / "*.txt")], train_tokenizer_vocab_size=300,
                              block_size=32, cache_dir=str(tmp_path / "cache"), num_workers=0)
    prepared(dm)
    assert len(dm.tokenizer) == 300
    text = (corpus_dir / "textwrap.txt").read_text()[:2000]
    ids = dm.tokenizer(text, add_special_tokens=False).input_ids
    assert dm.tokenizer.decode(ids) == text  # byte-level: no UNK, exact round trip
    tok_dir = dm._tokenizer_dir()
    mtime = (tok_dir / "tokenizer.json").stat().st_mtime_ns
    prepared(TokenBlockDataModule(train_files=[str(corpus_dir / "*.txt")], train_tokenizer_vocab_size=300,
                                  block_size=32, cache_dir=str(tmp_path / "cache"), num_workers=0))
    assert (tok_dir / "tokenizer.json").stat().st_mtime_ns == mtime
    # Another hold-out: the cached tokenizer was trained on documents that are now validation ones.
    other = TokenBlockDataModule(train_files=[str(corpus_dir / "*.txt")], train_tokenizer_vocab_size=300, block_size=32,
                                 cache_dir=str(tmp_path / "cache"), num_workers=0, val_fraction=0.3)
    prepared(other)
    assert other._tokenizer_dir() != tok_dir and len(list((tmp_path / "cache" / "tokenizers").iterdir())) == 2


def test_trained_tokenizer_and_block_cache_are_readable_by_others(tmp_path, corpus_dir):
    """Checkpoints record the trained tokenizer's folder, and cache_dir may be shared: mkdtemp's 0700
    must not survive the rename (the umask decides, as for any new folder)."""
    import os
    import stat

    old = os.umask(0o022)
    try:
        dm = TokenBlockDataModule(train_files=[str(corpus_dir / "*.txt")], train_tokenizer_vocab_size=300,
                                  block_size=32, cache_dir=str(tmp_path / "cache"), num_workers=0)
        prepared(dm)
    finally:
        os.umask(old)
    for folder in (dm._tokenizer_dir(), dm._blocks_dir()):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o755, folder
        assert {stat.S_IMODE(f.stat().st_mode) for f in folder.rglob("*") if f.is_file()} == {0o644}, folder


def test_sampler_global_batch_is_the_same_for_any_world_size():
    n, batch = 50, 4
    single = list(BlockSampler(n, True, 7, 1, 0))
    shards = [list(BlockSampler(n, True, 7, 2, r)) for r in range(2)]
    per_rank = batch // 2  # same global batch: 2 ranks x 2 blocks = 1 rank x 4 blocks
    for step in range(n // batch):  # every full step of the epoch
        g = set(single[step * batch:(step + 1) * batch])
        d = set(shards[0][step * per_rank:(step + 1) * per_rank]) | set(shards[1][step * per_rank:(step + 1) * per_rank])
        assert g == d
    s = BlockSampler(n, True, 7)
    s.set_epoch(1)
    assert list(s) != single and sorted(s) == sorted(single)  # reshuffled per epoch, same set


def test_eval_sampler_pads_evenly_and_marks_padding(tmp_path, corpus_dir, tokenizer_dir):
    dm = prepared(make_dm(tmp_path, tokenizer_dir, train_files=[str(corpus_dir / "*.txt")], val_fraction=0.0))
    n = len(dm.train_set)
    shards = [list(BlockSampler(n, False, 0, 3, r, pad=True)) for r in range(3)]
    assert len({len(s) for s in shards}) == 1
    items = [dm.train_set[i] for s in shards for i in s]
    assert sum(float(it["loss_weight"]) for it in items) == n  # every block counted exactly once


def test_loaders_are_stateful_and_resume_mid_epoch(tmp_path, corpus_dir, tokenizer_dir):
    from torchdata.stateful_dataloader import StatefulDataLoader

    dm = prepared(make_dm(tmp_path, tokenizer_dir, train_files=[str(corpus_dir / "*.txt")], val_fraction=0.0))
    loader = dm.train_dataloader()
    assert isinstance(loader, StatefulDataLoader)
    it = iter(loader)
    for _ in range(3):
        next(it)
    state = loader.state_dict()
    rest = [b["input_ids"] for b in it]
    loader2 = dm.train_dataloader()
    loader2.load_state_dict(state)
    rest2 = [b["input_ids"] for b in loader2]
    assert len(rest) == len(rest2) > 0
    assert all(torch.equal(a, b) for a, b in zip(rest, rest2))


def _state_after_3_batches_of_epoch_1(dm) -> tuple[dict, list]:
    """A train loader's state after 3 batches of epoch 1, and the batches (input_ids) the epoch has left."""
    loader = dm.train_dataloader()
    loader.sampler.set_epoch(1)
    it = iter(loader)
    for _ in range(3):
        next(it)
    return loader.state_dict(), [b["input_ids"] for b in it]


@pytest.mark.parametrize("before,after", [(0, 1), (2, 0), (1, 2)])
def test_a_loader_position_resumes_under_another_num_workers(tmp_path, corpus_dir, tokenizer_dir, before, after):
    """torchdata's state has one shape without workers and another with them, and refused the other one
    (AssertionError on '_snapshot'): a resume on other nodes with another data.num_workers crashed."""
    dm = prepared(make_dm(tmp_path, tokenizer_dir, train_files=[str(corpus_dir / "*.txt")], val_fraction=0.0,
                          num_workers=before))
    state, rest = _state_after_3_batches_of_epoch_1(dm)
    dm.num_workers = after
    resumed = dm.train_dataloader()  # epoch 0, as Lightning builds it before set_epoch
    resumed.load_state_dict(state)
    assert len(rest) > 0
    assert all(torch.equal(a, b) for a, b in zip(rest, [b["input_ids"] for b in resumed], strict=True))
    assert resumed.sampler.epoch == 1


def test_loader_resume_in_a_later_epoch_keeps_that_epochs_order(tmp_path, corpus_dir, tokenizer_dir):
    """Lightning restores the loader state before it calls set_epoch: the state itself must carry the
    epoch, also when the next run has another world size (2 ranks -> 1, same global batch)."""
    dm = prepared(make_dm(tmp_path, tokenizer_dir, train_files=[str(corpus_dir / "*.txt")], val_fraction=0.0))
    state, rest = _state_after_3_batches_of_epoch_1(dm)
    fresh = dm.train_dataloader()  # epoch 0, as Lightning builds it
    fresh.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(rest, [b["input_ids"] for b in fresh], strict=True))
    assert fresh.sampler.epoch == 1  # Lightning's later set_epoch(1) agrees with it
    # Two ranks stopped after 3 steps of 2 x 2 blocks in epoch 1; one process goes on from block 12 of
    # epoch 1's permutation.
    two = [BlockSampler(50, True, 7, 2, r) for r in range(2)]
    iters = []
    for s in two:
        s.set_epoch(1)
        iters.append(iter(s))
        for _ in range(6):
            next(iters[-1])
    one = iter(BlockSampler(50, True, 7))
    one.load_state_dict(iters[0].state_dict())
    assert list(one) == BlockSampler(50, True, 7).indices(1)[12:]


@pytest.mark.parametrize("case", ["missing", "empty_glob", "empty", "too_small", "binary", "nul_tail", "utf16", "latin1",
                                  "no_field", "int_column"])
def test_bad_input_names_the_culprit(tmp_path, tokenizer_dir, case):
    p = tmp_path / "bad.txt"
    if case == "missing":
        files, needle = [str(tmp_path / "nope.txt")], "nope.txt"
    elif case == "empty_glob":
        files, needle = [str(tmp_path / "none" / "*.txt")], "matches no file"
    elif case == "empty":
        p.write_text("  \n\n ")
        files, needle = [str(p)], "empty corpus"
    elif case == "too_small":
        p.write_text("tiny")
        files, needle = [str(p)], "corpus too small"
    elif case == "binary":
        p.write_bytes(b"\x00\x01\x02binary" * 10)
        files, needle = [str(p)], "bad.txt: looks binary"
    elif case == "nul_tail":  # a crashed writer's NUL padding after 8 KB of text: valid UTF-8, not text
        p.write_bytes(b"x = 1\n" * 2000 + b"\x00" * 4096)
        files, needle = [str(p)], "bad.txt: looks binary"
    elif case == "int_column":  # str(3) was packed as the text "3"
        import pyarrow as pa
        import pyarrow.parquet as pq

        p = tmp_path / "bad.parquet"
        pq.write_table(pa.table({"text": [1, 2, 3], "body": ["a", "b", "c"]}), p)
        files, needle = [str(p)], "bad.parquet: column 'text' is int64, not text; set data.text_field to the text column"
    elif case == "utf16":
        p.write_bytes(("caf\xe9 cr\xe8me " * 50).encode("utf-16"))
        files, needle = [str(p)], "bad.txt: is UTF-16 (byte order mark); convert it (e.g. iconv -f utf-16 -t utf-8)"
    elif case == "latin1":
        p.write_bytes("caf\xe9 cr\xe8me".encode("latin-1") * 50)
        files, needle = [str(p)], "bad.txt: not UTF-8"
    else:
        p = tmp_path / "bad.jsonl"
        p.write_text('{"text": "ok"}\n{"body": "no text"}\n')
        files, needle = [str(p)], "bad.jsonl:2: record has no field 'text'"
    with pytest.raises(DataError, match=None) as err:
        prepared(make_dm(tmp_path, tokenizer_dir, train_files=files, val_fraction=0.0))
    assert needle in str(err.value) and "\n" not in str(err.value)
    assert not list((tmp_path / "cache").glob("blocks/*/meta.json"))  # nothing half-written left as a cache


def test_csv_text_is_read_as_written(tmp_path):
    """CSV has no types: inferred, a text column of numbers-looking values was rewritten ("007" -> "7")."""
    p = tmp_path / "ids.csv"
    p.write_text("text,n\n007,1\n1e3,2\n-0,3\n")
    assert list(data_mod.read_documents(p)) == ["007", "1e3", "-0"]


def test_a_large_csv_with_multi_line_texts_reads_whole(tmp_path):
    """pyarrow reads a CSV in ~1 MB blocks split at newlines, inside quoted fields too: past the first block
    a CSV of multi-line documents (any real corpus) failed to parse."""
    import pyarrow as pa
    import pyarrow.csv as pacsv

    rows = [f"doc {i}\nline two, with a comma\n" for i in range(60_000)]
    pacsv.write_csv(pa.table({"text": rows}), tmp_path / "big.csv")
    assert (tmp_path / "big.csv").stat().st_size > 2_000_000
    assert list(data_mod.read_documents(tmp_path / "big.csv")) == rows


def test_a_csv_row_longer_than_a_read_block_is_read(tmp_path):
    """pyarrow refuses a row longer than its 1 MB read block ("straddling object straddles two block
    boundaries"): one book-length text stopped the run. First, middle and last rows of 3 MB, with newlines."""
    import pyarrow as pa
    import pyarrow.csv as pacsv

    book = ("It was a dark and stormy night, \"said he\".\n" * 70_000)[:3_000_000]
    for rows in ([book, "short", "after"], [f"r{i}" for i in range(50_000)] + [book] + ["tail"], ["a", "b", book]):
        pacsv.write_csv(pa.table({"n": list(range(len(rows))), "text": rows}), tmp_path / "books.csv")
        assert list(data_mod.read_documents(tmp_path / "books.csv")) == rows


def test_parquet_text_in_any_arrow_string_layout_is_text(tmp_path):
    """A dictionary-encoded column (pandas' category dtype) or a string_view one was refused as 'not text'."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": pa.array(["a", "b", None, "a"]).dictionary_encode()}), tmp_path / "cat.parquet")
    pq.write_table(pa.table({"text": pa.array(["x", "y"], type=pa.string_view())}), tmp_path / "view.parquet")
    assert list(data_mod.read_documents(tmp_path / "cat.parquet")) == ["a", "b", "a"]  # the null: no document
    assert list(data_mod.read_documents(tmp_path / "view.parquet")) == ["x", "y"]
    pq.write_table(pa.table({"text": pa.array([1, 2]).dictionary_encode()}), tmp_path / "ints.parquet")
    with pytest.raises(DataError, match="column .text. is int64, not text"):  # numbers stay refused
        list(data_mod.read_documents(tmp_path / "ints.parquet"))


def test_json_lines_keep_unicode_line_separators_inside_strings(tmp_path):
    """JSON allows U+2028, U+2029 and U+0085 raw in strings (json.dumps(ensure_ascii=False) writes them);
    splitlines() split records there and refused the file as invalid JSON."""
    texts = ["a\u2028b", "c\u2029d", "e\x85f"]
    p = tmp_path / "web.jsonl"
    p.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\r\n" for t in texts), encoding="utf-8")
    assert list(data_mod.read_documents(p)) == texts


def test_a_literal_end_of_text_is_a_boundary_by_default_or_text_when_asked(tmp_path, tokenizer_dir, tokenizer):
    """boundary (run_clm.py's reading): stories joined by "<|endoftext|>" in one .txt (TinyStories) pack as
    those stories. text: a literal in code or text about GPT stays its characters, the only EOS the one
    after each document (it cut such documents in two, with no way to say otherwise); its own cache entry."""
    eos = tokenizer.eos_token_id
    joined = "Once upon a time.<|endoftext|>The end."
    ids = encode_documents([joined], tokenizer, np.uint16)
    assert list(np.flatnonzero(ids == eos)) == [len(tokenizer("Once upon a time.").input_ids), len(ids) - 1]
    ids = encode_documents(["print('<|endoftext|>')", "b"], tokenizer, np.uint16, literal_eos="text")
    assert list(np.flatnonzero(ids == eos)) == [len(ids) - 3, len(ids) - 1]  # after each document, nowhere else
    assert tokenizer.decode(ids[: len(ids) - 3].tolist()) == "print('<|endoftext|>')"  # the literal, as its bytes
    assert tokenizer.backend_tokenizer.encode_special_tokens is False  # the shared tokenizer is left as it was
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "stories.txt").write_text(joined * 50)
    dms = [make_dm(tmp_path, tokenizer_dir, train_files=[str(tmp_path / "c" / "*.txt")], val_fraction=0.0,
                   block_size=16, literal_eos=mode) for mode in ("boundary", "text")]
    counts = []
    for dm in dms:
        prepared(dm)
        counts.append(int((np.asarray(dm.train_set.blocks) == eos).sum()))
    # 50 joins + the file's EOS, less any in the dropped remainder; as text, at most the file's own EOS.
    assert counts[0] >= 49 and counts[1] <= 1 and dms[0]._blocks_dir() != dms[1]._blocks_dir()
    # A prompt (predict, samples, the export's sample) is encoded as the documents were: under text, a quoted
    # literal was fed as EOS, the boundary the model learned to start a new document after.
    from gpt2dist.generation import prompt_ids

    prompt = "EOS = '<|endoftext|>'\n"
    as_packed = [encode_documents([prompt], dm.tokenizer, np.uint16, literal_eos=mode)[:-1].tolist()
                 for dm, mode in zip(dms, ("boundary", "text"))]
    assert [prompt_ids(dm.tokenizer, prompt, 1024) for dm in dms] == as_packed
    assert eos in as_packed[0] and eos not in as_packed[1]


def test_trained_tokenizer_written_twice_to_one_folder(tmp_path):
    """prepare_data runs once per node: with a shared cache_dir every node trains the tokenizer, and the
    second rename failed (Directory not empty), stopping the whole job on its first start."""
    from gpt2dist.tokenizer import load_tokenizer, train_bpe_tokenizer

    for _ in range(2):
        train_bpe_tokenizer(corpus_texts()[:3], 300, tmp_path / "tok")
    assert len(load_tokenizer(str(tmp_path / "tok"))) == 300
    assert [p.name for p in tmp_path.iterdir()] == ["tok"]  # no temporary folder left


def test_the_block_cache_is_keyed_by_the_eos_token_and_an_incomplete_one_is_named(tmp_path, corpus_dir, tokenizer_dir):
    """tokenizer_config.json's eos_token is not in tokenizer.json's hash: another EOS reused the old blocks.
    A cache folder without meta.json (a temp-file cleaner) was a raw "Directory not empty" on every run."""
    import shutil

    other = tmp_path / "tok-other-eos"
    shutil.copytree(tokenizer_dir, other)
    cfg = json.loads((other / "tokenizer_config.json").read_text())
    tokenizer = data_mod.load_tokenizer(str(tokenizer_dir))
    cfg["eos_token"] = tokenizer.convert_ids_to_tokens(5)  # another token of the same vocabulary
    (other / "tokenizer_config.json").write_text(json.dumps(cfg))
    dm = prepared(make_dm(tmp_path, tokenizer_dir, train_files=[str(corpus_dir / "*.txt")]))
    dm2 = make_dm(tmp_path, other, train_files=[str(corpus_dir / "*.txt")])
    dm2.load_tokenizer()
    assert dm2.tokenizer.eos_token_id == 5 and dm2._blocks_dir() != dm._blocks_dir()
    (dm._blocks_dir() / "meta.json").unlink()
    with pytest.raises(DataError, match=rf"^the block cache {dm._blocks_dir()} is incomplete \(no meta.json\); "
                                        r"delete that folder and run again$"):
        make_dm(tmp_path, tokenizer_dir, train_files=[str(corpus_dir / "*.txt")]).prepare_data()


def test_the_seed_keys_the_cache_only_when_it_picks_the_held_out_documents(tmp_path, corpus_dir, tokenizer_dir):
    """With data.val_files (or val_split) the seed only shuffles, which the cache does not hold: a seed sweep
    re-tokenized the corpus (and retrained a trained tokenizer) for the same blocks."""
    files = [str(p) for p in sorted(corpus_dir.glob("*.txt"))]
    given = dict(train_files=files[1:], val_files=files[:1], train_tokenizer_vocab_size=300)
    held = dict(train_files=files, val_fraction=0.2, train_tokenizer_vocab_size=300)
    for kw, same in ((given, True), (held, False)):
        a, b = (make_dm(tmp_path, None, **kw, seed=seed) for seed in (1, 2))
        assert (a._tokenizer_dir() == b._tokenizer_dir()) is same
        a.tokenizer = b.tokenizer = data_mod.load_tokenizer(str(tokenizer_dir))
        assert (a._blocks_dir() == b._blocks_dir()) is same


def test_utf8_byte_order_mark_is_not_part_of_the_text(tmp_path):
    from gpt2dist.data import read_documents

    text = (tmp_path / "notepad.txt")
    text.write_bytes("\ufeffcaf\xe9 au lait".encode("utf-8"))  # what Windows Notepad writes as "UTF-8 with BOM"
    assert list(read_documents(text)) == ["caf\xe9 au lait"]


def test_on_bad_file_skip_warns_and_continues(tmp_path, corpus_dir, tokenizer_dir, caplog):
    (tmp_path / "good.txt").write_text((corpus_dir / "textwrap.txt").read_text())
    (tmp_path / "bad.txt").write_bytes("caf\xe9".encode("latin-1") * 100)
    dm = prepared(make_dm(tmp_path, tokenizer_dir, train_files=[str(tmp_path / "*.txt")], val_fraction=0.0,
                          on_bad_file="skip"))
    assert dm.stats["train"]["documents"] == 1
    skips = [r.getMessage() for r in caplog.records if "bad.txt" in r.getMessage()]
    # Once, though the files are read twice (hold-out pass, packing pass); no advice to set what is set.
    assert len(skips) == 1 and "bad.txt: not UTF-8" in skips[0] and "or set data.on_bad_file=skip" not in skips[0]
    # The same cache with on_bad_file=error: not the skip run's blocks, but the error that run asks for.
    with pytest.raises(DataError, match="bad.txt: not UTF-8"):
        prepared(make_dm(tmp_path, tokenizer_dir, train_files=[str(tmp_path / "*.txt")], val_fraction=0.0))


@pytest.mark.parametrize("kind", ["jsonl", "csv", "parquet"])
def test_a_record_file_is_read_a_piece_at_a_time(tmp_path, monkeypatch, kind):
    """A 16 MB file of records in 1 MB pieces: Python memory stays near a piece. Read whole (its bytes,
    its text, a list of every line or row), a 20 GB JSON-lines corpus needed ~60 GB of memory."""
    import tracemalloc

    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    monkeypatch.setattr(data_mod, "READ_CHUNK", 1 << 20)
    docs = [f"doc {i}\n" + "caf\xe9 au lait, " * 60 for i in range(20_000)]  # ~850 chars each, quoted newlines in CSV
    p = tmp_path / f"corpus.{kind}"
    if kind == "jsonl":
        p.write_text("".join(json.dumps({"id": i, "text": d}) + "\n" for i, d in enumerate(docs)))
    elif kind == "csv":
        pacsv.write_csv(pa.table({"id": list(range(len(docs))), "text": docs}), p)
    else:
        pq.write_table(pa.table({"id": list(range(len(docs))), "text": docs}), p, row_group_size=1024)
    assert sum(map(len, docs)) > 16_000_000
    tracemalloc.start()
    try:
        n = chars = 0
        for i, d in enumerate(data_mod.read_documents(p)):
            assert d == docs[i]
            n, chars = n + 1, chars + len(d)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert (n, chars) == (len(docs), sum(map(len, docs)))
    assert peak < 6_000_000, f"{peak / 1e6:.1f} MB of Python memory for 16 MB of text"


@pytest.mark.parametrize("kind", ["jsonl", "csv"])
def test_a_bad_record_file_yields_no_document_and_names_its_byte(tmp_path, monkeypatch, kind):
    """Checked before its first record: read in pieces, a bad byte at the end must not leave the file's
    first part trained on under on_bad_file=skip. The byte named is the file's, across piece ends."""
    monkeypatch.setattr(data_mod, "READ_CHUNK", 64)
    head = (json.dumps({"text": "caf\xe9 " * 40}) + "\n") * 5 if kind == "jsonl" else "text\n" + "caf\xe9 x\n" * 40
    raw = head.encode("utf-8")
    p = tmp_path / f"bad.{kind}"
    for bad, problem in ((b"\xe9 au lait\n", f"not UTF-8 (byte {len(raw)})"), (b"a\x00b\n", "looks binary (NUL bytes)")):
        p.write_bytes(raw + bad)
        docs = data_mod.read_documents(p)
        with pytest.raises(data_mod.BadFileError) as err:
            next(docs)  # the first document already: none of the file is read as text
        assert err.value.problem == f"{p}: {problem}"
    # A character split across two pieces is whole: é's two bytes at every offset around a piece end.
    for pad in range(4):
        text = "x" * (62 + pad) + "caf\xe9"
        p.write_bytes((json.dumps({"text": text}, ensure_ascii=False) + "\n" if kind == "jsonl" else f"text\n{text}\n").encode())
        assert list(data_mod.read_documents(p)) == [text]


def test_on_bad_file_skip_leaves_out_a_csv_that_is_not_utf8(tmp_path, corpus_dir, tokenizer_dir, caplog):
    """pyarrow read a Latin-1 CSV's text as binary, refused as 'not text' whatever on_bad_file said."""
    import pyarrow as pa
    import pyarrow.csv as pacsv

    pacsv.write_csv(pa.table({"text": [(corpus_dir / "textwrap.txt").read_text()]}), tmp_path / "good.csv")
    (tmp_path / "bad.csv").write_bytes(("text\n" + "caf\xe9\n" * 50).encode("latin-1"))
    dm = prepared(make_dm(tmp_path, tokenizer_dir, train_files=[str(tmp_path / "*.csv")], val_fraction=0.0,
                          on_bad_file="skip"))
    assert dm.stats["train"]["documents"] == 1
    assert any("bad.csv: not UTF-8 (byte 8)" in r.getMessage() for r in caplog.records)
    with pytest.raises(DataError, match=r"bad.csv: not UTF-8 \(byte 8\); convert it .*, or set data.on_bad_file=skip$"):
        prepared(make_dm(tmp_path, tokenizer_dir, train_files=[str(tmp_path / "*.csv")], val_fraction=0.0))


def test_a_parquet_column_that_is_not_utf8_is_a_bad_file(tmp_path, corpus_dir, tokenizer_dir, caplog):
    """Written by a writer that skips UTF-8 checks (Spark's binary-as-string): a bare UnicodeDecodeError with no
    file named, which on_bad_file=skip did not skip. Now a bad file, as a .txt's or a .csv's bytes are."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": [(corpus_dir / "textwrap.txt").read_text()]}), tmp_path / "good.parquet")
    pq.write_table(pa.table({"text": pa.array([b"ok", b"caf\xe9"], type=pa.binary()).view(pa.string())}),
                   tmp_path / "bad.parquet")
    with pytest.raises(DataError, match=r"bad.parquet: column 'text' near row 1 is not UTF-8 text .*; re-encode the "
                                        r"column as UTF-8, or set data.on_bad_file=skip$"):
        prepared(make_dm(tmp_path, tokenizer_dir, train_files=[str(tmp_path / "*.parquet")], val_fraction=0.0))
    dm = prepared(make_dm(tmp_path, tokenizer_dir, train_files=[str(tmp_path / "*.parquet")], val_fraction=0.0,
                          on_bad_file="skip"))
    assert dm.stats["train"]["documents"] == 1


def test_a_tokenizer_saved_with_split_special_tokens_still_packs_boundaries(tmp_path, tokenizer_dir):
    """literal_eos=boundary used whatever the shared Rust backend was left with: a tokenizer_config.json with
    split_special_tokens: true (its load's check call sets it) packed every literal <|endoftext|> as text,
    under the boundary cache key, while prompts read it as EOS."""
    import shutil

    tok = tmp_path / "tok"
    shutil.copytree(tokenizer_dir, tok)
    cfg = json.loads((tok / "tokenizer_config.json").read_text())
    (tok / "tokenizer_config.json").write_text(json.dumps({**cfg, "split_special_tokens": True}))
    (tmp_path / "stories.txt").write_text("Once upon a time.<|endoftext|>The end. " * 50)
    dm = prepared(make_dm(tmp_path, tok, train_files=[str(tmp_path / "stories.txt")], val_fraction=0.0, block_size=16,
                          literal_eos="boundary"))
    eos = dm.tokenizer.eos_token_id
    # One document (a .txt file): 49 literal boundaries, and its own EOS unless the dropped remainder holds it.
    assert dm.stats["train"]["documents"] == 1 and int((np.asarray(dm.train_set.blocks) == eos).sum()) >= 49


def test_a_cache_dir_inside_the_corpus_is_not_read_as_corpus(tmp_path, tokenizer_dir, tokenizer, caplog):
    corpus = tmp_path / "data"
    corpus.mkdir()
    docs = [f"record {i}: " + "some words " * 20 for i in range(40)]
    (corpus / "docs.json").write_text(json.dumps([{"text": d} for d in docs]))
    kw = dict(train_files=[str(corpus / "**" / "*.json")], val_fraction=0.0, block_size=16, cache_dir=str(corpus / "cache"))
    first = prepared(make_dm(tmp_path, tokenizer_dir, **kw))
    assert list((corpus / "cache").glob("blocks/*/meta.json"))  # now matched by the corpus glob
    again = prepared(make_dm(tmp_path, tokenizer_dir, **kw))
    assert again.stats == first.stats and first.stats["train"]["documents"] == 40  # the same key: a cache hit
    assert any("leaving out 1 file(s) in data.cache_dir" in r.getMessage() for r in caplog.records)
    with pytest.raises(DataError, match="match only files in data.cache_dir"):
        prepared(make_dm(tmp_path, tokenizer_dir, **{**kw, "train_files": [str(corpus / "cache" / "**" / "*.json")]}))


@pytest.mark.parametrize("source", ["txt", "jsonl"])
def test_single_document_hint_names_fixes_that_work(tmp_path, corpus_dir, tokenizer_dir, source):
    """One document cannot be split by data.val_fraction (whole documents are held out): the message
    says what does help, and each suggestion it makes does."""
    text = (corpus_dir / "textwrap.txt").read_text()
    one = tmp_path / f"one.{source}"
    one.write_text(text if source == "txt" else json.dumps({"text": text}))
    # Copies of that one text (the same file under three names): held out together, so no better.
    copies = tmp_path / "copies"
    copies.mkdir()
    for name in ("a", "b", "c"):
        (copies / f"{name}.{source}").write_text(one.read_text())
    with pytest.raises(DataError, match=r"the corpus is 3 copies of one text \(held out together, or not at all\), "
                                        r"so data.val_fraction cannot hold one out: give data.val_files"):
        prepared(make_dm(tmp_path, tokenizer_dir, train_files=[str(copies / "*")], val_fraction=0.05))
    kw = dict(train_files=[str(one)], val_fraction=0.05)
    with pytest.raises(DataError) as err:
        prepared(make_dm(tmp_path, tokenizer_dir, **kw))
    msg = str(err.value)
    assert "validation split too small" in msg and "raise data.val_fraction" not in msg and "\n" not in msg
    assert "the corpus is 1 document, so" in msg
    assert "data.val_files" in msg and "data.val_fraction=0" in msg
    assert ("data.text_unit=paragraph" in msg) == (source == "txt")  # paragraphs of plain text only
    assert prepared(make_dm(tmp_path, tokenizer_dir, **{**kw, "val_fraction": 0.0})).stats["val"]["blocks"] == 0
    val = prepared(make_dm(tmp_path, tokenizer_dir, **kw, val_files=[str(corpus_dir / "string.txt")]))
    assert val.stats["val"]["blocks"] > 0
    if source == "txt":
        para = prepared(make_dm(tmp_path, tokenizer_dir, **kw, text_unit="paragraph"))
        assert para.stats["val"]["blocks"] > 0


def test_test_files_are_packed_in_a_cache_of_their_own(tmp_path, corpus_dir, tokenizer_dir, tokenizer):
    """data.test_files: every token of those files in test.bin, none of them in train/val, and the train/val
    cache is the one without a test split (adding or changing test files re-packs nothing else)."""
    test_names = ["colorsys.txt", "keyword.txt"]
    train = [str(p) for p in sorted(corpus_dir.glob("*.txt")) if p.name not in test_names]
    kw = dict(train_files=train, val_fraction=0.2)
    plain = prepared(make_dm(tmp_path, tokenizer_dir, **kw))
    assert plain.test_set is None and "test" not in plain.stats
    dm = prepared(make_dm(tmp_path, tokenizer_dir, **kw, test_files=[str(corpus_dir / n) for n in test_names]))
    assert dm._blocks_dir() == plain._blocks_dir() and dm.stats["train"] == plain.stats["train"]
    ids = np.concatenate([encode_documents([(corpus_dir / n).read_text()], tokenizer, np.dtype(np.uint16))
                          for n in test_names])
    st = dm.stats["test"]
    assert (st["documents"], st["tokens"], st["blocks"]) == (2, len(ids), len(ids) // 64)
    got = np.concatenate([dm.test_set[i]["input_ids"].numpy() for i in range(len(dm.test_set))])
    np.testing.assert_array_equal(got, ids[: st["blocks"] * 64])
    everything = sum(len(tokenizer(t, add_special_tokens=False).input_ids) + 1 for t in corpus_texts())
    assert dm.stats["train"]["tokens"] + dm.stats["val"]["tokens"] + st["tokens"] == everything
    assert any(f"  test:  {st['blocks']:,} blocks" in line for line in dm.describe())
    # `gpt2dist test` reads the test blocks, in order, each once (padding to equal shards is weighted 0).
    dm.trainer = None
    batches = list(dm.test_dataloader())
    seen = torch.cat([b["input_ids"][b["loss_weight"] > 0] for b in batches])
    np.testing.assert_array_equal(seen.flatten().numpy(), got)


@pytest.mark.parametrize("kw, needles", [
    (lambda c, t: dict(train_files=[f"{c}/*.txt"], test_files=[f"{c}/keyword.txt"]),
     ["data.test_files and data.train_files share 1 file(s), e.g. {c}/keyword.txt; take them out of data.train_files"]),
    (lambda c, t: dict(train_files=[f"{c}/*.txt"], val_files=[f"{c}/abc.txt", f"{c}/copy.txt"]),
     ["data.val_files and data.train_files share 2 file(s), e.g. {c}/abc.txt"]),
    (lambda c, t: dict(train_files=[f"{c}/*.txt"], val_files=[f"{c}/../{c.name}/abc.txt"]),  # one file, two names
     ["data.val_files and data.train_files share 1 file(s), e.g. {c}/../{c.name}/abc.txt"]),
    (lambda c, t: dict(train_files=[f"{c}/abc.txt"], val_files=[f"{c}/keyword.txt"], test_files=[f"{c}/keyword.txt"]),
     ["data.test_files and data.val_files share 1 file(s), e.g. {c}/keyword.txt; a test split scored on the text"]),
    (lambda c, t: dict(dataset_name="wikitext", val_split="validation", test_split="validation"),
     ["data.test_split='validation' is also data.val_split; name another split for the test"]),
    (lambda c, t: dict(train_files=[f"{c}/abc.txt"], test_split="test"),
     ["data.test_split names a split of data.dataset_name, which is unset; use data.test_files"]),
    (lambda c, t: dict(dataset_name="wikitext", test_split="train"),
     ["data.test_split='train' is the training split (data.split='train'); name a held-out split (e.g. split "
      "'train[1%:]' and test_split 'train[:1%]'), or unset data.test_split"]),
    # A slice of the training split, or slices whose ranges meet: validated on trained text (was accepted).
    (lambda c, t: dict(dataset_name="wikitext", val_split="train[:1%]"),
     ["data.val_split='train[:1%]' is part of the training split (data.split='train')"]),
    (lambda c, t: dict(dataset_name="wikitext", split="train[1%:]", val_split="train[:2%]"),
     ["data.val_split='train[:2%]' is part of the training split (data.split='train[1%:]')"]),
    (lambda c, t: dict(dataset_name="wikitext", split="train[:50000]", val_split="train[:500]"),  # rows (was accepted)
     ["data.val_split='train[:500]' is part of the training split (data.split='train[:50000]')"]),
    (lambda c, t: dict(dataset_name="wikitext", split="train[1000:]", val_split="train[:1000]", test_split="train[:100]"),
     ["data.test_split='train[:100]' shares rows with data.val_split='train[:1000]'; name another split"]),
    (lambda c, t: dict(dataset_name=str(t), cache_dir=str(t / "cache")),  # re-packed each run, or read as data
     ["data.cache_dir='{t}/cache' is inside the data set folder data.dataset_name='{t}', which is read whole; "
      "move data.cache_dir out of it"]),
    (lambda c, t: dict(dataset_name="wikitext", split="validation", val_split="validation"),
     ["data.val_split='validation' is the training split (data.split='validation')"]),
    (lambda c, t: dict(dataset_name="wikitext", test_files=[f"{c}/abc.txt"]),
     ["data.test_files goes with data.train_files, not data.dataset_name; use data.test_split"]),
    (lambda c, t: dict(train_files=[f"{c}/*.txt"], test_files=[f"{t}/x.txt"]),
     ["test split too small: ", " tokens in 1 documents in data.test_files, fewer than data.block_size=64; "
      "add text to data.test_files or lower data.block_size"]),
])
def test_test_and_val_sources_that_would_mislead_are_refused(tmp_path, corpus_dir, tokenizer_dir, kw, needles):
    (tmp_path / "x.txt").write_text("def f(): pass")
    with pytest.raises(DataError) as err:
        prepared(make_dm(tmp_path, tokenizer_dir, **kw(corpus_dir, tmp_path)))
    msg = str(err.value)
    assert all(n.format(c=corpus_dir, t=tmp_path) in msg for n in needles) and "\n" not in msg, msg


def test_checkpointed_data_state_tells_a_resume_on_other_data(tmp_path, corpus_dir, tokenizer_dir, tokenizer):
    """The DataModule's checkpoint state names its training blocks: the same data resumes silently; more
    files, another shuffle seed, or edited text of the same length each get a warning naming what changed."""
    files = [str(p) for p in sorted(corpus_dir.glob("*.txt"))]
    kw = dict(train_files=files[:-1], val_fraction=0.0)
    state = prepared(make_dm(tmp_path, tokenizer_dir, **kw)).state_dict()
    assert state["train_data"]["blocks"] == len(prepared(make_dm(tmp_path, tokenizer_dir, **kw)).train_set)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        prepared(make_dm(tmp_path, tokenizer_dir, **kw)).load_state_dict(state)  # same data: nothing to say
        prepared(make_dm(tmp_path, tokenizer_dir, **kw)).load_state_dict({})  # a checkpoint without it
    more = prepared(make_dm(tmp_path, tokenizer_dir, train_files=files, val_fraction=0.0))
    with pytest.warns(UserWarning, match=r"^resume: the training data is not the checkpoint's \(blocks \d+ -> \d+, "
                                         r"tokens \d+ -> \d+, documents 11 -> 12, digest \w+ -> \w+\): .* not an exact resume"):
        more.load_state_dict(state)
    with pytest.warns(UserWarning, match=r"the checkpoint's \(seed 1234 -> 5\)"):
        prepared(make_dm(tmp_path, tokenizer_dir, **kw, seed=5)).load_state_dict(state)
    # Same number of documents and tokens, other text: only the digest of the blocks tells.
    a, b = "alpha = 1\n" * 300, "gamma = 2\n" * 300
    assert len(tokenizer(a).input_ids) == len(tokenizer(b).input_ids)  # the premise of this case
    (tmp_path / "one").mkdir()
    (tmp_path / "one" / "doc.txt").write_text(a)
    one = dict(train_files=[str(tmp_path / "one" / "doc.txt")], val_fraction=0.0)
    state = prepared(make_dm(tmp_path, tokenizer_dir, **one)).state_dict()
    (tmp_path / "one" / "doc.txt").write_text(b)
    with pytest.warns(UserWarning, match=r"the checkpoint's \(digest \w+ -> \w+\)"):
        prepared(make_dm(tmp_path, tokenizer_dir, **one)).load_state_dict(state)


def test_hf_dataset_source_offline_from_a_local_folder(tmp_path, tokenizer_dir, tokenizer):
    """The `dataset_name` path (datasets.load_dataset) without the hub: a local data set folder."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path / "my_dataset" / "data"
    folder.mkdir(parents=True)
    train = [f"training document {i}: " + "words " * (i % 7 + 5) for i in range(60)]
    val = [f"held-out document {i}: " + "more words " * 6 for i in range(20)]
    pq.write_table(pa.table({"text": train}), folder / "train-00000-of-00001.parquet")
    pq.write_table(pa.table({"text": val}), folder / "validation-00000-of-00001.parquet")
    dm = prepared(make_dm(tmp_path, tokenizer_dir, dataset_name=str(tmp_path / "my_dataset"), split="train",
                          val_split="validation", block_size=16))
    count = lambda docs: sum(len(tokenizer(d, add_special_tokens=False).input_ids) + 1 for d in docs)
    assert dm.stats["train"]["documents"] == 60 and dm.stats["train"]["tokens"] == count(train)
    assert dm.stats["val"]["documents"] == 20 and dm.stats["val"]["tokens"] == count(val)
    with pytest.raises(DataError, match="no column 'body'"):
        prepared(make_dm(tmp_path, tokenizer_dir, dataset_name=str(tmp_path / "my_dataset"), text_field="body",
                         cache_dir=str(tmp_path / "c2")))


def test_hub_dataset_revision_is_part_of_the_cache_keys(tmp_path, tokenizer_dir):
    """A pinned hub revision keys the block and trained-tokenizer caches (another revision is
    re-tokenized, not served from the old one's cache); unpinned keys are what they were."""
    kw = dict(dataset_name="Salesforce/wikitext", dataset_config="wikitext-103-raw-v1", train_tokenizer_vocab_size=512)
    dms = {rev: make_dm(tmp_path, tokenizer_dir, dataset_revision=rev, **kw) for rev in (None, "b08601e", "main")}
    assert len({dm._tokenizer_dir() for dm in dms.values()}) == 3
    assert "revision" not in dms[None]._source_fingerprint()  # caches made before the knob stay valid
    assert dms["b08601e"]._source_fingerprint()["revision"] == "b08601e"


def test_local_dataset_folder_edited_is_repacked_not_served_from_cache(tmp_path, tokenizer_dir, tokenizer):
    """`dataset_name` as a local folder: its files are part of the cache key (as train_files' are), so
    blocks packed from the folder's old content are never reused for its new content."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path / "my_dataset" / "data"
    folder.mkdir(parents=True)
    shard = folder / "train-00000-of-00001.parquet"
    count = lambda docs: sum(len(tokenizer(d, add_special_tokens=False).input_ids) + 1 for d in docs)
    first = [f"first version, document {i}: " + "words " * 12 for i in range(60)]
    pq.write_table(pa.table({"text": first}), shard)
    kw = dict(dataset_name=str(tmp_path / "my_dataset"), split="train", val_fraction=0.0, block_size=16)
    assert prepared(make_dm(tmp_path, tokenizer_dir, **kw)).stats["train"]["tokens"] == count(first)
    second = [f"second version {i}: " + "other text " * 3 for i in range(25)]
    pq.write_table(pa.table({"text": second}), shard)
    again = prepared(make_dm(tmp_path, tokenizer_dir, **kw))
    assert again.stats["train"]["documents"] == 25 and again.stats["train"]["tokens"] == count(second)


def test_dataset_saved_with_save_to_disk(tmp_path, tokenizer_dir, tokenizer):
    """`dataset_name` as a `save_to_disk` folder (load_dataset refuses those): a DatasetDict's splits, or a
    single Dataset as the training data, with a text column of another name."""
    import datasets

    count = lambda docs: sum(len(tokenizer(d, add_special_tokens=False).input_ids) + 1 for d in docs)
    train = [f"training document {i}: " + "words " * (i % 7 + 5) for i in range(60)]
    val = [f"held-out document {i}: " + "more words " * 6 for i in range(20)]
    test = [f"test document {i}: " + "other words " * 5 for i in range(10)]
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"body": train}),
                          "validation": datasets.Dataset.from_dict({"body": val}),
                          "test": datasets.Dataset.from_dict({"body": test})}).save_to_disk(str(tmp_path / "dict"))
    dm = prepared(make_dm(tmp_path, tokenizer_dir, dataset_name=str(tmp_path / "dict"), val_split="validation",
                          test_split="test", text_field="body", block_size=16))
    assert dm.stats["train"]["documents"] == 60 and dm.stats["train"]["tokens"] == count(train)
    assert dm.stats["val"]["documents"] == 20 and dm.stats["val"]["tokens"] == count(val)
    assert dm.stats["test"]["documents"] == 10 and dm.stats["test"]["tokens"] == count(test)
    assert len(dm.test_set) == count(test) // 16

    datasets.Dataset.from_dict({"body": train, "n": list(range(60))}).save_to_disk(str(tmp_path / "single"))
    one = prepared(make_dm(tmp_path, tokenizer_dir, dataset_name=str(tmp_path / "single"), text_field="body",
                           val_fraction=0.0, block_size=16))
    assert one.stats["train"]["documents"] == 60 and one.stats["train"]["tokens"] == count(train)
    # A split's own name, which is no split spec (`my-split`, `train 2`), or looks like one (`train[:5]`): read as named.
    names = {"my-split": train[:20], "train 2": train[20:40], "train[:5]": train[40:]}
    datasets.DatasetDict({k: datasets.Dataset.from_dict({"body": v}) for k, v in names.items()}).save_to_disk(
        str(tmp_path / "named"))
    for name, rows in names.items():
        got = prepared(make_dm(tmp_path, tokenizer_dir, dataset_name=str(tmp_path / "named"), split=name, text_field="body",
                               val_fraction=0.0, block_size=16, cache_dir=str(tmp_path / "c" / str(len(name)))))
        assert got.stats["train"]["documents"] == len(rows), name
    for kw, needle in [({"val_split": "validation"}, "single Dataset with no splits, so data.val_split"),
                       ({"test_split": "test"}, "single Dataset with no splits, so data.test_split"),
                       ({"split": "valid"}, "has no split 'valid' (has ['test', 'train', 'validation'])"),
                       ({"text_field": "n"}, "column 'n' is int64, not text; set data.text_field")]:  # not "0", "1", ...
        name = "dict" if "split" in kw else "single"
        with pytest.raises(DataError) as err:
            prepared(make_dm(tmp_path, tokenizer_dir, dataset_name=str(tmp_path / name), **{"text_field": "body", **kw}))
        assert needle in str(err.value) and "\n" not in str(err.value)


def _parquet_dataset(folder, **splits):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (folder / "data").mkdir(parents=True)
    for name, rows in splits.items():
        pq.write_table(pa.table({"text": rows}), folder / "data" / f"{name}-00000-of-00001.parquet")
    return str(folder)


def test_split_specs_are_read_as_datasets_reads_them_and_evaluation_rows_are_never_trained_on(tmp_path, tokenizer_dir):
    """Split specs (`train[:10%]`, `train[-10:]`, `a+b`) resolve against the splits' sizes, for a data files folder
    and a save_to_disk folder alike; specs the __init__ check cannot read (`+`, percent against rows) that share
    rows are refused at packing (they trained on 20 validation rows, or on 30 of 40)."""
    import datasets

    train = [f"training document {i}: " + "words " * (i % 7 + 5) for i in range(60)]
    val = [f"held-out document {i}: " + "more words " * 6 for i in range(20)]
    folder = _parquet_dataset(tmp_path / "pq", train=train, validation=val)
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": train}),
                          "validation": datasets.Dataset.from_dict({"text": val})}).save_to_disk(str(tmp_path / "dict"))
    datasets.Dataset.from_dict({"text": train}).save_to_disk(str(tmp_path / "single"))
    docs = lambda dm: (dm.stats["train"]["documents"], dm.stats["val"]["documents"])
    for name in (folder, str(tmp_path / "dict"), str(tmp_path / "single")):
        kw = dict(dataset_name=name, block_size=16, cache_dir=str(tmp_path / "c" / Path(name).name))
        assert docs(prepared(make_dm(tmp_path, tokenizer_dir, split="train[:50%]", val_split="train[-10:]", **kw))) == (30, 10)
        assert docs(prepared(make_dm(tmp_path, tokenizer_dir, split="train[10%:]", val_split="train[:10%]", **kw))) == (54, 6)
        one = prepared(make_dm(tmp_path, tokenizer_dir, split="train[:10%]", val_fraction=0.0, **kw))
        assert one.stats["train"]["documents"] == 6  # a single Dataset's slice too (it trained on all 60)
    leaks = [dict(split="train+validation", val_split="validation"),
             dict(split="train[:50%]", val_split="train[:40]"),
             dict(split="train", val_split="validation", test_split="train[:10%]+validation")]
    for kw, rows in zip(leaks, ["rows 0-19 of split 'validation'", "rows 0-29 of split 'train'", "rows 0-5 of split 'train'"]):
        with pytest.raises(DataError) as err:
            prepared(make_dm(tmp_path, tokenizer_dir, dataset_name=folder, block_size=16, **kw))
        assert rows in str(err.value) and "make them disjoint" in str(err.value) and "\n" not in str(err.value)
    for kw, needle in [(dict(dataset_name=str(tmp_path / "single"), split="validation"),
                        "single Dataset with no splits, so data.split='validation' cannot be read"),
                       (dict(dataset_name=folder, split="train[:5"), "data.split='train[:5' is not a split spec")]:
        with pytest.raises(DataError, match=re.escape(needle)):
            prepared(make_dm(tmp_path, tokenizer_dir, block_size=16, **kw))


def test_a_dataset_folder_under_home_or_a_variable_is_loaded_as_that_folder(tmp_path, tokenizer_dir, monkeypatch):
    """`~/data` and `$DATA/...` name a local folder: load_dataset got the raw name and read it as a hub id."""
    train = [f"training document {i}: " + "words " * 8 for i in range(30)]
    _parquet_dataset(tmp_path / "home" / "ds", train=train)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MYDATA", str(tmp_path / "home"))
    for name in ("~/ds", "$MYDATA/ds"):
        dm = prepared(make_dm(tmp_path, tokenizer_dir, dataset_name=name, val_fraction=0.0, block_size=16,
                              cache_dir=str(tmp_path / "c" / name[0])))
        assert dm.stats["train"]["documents"] == 30


def test_dataset_rows_as_lines_are_one_running_text_without_an_eos_per_row(tmp_path, tokenizer_dir, tokenizer, monkeypatch):
    """dataset_rows=lines (WikiText: a row is a heading or a paragraph): rows joined into documents of whole rows,
    with no EOS between them (one after each row taught the model to end every paragraph, and was scored in the
    test perplexity); a row without a newline gets one, an empty row is a blank line."""
    rows = [" = Title = \n", "", " First paragraph of the article .\n", " Second one", None, " = = Section = = \n"] * 40
    folder = _parquet_dataset(tmp_path / "wiki", train=rows, validation=rows[:12], test=rows[:18])
    monkeypatch.setattr(TokenBlockDataModule, "LINES_CHUNK", 500)  # several documents, cut at row ends
    kw = dict(dataset_name=folder, val_split="validation", test_split="test", block_size=16)
    lines = prepared(make_dm(tmp_path, tokenizer_dir, dataset_rows="lines", **kw))
    joined = lambda rs: "".join((r or "") if (r or "").endswith("\n") else (r or "") + "\n" for r in rs)
    ids = tokenizer(joined(rows), add_special_tokens=False).input_ids
    assert lines.stats["train"]["documents"] > 5
    # Every token of the running text (cut at row ends only: tokens never cross a newline here), and no EOS.
    assert lines.stats["train"]["tokens"] == len(ids)
    packed = np.fromfile(lines._blocks_dir() / "train.bin", dtype=np.uint16)
    assert tokenizer.eos_token_id not in packed and packed.tolist() == ids[:len(packed)]
    assert lines.stats["test"]["tokens"] == len(tokenizer(joined(rows[:18]), add_special_tokens=False).input_ids)
    plain = prepared(make_dm(tmp_path, tokenizer_dir, **kw))  # rows as documents: the default, keyed as before
    assert plain.stats["train"]["documents"] == 160 and plain._blocks_dir() != lines._blocks_dir()
    assert "rows" not in plain._source_fingerprint()
    with pytest.raises(DataError, match=r"data.dataset_rows='lines' goes with data.dataset_name"):
        make_dm(tmp_path, tokenizer_dir, train_files=["x.txt"], dataset_rows="lines")


def test_an_empty_dataset_names_the_dataset_settings(tmp_path, tokenizer_dir):
    folder = _parquet_dataset(tmp_path / "empty", train=["", "  ", None])
    with pytest.raises(DataError, match=r"empty corpus: no non-empty documents in .*; check data.dataset_name / "
                                        r"data.split / data.text_field$"):
        prepared(make_dm(tmp_path, tokenizer_dir, dataset_name=folder, val_fraction=0.0))


def test_paragraphs_split_on_blank_lines_with_spaces_or_crlf(tmp_path):
    """text_unit=paragraph: a blank line holding spaces/tabs, or ending in CRLF, separates paragraphs too."""
    paras = ["first paragraph\nwith two lines", "second", "third one"]
    for name, text in [("lf.txt", "first paragraph\nwith two lines\n\nsecond\n\n\nthird one\n"),
                       ("spaces.txt", "first paragraph\nwith two lines\n   \nsecond\n\t\n\nthird one\n"),
                       ("crlf.txt", "first paragraph\r\nwith two lines\r\n\r\nsecond\r\n \r\nthird one\r\n")]:
        (tmp_path / name).write_bytes(text.encode())
        got = list(data_mod.read_documents(tmp_path / name, text_unit="paragraph"))
        assert [d.replace("\r\n", "\n") for d in got] == paras, (name, got)
        assert not any(d.endswith(("\r", "\n")) for d in got), (name, got)


def test_paragraphs_are_read_a_line_at_a_time_as_the_whole_text_split_them(tmp_path, monkeypatch):
    """Read a line at a time (a multi-GB text dump in paragraph mode was read whole): the same paragraphs as
    splitting the whole text at blank lines, on 3,000 random texts of the characters that matter."""
    import random
    import re

    monkeypatch.setattr(data_mod, "READ_CHUNK", 16)  # lines longer than the read buffer too
    whole = re.compile(r"\r?\n(?:[ \t]*\r?\n)+")  # the rule as it was, on the whole text
    rng, p = random.Random(0), tmp_path / "t.txt"
    for _ in range(3000):
        text = "".join(rng.choice("ab \t\r\n\n") for _ in range(rng.randint(0, 40)))
        if rng.random() < 0.1:
            text = "\ufeff" + text
        p.write_bytes(text.encode())
        expected = [para.strip("\r\n") for para in whole.split(text.removeprefix("\ufeff")) if para.strip()]
        assert list(data_mod.read_documents(p, text_unit="paragraph")) == expected, repr(text)
    p.write_bytes(b"one\n\ntwo \xff\n")
    with pytest.raises(data_mod.BadFileError, match="not UTF-8 \\(byte 9\\)"):
        next(data_mod.read_documents(p, text_unit="paragraph"))  # checked before the first paragraph


@pytest.mark.parametrize("stride, windows", [(3, 7), (5, 5), (7, 4), (8, 3)])
def test_strided_windows_predict_every_token_once(tmp_path, stride, windows):
    """3 blocks of 8 tokens = a stream of 24. Windows every `stride` tokens (plus one ending at the stream's
    end) score only their new targets: below block_size every token but the first is scored exactly once,
    with the most context a window gives; at stride 8 the windows are the blocks, first tokens unscored."""
    from gpt2dist.data import StridedWindows, TokenBlocks

    stream = np.arange(24, dtype=np.uint16)
    stream.tofile(tmp_path / "val.bin")
    view = StridedWindows(TokenBlocks(tmp_path / "val.bin", 8, np.uint16), stride)
    assert len(view) == windows
    scored = []
    for k in range(len(view)):
        item = view[k]
        ids, n = item["input_ids"].tolist(), int(item["scored"])
        assert len(ids) == 8 and ids == list(range(ids[0], ids[0] + 8)) and item["loss_weight"] == 1.0
        scored += ids[8 - n:]  # targets: the tokens the last n positions predict
    expected = [t for t in range(1, 24) if t % 8] if stride == 8 else list(range(1, 24))
    assert scored == expected
    assert view[len(view)]["loss_weight"] == 0.0  # padding past the end (uneven shards) weighs nothing


def test_token_blocks_go_to_spawned_loader_workers_by_path_not_by_content(tmp_path):
    """A memmap pickles as its whole data: each spawned loader worker (macOS's default) held a private copy
    of the split. Pickled by path, the pickle stays small and the workers read the same blocks."""
    import pickle

    from torch.utils.data import DataLoader

    from gpt2dist.data import StridedWindows, TokenBlocks

    np.arange(64 * 1000, dtype=np.uint16).tofile(tmp_path / "train.bin")  # 1,000 blocks of 64: 128 KB
    blocks = TokenBlocks(tmp_path / "train.bin", 64, np.uint16)
    for ds in (blocks, StridedWindows(blocks, 48)):
        raw = pickle.dumps(ds)
        assert len(raw) < (8_000 if isinstance(ds, TokenBlocks) else 40_000), len(raw)  # the window starts: ints
        copy = pickle.loads(raw)
        assert len(copy) == len(ds) and all(torch.equal(copy[i]["input_ids"], ds[i]["input_ids"]) for i in (0, 7, len(ds) - 1))
    loader = DataLoader(blocks, batch_size=100, num_workers=1, multiprocessing_context="spawn")
    assert torch.equal(torch.cat([b["input_ids"] for b in loader]), torch.arange(64 * 1000).view(1000, 64))


def test_eval_stride_is_checked_against_block_size(corpus_dir, tokenizer_dir, tmp_path):
    for bad in (0, 65):
        with pytest.raises(DataError, match=rf"^data.eval_stride={bad} must be in \[1, data.block_size=64\]"):
            TokenBlockDataModule(train_files=[str(corpus_dir / "*.txt")], tokenizer=str(tokenizer_dir), block_size=64,
                                 cache_dir=str(tmp_path), eval_stride=bad)


def test_predict_file_glob_reads_every_match_in_name_order_and_errors_name_the_predict_field(tmp_path, tokenizer_dir,
                                                                                            corpus_dir):
    """A glob matching several prompt files crashed (`[path] = ...`: too many values to unpack), although the
    folder error suggests a glob; a record without the prompt field named data.text_field, which predict
    does not read."""
    prompts = tmp_path / "prompts"
    prompts.mkdir()
    (prompts / "b.txt").write_text("import \n\nclass \n")
    (prompts / "a.jsonl").write_text('{"prompt": "def "}\n{"prompt": "for "}\n')
    dm = make_dm(tmp_path, tokenizer_dir, train_files=[str(corpus_dir / "*.txt")], predict_file=str(prompts / "*"))
    assert dm.prompts_with_origin() == [(f"{prompts / 'a.jsonl'} record 1", "def "), (f"{prompts / 'a.jsonl'} record 2", "for "),
                                        (f"{prompts / 'b.txt'}:1", "import "), (f"{prompts / 'b.txt'}:3", "class ")]
    (tmp_path / "bad.jsonl").write_text('{"prompt": "def "}\n{"text": "x"}\n')
    (tmp_path / "bad.csv").write_text("text\nx\n")
    # A null prompt is an error, not skipped (as in training data): each prompt is a row of output.
    (tmp_path / "null.jsonl").write_text('{"prompt": "def "}\n{"prompt": null}\n{"prompt": "for "}\n')
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"prompt": ["def ", None]}), tmp_path / "null.parquet")
    # JSON's "\ud83d" (an emoji cut in half) parses to a lone surrogate: the tokenizer's TypeError, a traceback.
    (tmp_path / "half.jsonl").write_text('{"prompt": "ok"}\n{"prompt": "abc \\ud83d def"}\n')
    for name, says in [("bad.jsonl", f"{tmp_path / 'bad.jsonl'}:2: record has no field 'prompt'; set data.predict_text_field"),
                       ("bad.csv", f"{tmp_path / 'bad.csv'}: no column 'prompt' (has ['text']); set data.predict_text_field"),
                       ("null.jsonl", f"{tmp_path / 'null.jsonl'}:2: field 'prompt' is null, not a string"),
                       ("null.parquet", f"{tmp_path / 'null.parquet'}: row 2 of column 'prompt' is null, not a string"),
                       ("half.jsonl", f"{tmp_path / 'half.jsonl'}:2: field 'prompt' holds a lone surrogate (U+D83D at "
                                      "character 4), not valid Unicode; repair or drop that record")]:
        dm = make_dm(tmp_path, tokenizer_dir, train_files=[str(corpus_dir / "*.txt")], predict_file=str(tmp_path / name))
        with pytest.raises(DataError) as e:
            dm.prompts_with_origin()
        assert str(e.value).startswith(says), str(e.value)


def test_a_prompt_line_ends_at_a_line_end_only(tmp_path, tokenizer_dir, corpus_dir):
    """splitlines() also split at a form feed (in source files), U+2028 (in web text) and other separators:
    two lines read as four prompts, every later output row and file:N shifted."""
    p = tmp_path / "prompts.txt"
    p.write_bytes("def f():\x0c  return 1\nclass A\u2028B:\r\nx\x1cy\rlast".encode())
    dm = make_dm(tmp_path, tokenizer_dir, train_files=[str(corpus_dir / "*.txt")], predict_file=str(p))
    assert dm.prompts_with_origin() == [(f"{p}:1", "def f():\x0c  return 1"), (f"{p}:2", "class A\u2028B:"),
                                        (f"{p}:3", "x\x1cy"), (f"{p}:4", "last")]


def test_only_predict_goes_without_training_data(tmp_path, tokenizer_dir, corpus_dir):
    """The training source is refused where data is packed (prepare_data, setup for fit/validate/test), not at
    construction: predict loads a tokenizer only. A tokenizer trained at fit is found by the fit's data section."""
    dm = make_dm(tmp_path, tokenizer_dir, predict_prompts=["def "])
    with pytest.raises(DataError, match="^no training data: set data.train_files"):
        dm.prepare_data()
    with pytest.raises(DataError, match="^no training data: set data.train_files"):
        dm.setup("fit")
    dm.setup("predict")
    assert dm.tokenizer is not None and len(dm.tokenizer) == 512
    trained = TokenBlockDataModule(train_files=[str(corpus_dir / "*.txt")], train_tokenizer_vocab_size=300,
                                   cache_dir=str(tmp_path / "other"), block_size=64)
    with pytest.raises(DataError, match=r"^trained tokenizer .* is missing; predict with the data section of the fit.*hf_model"):
        trained.setup("predict")
    untrained = TokenBlockDataModule(train_tokenizer_vocab_size=300, cache_dir=str(tmp_path / "other"), block_size=64)
    with pytest.raises(DataError, match="^no training data"):  # its key is the training corpus's
        untrained.setup("predict")
