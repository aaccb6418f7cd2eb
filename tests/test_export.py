"""gpt2dist/export.py: atomic Hugging Face folders and safe checkpoint loading."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

from gpt2dist.errors import CheckpointError
from gpt2dist.export import load_checkpoint_file, save_hf_folder

from conftest import TINY


def tiny_model(seed: int) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(**TINY, vocab_size=300))


def test_save_replaces_atomically_and_loads(tmp_path, tokenizer):
    out = tmp_path / "hf"
    save_hf_folder(tiny_model(0), tokenizer, out)
    save_hf_folder(tiny_model(1), tokenizer, out)  # replaces the first export
    loaded = AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    ref = tiny_model(1)
    for k, v in ref.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # no temporaries left


def test_crash_during_export_keeps_the_previous_folder(tmp_path, tokenizer, monkeypatch):
    out = tmp_path / "hf"
    save_hf_folder(tiny_model(0), tokenizer, out)
    before = (out / "model.safetensors").read_bytes()
    model = tiny_model(1)

    def crash(path, **kw):
        (path / "model.safetensors").write_bytes(b"partial")
        raise OSError("No space left on device")

    monkeypatch.setattr(model, "save_pretrained", crash)
    with pytest.raises(OSError, match="No space left"):
        save_hf_folder(model, tokenizer, out)
    assert (out / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


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
