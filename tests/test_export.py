"""Export: every checkpoint kind is recognised, a single-file checkpoint exports exactly, bad
input names the culprit, and an interrupted export never leaves a half-written OUT_DIR."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO, TINY
from gpt2dist.errors import CheckpointError
from gpt2dist.export import checkpoint_kind, export_checkpoint, load_checkpoint_file, save_hf_folder


def _tiny_checkpoint(path, tokenizer_dir):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=512, **TINY))
    ckpt = {"gpt2_config": model.config.to_dict(), "tokenizer_name_or_path": str(tokenizer_dir),
            "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}}
    torch.save(ckpt, path)
    return model


def test_single_file_checkpoint_exports_exactly(tmp_path, tokenizer_dir):
    from transformers import GPT2LMHeadModel

    model = _tiny_checkpoint(tmp_path / "x.ckpt", tokenizer_dir)
    out = export_checkpoint(tmp_path / "x.ckpt", tmp_path / "hf")
    x = torch.arange(64).view(2, 32)
    with torch.no_grad():
        assert torch.equal(GPT2LMHeadModel.from_pretrained(str(out)).eval()(x).logits, model.eval()(x).logits)
    assert (out / "tokenizer.json").exists()


def test_checkpoint_kinds(tmp_path, tokenizer_dir):
    _tiny_checkpoint(tmp_path / "x.ckpt", tokenizer_dir)
    (tmp_path / "distcp").mkdir()
    (tmp_path / "distcp" / ".metadata").write_bytes(b"")
    (tmp_path / "ds" / "checkpoint").mkdir(parents=True)
    (tmp_path / "ds" / "latest").write_text("checkpoint")
    (tmp_path / "other").mkdir()
    assert [checkpoint_kind(tmp_path / n) for n in ("x.ckpt", "distcp", "ds")] == ["file", "distcp", "deepspeed"]
    with pytest.raises(CheckpointError, match="neither a distributed checkpoint"):
        checkpoint_kind(tmp_path / "other")
    with pytest.raises(CheckpointError, match="does not exist"):
        checkpoint_kind(tmp_path / "missing.ckpt")
    with pytest.raises(CheckpointError, match="cannot be read"):  # .metadata but no shards
        export_checkpoint(tmp_path / "distcp", tmp_path / "hf")


def test_interrupted_export_leaves_no_half_written_dir(tmp_path, tokenizer_dir, monkeypatch):
    from transformers import GPT2LMHeadModel

    _tiny_checkpoint(tmp_path / "x.ckpt", tokenizer_dir)
    out = tmp_path / "hf"
    export_checkpoint(tmp_path / "x.ckpt", out)
    before = {f.name: f.read_bytes() for f in out.iterdir()}
    real = GPT2LMHeadModel.save_pretrained

    def crash(self, save_directory, **kw):
        real(self, save_directory, **kw)  # the weights are written, then the "machine dies"
        raise KeyboardInterrupt

    monkeypatch.setattr(GPT2LMHeadModel, "save_pretrained", crash)
    with pytest.raises(KeyboardInterrupt):
        export_checkpoint(tmp_path / "x.ckpt", tmp_path / "fresh")
    with pytest.raises(KeyboardInterrupt):
        export_checkpoint(tmp_path / "x.ckpt", out)
    assert not (tmp_path / "fresh").exists()
    assert {f.name: f.read_bytes() for f in out.iterdir()} == before  # the old export is untouched
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp folders left


def test_export_tool_error_is_one_line(tmp_path):
    p = subprocess.run([sys.executable, str(REPO / "tools/export_hf.py"), str(tmp_path / "nope.ckpt"), str(tmp_path / "o")],
                       capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert p.returncode == 2
    assert p.stderr.strip().splitlines()[-1].startswith("export_hf: error: checkpoint") and "does not exist" in p.stderr
    assert not (tmp_path / "o").exists()


def tiny_model(seed: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(**TINY, vocab_size=300))


def test_save_replaces_atomically_and_loads(tmp_path, tokenizer):
    out = tmp_path / "hf"
    save_hf_folder(tiny_model(0), tokenizer, out)
    save_hf_folder(tiny_model(1), tokenizer, out)  # replaces the first export
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    ref = tiny_model(1)
    for k, v in ref.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # no temporaries left


def test_corrupt_or_missing_checkpoint_is_named(tmp_path):
    good = tmp_path / "good.ckpt"
    torch.save({"state_dict": tiny_model(0).state_dict(), "gpt2_config": {}}, good)
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])  # truncated
    with pytest.raises(CheckpointError, match="bad.ckpt is truncated or corrupt"):
        load_checkpoint_file(bad)
    with pytest.raises(CheckpointError, match="nope.ckpt does not exist"):
        load_checkpoint_file(tmp_path / "nope.ckpt")
    assert "state_dict" in load_checkpoint_file(good)
