"""Export: every checkpoint kind is recognised, a single-file checkpoint exports exactly, bad
input names the culprit, and an interrupted export never leaves a half-written OUT_DIR."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO, TINY, corpus_texts
from gpt2dist.errors import CheckpointError, GPT2DistError
from gpt2dist.export import EXPORT_MARKER, checkpoint_kind, export_checkpoint, load_checkpoint_file, save_hf_folder


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


def test_export_refuses_another_tokenizer_than_the_checkpoints(tmp_path, tokenizer_dir, tokenizer):
    """validate, test and predict refuse a checkpoint under another tokenizer; the export paired the weights
    with any --tokenizer of a size that fits, and the folder then generated other text with nothing to check.
    A copy of the recorded tokenizer (moved elsewhere) is the same tokenizer and passes."""
    import shutil

    from gpt2dist.tokenizer import tokenizer_identity, train_bpe_tokenizer

    _tiny_checkpoint(tmp_path / "x.ckpt", tokenizer_dir)
    ckpt = torch.load(tmp_path / "x.ckpt", weights_only=True)
    ckpt["tokenizer_identity"] = tokenizer_identity(tokenizer)
    torch.save(ckpt, tmp_path / "x.ckpt")
    train_bpe_tokenizer(corpus_texts()[:4], 512, tmp_path / "other")  # same size, other merges
    p = subprocess.run([sys.executable, str(REPO / "tools/export_hf.py"), str(tmp_path / "x.ckpt"), str(tmp_path / "hf"),
                        "--tokenizer", str(tmp_path / "other")], capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and p.stderr.strip().splitlines()[-1] == (
        f"export_hf: error: {tmp_path / 'other'} is not the tokenizer {tmp_path / 'x.ckpt'} was trained with "
        f"({tokenizer_dir}): its token ids mean other text; pass --tokenizer DIR with that tokenizer (or a copy of it)"), p.stderr
    assert not (tmp_path / "hf").exists()
    shutil.copytree(tokenizer_dir, tmp_path / "moved")
    assert (export_checkpoint(tmp_path / "x.ckpt", tmp_path / "hf", tokenizer=str(tmp_path / "moved")) / "tokenizer.json").is_file()


def test_a_file_that_is_not_a_checkpoint_dict_is_one_line(tmp_path):
    """A .pt holding a bare tensor (or a list) loads weights-only, and `"gpt2_config" in tensor` raised a
    RuntimeError traceback from tools/export_hf.py."""
    for name, obj in (("tensor.pt", torch.zeros(3)), ("list.pt", [1, 2]), ("plain.pt", {"weights": torch.zeros(2)})):
        torch.save(obj, tmp_path / name)
        p = subprocess.run([sys.executable, str(REPO / "tools/export_hf.py"), str(tmp_path / name), str(tmp_path / "hf")],
                           capture_output=True, text=True, timeout=300)
        assert p.returncode == 2 and p.stderr.strip().splitlines()[-1] == (
            f"export_hf: error: {tmp_path / name} is not a gpt2dist checkpoint (no gpt2_config/state_dict)"), p.stderr
        assert not (tmp_path / "hf").exists()


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


def test_a_deepspeed_folder_that_needs_a_full_unpickle_is_refused_unread(tmp_path):
    """DeepSpeed's zero_to_fp32 unpickles in full: a crafted optimizer-state file ran its code before
    the export failed. Its globals are checked first; only DeepSpeed's own classes pass."""
    folder = tmp_path / "ds"
    (folder / "checkpoint").mkdir(parents=True)
    (folder / "latest").write_text("checkpoint")
    marker = tmp_path / "ran"
    torch.save({"global_step": 3, "ds_version": _RunsCode(str(marker))}, folder / "checkpoint" / "mp_rank_00_model_states.pt")
    p = subprocess.run([sys.executable, str(REPO / "tools" / "export_hf.py"), str(folder), str(tmp_path / "hf")],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and not marker.exists() and not (tmp_path / "hf").exists(), p.stderr[-2000:]
    assert re.fullmatch(  # open is builtins.open or io.open, as the pickler found it
        rf"export_hf: error: DeepSpeed checkpoint {re.escape(str(folder))}: mp_rank_00_model_states.pt "
        r"needs (builtins|io)\.open to load, which neither gpt2dist nor DeepSpeed saves and which could run code; it is not loaded",
        p.stderr.strip().splitlines()[-1]), p.stderr[-2000:]


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
    assert "--ckpt_path" not in p.stderr  # the tool has no such option
    assert not (tmp_path / "o").exists()


def test_a_failed_swap_puts_the_previous_export_back(tmp_path, tokenizer_dir, monkeypatch):
    """Interrupted between moving the previous export aside and renaming the new one in: the previous one
    stayed hidden as .hf.old-PID and the folder was gone. The aside name was the pid, so a leftover of
    a killed process with the same pid (common in containers) made every later export fail."""
    _tiny_checkpoint(tmp_path / "x.ckpt", tokenizer_dir)
    out = tmp_path / "hf"
    export_checkpoint(tmp_path / "x.ckpt", out)
    before = {f.name: f.read_bytes() for f in out.iterdir()}
    (tmp_path / f".hf.old-{os.getpid()}").mkdir()
    (tmp_path / f".hf.old-{os.getpid()}" / "model.safetensors").write_bytes(b"left by a killed export")
    real = os.replace

    def interrupted(src, dst):
        if Path(src).name.startswith(".hf.tmp-"):
            raise KeyboardInterrupt  # after the previous export was moved aside
        return real(src, dst)

    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        export_checkpoint(tmp_path / "x.ckpt", out)
    assert {f.name: f.read_bytes() for f in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == [f".hf.old-{os.getpid()}"]
    monkeypatch.setattr(os, "replace", real)
    export_checkpoint(tmp_path / "x.ckpt", out)  # the leftover does not stand in the way
    assert {f.name: f.read_bytes() for f in out.iterdir()} == before


READ_ONLY_PARENT = """
import os, sys
from pathlib import Path
from gpt2dist.errors import GPT2DistError
from gpt2dist.export import check_export_target
out = Path(sys.argv[1])
os.chmod(out.parent, 0o555)
try:
    check_export_target(out, "the fix")
except GPT2DistError as e:
    print(e)
finally:
    os.chmod(out.parent, 0o755)
"""


def test_an_existing_export_folder_in_a_read_only_parent_is_refused_before_training(tmp_path):
    """The new export is written beside the old one, then swapped in: with the parent read-only, the check
    passed and the export failed after training with a PermissionError traceback. Root ignores modes,
    so as root the check runs without the capability to (setpriv)."""
    out = tmp_path / "shared" / "mine"
    out.mkdir(parents=True)
    cmd = [sys.executable, "-c", READ_ONLY_PARENT, str(out)]
    if os.geteuid() == 0:
        caps = "-dac_override,-dac_read_search"
        cmd = ["setpriv", f"--inh-caps={caps}", f"--bounding-set={caps}", *cmd]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
    if p.returncode and p.stderr.startswith("setpriv:"):
        pytest.skip(f"cannot drop root's file-mode override here: {p.stderr.strip()}")
    assert p.stdout.strip() == f"export folder {out} cannot be replaced: {out.parent} is not writable; the fix", \
        (p.stdout, p.stderr[-2000:])


def test_an_export_without_a_tokenizer_or_an_untied_head_is_refused(tmp_path, tokenizer_dir):
    """A checkpoint that records no tokenizer exported without one, and transformers then loaded a
    one-token tokenizer from the folder; an untied model without lm_head.weight got a random head."""
    from transformers import AutoTokenizer

    _tiny_checkpoint(tmp_path / "x.ckpt", tokenizer_dir)
    ckpt = torch.load(tmp_path / "x.ckpt", weights_only=True)
    del ckpt["tokenizer_name_or_path"]
    torch.save(ckpt, tmp_path / "notok.ckpt")
    p = subprocess.run([sys.executable, str(REPO / "tools/export_hf.py"), str(tmp_path / "notok.ckpt"), str(tmp_path / "hf")],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and p.stderr.strip().splitlines()[-1] == (
        f"export_hf: error: {tmp_path / 'notok.ckpt'} records no tokenizer (it was trained without gpt2dist's data module); "
        "pass --tokenizer DIR, the tokenizer it was trained with (or --no-tokenizer: the model alone)"), p.stderr[-2000:]
    assert not (tmp_path / "hf").exists()
    p = subprocess.run([sys.executable, str(REPO / "tools/export_hf.py"), str(tmp_path / "notok.ckpt"), str(tmp_path / "alone"),
                        "--no-tokenizer"], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and (tmp_path / "alone" / "model.safetensors").is_file(), p.stderr[-2000:]
    assert not list((tmp_path / "alone").glob("tokenizer*"))
    p = subprocess.run([sys.executable, str(REPO / "tools/export_hf.py"), str(tmp_path / "notok.ckpt"), str(tmp_path / "both"),
                        "--no-tokenizer", "--tokenizer", str(tokenizer_dir)], capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and "not allowed with argument" in p.stderr and not (tmp_path / "both").exists(), p.stderr
    with pytest.raises(CheckpointError, match="both given; give one"):
        export_checkpoint(tmp_path / "notok.ckpt", tmp_path / "both", tokenizer=str(tokenizer_dir), no_tokenizer=True)
    out = export_checkpoint(tmp_path / "notok.ckpt", tmp_path / "hf", tokenizer=str(tokenizer_dir))
    assert len(AutoTokenizer.from_pretrained(out)) == len(AutoTokenizer.from_pretrained(tokenizer_dir))
    ckpt["gpt2_config"]["tie_word_embeddings"] = False
    ckpt["state_dict"].pop("model.lm_head.weight", None)
    torch.save(ckpt, tmp_path / "untied.ckpt")  # no lm_head.weight: only a tied head may be left out
    with pytest.raises(CheckpointError, match=r"untied.ckpt does not match its config: missing \['lm_head.weight'\]"):
        export_checkpoint(tmp_path / "untied.ckpt", tmp_path / "hf2", tokenizer=str(tokenizer_dir))


def _tree(root):
    return {str(p.relative_to(root)): p.read_bytes() if p.is_file() else None for p in sorted(root.rglob("*"))}


def test_export_tool_refuses_a_folder_it_did_not_write(tmp_path, tokenizer_dir):
    """`export_hf.py runs/G/checkpoints/last.ckpt runs/G` once replaced the whole run folder."""
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    _tiny_checkpoint(run / "checkpoints" / "last.ckpt", tokenizer_dir)
    (run / "logs").mkdir()
    (run / "logs" / "metrics.csv").write_text("step,loss\n")
    before = _tree(run)
    p = subprocess.run([sys.executable, str(REPO / "tools/export_hf.py"), str(run / "checkpoints" / "last.ckpt"), str(run)],
                       capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert p.returncode == 2, p.stderr
    assert p.stderr.strip().splitlines() == [
        f"export_hf: error: export folder {run} exists and is not a previous Hugging Face export (it holds "
        f"checkpoints/, logs/); the export replaces the whole folder, so choose an empty or new folder"]
    assert _tree(run) == before
    assert [p.name for p in tmp_path.iterdir()] == ["run"]  # no temporaries left


def test_export_refuses_foreign_content_and_files(tmp_path, tokenizer_dir):
    _tiny_checkpoint(tmp_path / "x.ckpt", tokenizer_dir)
    notes = tmp_path / "notes"
    (notes / "sub").mkdir(parents=True)
    (notes / "notes.txt").write_text("mine")
    (notes / "sub" / "a.txt").write_text("also mine")
    a_file = tmp_path / "out.bin"
    a_file.write_bytes(b"precious")
    before = _tree(tmp_path)
    with pytest.raises(GPT2DistError, match=r"notes exists and is not a previous .* \(it holds notes.txt, sub/\)"):
        export_checkpoint(tmp_path / "x.ckpt", notes)
    with pytest.raises(GPT2DistError, match=r"out.bin is a file, which the export would replace; choose an empty"):
        export_checkpoint(tmp_path / "x.ckpt", a_file)
    with pytest.raises(GPT2DistError, match="is not a previous Hugging Face export"):
        save_hf_folder(tiny_model(0), None, notes)
    assert _tree(tmp_path) == before  # nothing moved, renamed or added


def test_export_replaces_only_a_previous_export(tmp_path, tokenizer):
    out = tmp_path / "hf"
    save_hf_folder(tiny_model(0), tokenizer, out)
    assert (out / EXPORT_MARKER).is_file()
    save_hf_folder(tiny_model(1), tokenizer, out)  # its own previous export: replaced
    (out / EXPORT_MARKER).unlink()  # as written before the marker existed: still recognised by its files
    save_hf_folder(tiny_model(2), tokenizer, out)
    from safetensors.torch import load_file

    assert torch.equal(load_file(out / "model.safetensors")["transformer.wte.weight"], tiny_model(2).transformer.wte.weight)
    (out / "README.md").write_text("my notes")  # the user added something: no longer the export's to delete
    with pytest.raises(GPT2DistError, match=r"it holds .*README.md"):
        save_hf_folder(tiny_model(3), tokenizer, out)
    assert (out / "README.md").read_text() == "my notes"
    (out / "README.md").unlink()
    empty = tmp_path / "empty"
    empty.mkdir()
    save_hf_folder(tiny_model(3), None, empty)  # an empty folder may be filled
    assert (empty / "config.json").is_file()


def test_export_tool_names_its_own_tokenizer_option(tmp_path, tokenizer_dir, capsys):
    """The tool has no config: a tokenizer it cannot load is fixed with --tokenizer, not data.tokenizer."""
    sys.path.insert(0, str(REPO / "tools"))
    import export_hf

    _tiny_checkpoint(tmp_path / "x.ckpt", tmp_path / "moved_tokenizer")  # recorded, no longer there
    assert export_hf.main([str(tmp_path / "x.ckpt"), str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"export_hf: error: cannot load tokenizer '{tmp_path / 'moved_tokenizer'}'")
    assert err[0].endswith("it is the tokenizer the checkpoint recorded at training time: pass --tokenizer DIR "
                           "with that tokenizer's folder (e.g. where it was moved)"), err
    assert export_hf.main([str(tmp_path / "x.ckpt"), str(tmp_path / "o"), "--tokenizer", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"export_hf: error: cannot load tokenizer '{tmp_path / 'nope'}'")
    assert err[0].endswith("; pass --tokenizer DIR, a local tokenizer folder") and "data.tokenizer" not in err[0]
    assert not (tmp_path / "o").exists()
    assert export_hf.main([str(tmp_path / "x.ckpt"), str(tmp_path / "o"), "--tokenizer", str(tokenizer_dir)]) == 0
    assert (tmp_path / "o" / "tokenizer.json").is_file()


def tiny_model(seed: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(**TINY, vocab_size=512))  # the test tokenizer's 512 tokens


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


def test_exported_tokenizer_knows_the_context_length(tmp_path, tokenizer_dir, tokenizer):
    """The trained tokenizer has no limit (model_max_length 1e30): exported as is, `pipeline` fed the
    model prompts longer than n_positions (IndexError: index out of range in self)."""
    from transformers import AutoTokenizer, pipeline

    from gpt2dist.tokenizer import load_tokenizer

    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(**TINY, vocab_size=512))  # the tokenizer's vocabulary
    assert tokenizer.model_max_length > 10**20
    out = save_hf_folder(model, tokenizer, tmp_path / "hf")
    assert tokenizer.model_max_length > 10**20  # the caller's tokenizer is unchanged
    assert AutoTokenizer.from_pretrained(out).model_max_length == TINY["n_positions"] == 64
    long_prompt = "def f(x):\n    return x\n" * 40
    assert len(tokenizer(long_prompt)["input_ids"]) > 64
    generate = pipeline("text-generation", str(out))
    text = generate(long_prompt, max_new_tokens=4, do_sample=False, handle_long_generation="hole")[0]["generated_text"]
    assert text.startswith(long_prompt) and len(text) > len(long_prompt)
    assert len(generate.tokenizer(long_prompt, truncation=True)["input_ids"]) == 64
    shorter = load_tokenizer(str(tokenizer_dir))
    shorter.model_max_length = 32  # a smaller limit the user chose is kept
    assert AutoTokenizer.from_pretrained(save_hf_folder(model, shorter, tmp_path / "hf32")).model_max_length == 32


@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_export_has_the_modes_of_any_new_folder(tmp_path, tokenizer, mask):
    """mkdtemp made hf_model 0700 and safetensors wrote model.safetensors 0600: unreadable to others."""
    import stat

    old = os.umask(mask)
    try:
        out = save_hf_folder(tiny_model(0), tokenizer, tmp_path / "hf")
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~mask
    files = {f.name: stat.S_IMODE(f.stat().st_mode) for f in out.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", EXPORT_MARKER} <= set(files)
    assert files == dict.fromkeys(files, 0o666 & ~mask)


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
    # Whole, but with an object only a full unpickle reads: refused for that, not called truncated (the
    # message also carried torch's ANSI-bold fragment).
    marker = tmp_path / "ran"
    torch.save({"state_dict": tiny_model(0).state_dict(), "gpt2_config": {}, "extra": _RunsCode(str(marker))},
               tmp_path / "pickled.ckpt")
    with pytest.raises(CheckpointError, match=r"pickled.ckpt: it holds objects that only a full unpickle reads.*"
                                              r"not loaded; export a checkpoint gpt2dist wrote$") as e:
        load_checkpoint_file(tmp_path / "pickled.ckpt")
    assert "\x1b" not in str(e.value) and not marker.exists()


class _RunsCode:
    """Unpickling this runs code (touches a file): what a crafted checkpoint entry would do."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_sharded_folder_with_a_pickled_object_is_refused_without_running_it(tmp_path):
    """torch's distributed-checkpoint planner unpickles non-tensor entries in full (weights_only=False):
    exporting a crafted FSDP folder ran its code."""
    import torch.distributed.checkpoint as dcp

    marker = tmp_path / "ran"
    state = {"state_dict": {"model.x": torch.zeros(2), "model.y": _RunsCode(str(marker))}}  # among the weights, which are read
    with pytest.warns(UserWarning, match="single process"):
        dcp.save(state, checkpoint_id=str(tmp_path / "ckpt"), no_dist=True)
    with pytest.raises(CheckpointError, match=r"holds objects that only a full unpickle reads.*not loaded$"):
        export_checkpoint(tmp_path / "ckpt", tmp_path / "hf")
    assert not marker.exists() and not (tmp_path / "hf").exists()


def test_a_sharded_folders_metadata_pickle_is_read_weights_only_by_export_and_resume(tmp_path):
    """torch's FileSystemReader unpickles .metadata in full: exporting a crafted folder ran its code (and a
    resume would have, in Lightning's loader). Now refused, naming the global, before anything is called;
    a real folder's .metadata (dataclasses, dtypes, Size, layouts, paths) still loads."""
    import pickle

    import torch.distributed.checkpoint as dcp

    from gpt2dist.resume import _progress, read_distcp_metadata

    good = tmp_path / "good"
    with pytest.warns(UserWarning, match="single process"):
        dcp.save({"state_dict": {"model.x": torch.zeros(2, 3, dtype=torch.bfloat16)}, "global_step": 3},
                 checkpoint_id=str(good), no_dist=True)
    assert set(read_distcp_metadata(good).state_dict_metadata) == {"state_dict.model.x", "global_step"}
    marker = tmp_path / "ran"
    bad = tmp_path / "bad"
    shutil.copytree(good, bad)
    (bad / ".metadata").write_bytes(pickle.dumps(_RunsCode(str(marker))))
    torch.save({"global_step": 3}, bad / "meta.pt")
    with pytest.raises(CheckpointError, match=r"^sharded checkpoint .*bad: .metadata needs io.open to load; it "
                                              r"holds objects that only a full unpickle reads.*not loaded$"):
        export_checkpoint(bad, tmp_path / "hf")
    progress, why = _progress(bad)  # resume's look at a candidate: unreadable, not resumed by Lightning
    assert progress is None and "needs io.open" in why
    assert not marker.exists() and not (tmp_path / "hf").exists()


def test_export_targets_under_a_file_or_the_current_folder(tmp_path, tokenizer_dir, monkeypatch):
    """Under a file: a FileExistsError traceback after the checkpoint had loaded. Exporting to "." (an empty
    cwd) was refused, blaming the export's own temporary folder, made inside it ("." has "." for parent)."""
    _tiny_checkpoint(tmp_path / "x.ckpt", tokenizer_dir)
    (tmp_path / "afile").write_text("")
    with pytest.raises(GPT2DistError, match=rf"^export folder {tmp_path}/afile/out cannot be created: {tmp_path}/afile is a file"):
        export_checkpoint(tmp_path / "x.ckpt", tmp_path / "afile" / "out")
    (tmp_path / "here").mkdir()
    monkeypatch.chdir(tmp_path / "here")
    out = export_checkpoint(tmp_path / "x.ckpt", ".")
    assert out == tmp_path / "here" and (out / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temporary left beside it


def test_a_tokenizer_larger_than_the_vocabulary_is_not_exported(tmp_path, tokenizer_dir):
    """It exported, and the folder's first generate raised IndexError (ids past the embedding)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(vocab_size=200, **TINY))
    torch.save({"gpt2_config": model.config.to_dict(), "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}},
               tmp_path / "small.ckpt")
    with pytest.raises(GPT2DistError, match=r"^the tokenizer has 512 tokens but the model's vocab_size is 200: export it "
                                            r"with the tokenizer it was trained with \(tools/export_hf.py --tokenizer DIR\)$"):
        export_checkpoint(tmp_path / "small.ckpt", tmp_path / "hf", tokenizer=str(tokenizer_dir))
    assert not (tmp_path / "hf").exists()


def test_leftovers_of_dead_exports_are_removed_whatever_the_folder_name(tmp_path):
    """The folder's name went into the glob unescaped: `hf[v2]` read as a character class, and a killed export's
    model-sized temporary folder beside it stayed for good. A live process's temporary stays."""
    from gpt2dist.export import _HOST, remove_dead_exports

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout.strip()
    for name in ("hf_model", "hf[v2]", "out*?"):
        gone = tmp_path / f".{name}.tmp-{_HOST}-{dead}-abcd1234"
        alive = tmp_path / f".{name}.tmp-{_HOST}-{os.getpid()}-efgh5678"
        gone.mkdir()
        alive.mkdir()
        assert remove_dead_exports(tmp_path / name) == [gone], name
        assert not gone.exists() and alive.exists()


def test_a_deepspeed_folder_cut_short_is_one_line_not_a_traceback(tmp_path):
    """A truncated model-states file (a full disk, an interrupted copy): torch's zip reader raised out of the
    globals check, before the export's own error handling (exit 1, a 26-line traceback)."""
    folder = tmp_path / "ds"
    (folder / "checkpoint").mkdir(parents=True)
    (folder / "latest").write_text("checkpoint")
    whole = tmp_path / "whole.pt"
    torch.save({"global_step": 3, "module": {"w": torch.zeros(1000)}}, whole)
    (folder / "checkpoint" / "mp_rank_00_model_states.pt").write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    p = subprocess.run([sys.executable, str(REPO / "tools" / "export_hf.py"), str(folder), str(tmp_path / "hf")],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert p.stderr.strip().splitlines()[-1].startswith(
        f"export_hf: error: DeepSpeed checkpoint {folder}: mp_rank_00_model_states.pt is truncated or corrupt"), p.stderr


def test_exporting_a_sharded_folder_reads_the_weights_not_the_optimizer_state(tmp_path, monkeypatch):
    """The distributed-checkpoint load read every tensor, AdamW's moments too (3x the weights' memory: XL 12.5 GB
    more on a login node). Only the state_dict is read."""
    import torch.distributed.checkpoint as dcp

    from gpt2dist.export import load_distcp_folder

    state = {"state_dict": {"model.x": torch.ones(4)}, "optimizer_0": {"state": {"model.x": {"exp_avg": torch.ones(4)}}},
             "global_step": 3}
    with pytest.warns(UserWarning, match="single process"):
        dcp.save(state, checkpoint_id=str(tmp_path / "ckpt"), no_dist=True)
    loaded = load_distcp_folder(tmp_path / "ckpt")
    assert torch.equal(loaded["state_dict"]["model.x"], torch.ones(4)) and "optimizer_0" not in loaded


def test_a_literal_eos_text_run_exports_a_tokenizer_that_reads_it_as_text(tmp_path, tokenizer_dir, tokenizer):
    """data.literal_eos=text trains on a quoted "<|endoftext|>" as its characters (the tokenizer's
    split_special_tokens). save_pretrained leaves that out, and export_checkpoint never set it: the exported
    folder read such text as the document boundary, which this model never saw there."""
    from transformers import AutoTokenizer

    text = "print('<|endoftext|>')"
    as_trained = tokenizer(text, add_special_tokens=False, split_special_tokens=True).input_ids
    assert tokenizer.eos_token_id not in as_trained  # the premise: as characters
    _tiny_checkpoint(tmp_path / "x.ckpt", tokenizer_dir)
    ckpt = torch.load(tmp_path / "x.ckpt", weights_only=True)
    for mode, expected in (("text", as_trained), ("boundary", tokenizer(text, add_special_tokens=False).input_ids)):
        ckpt["datamodule_hyper_parameters"] = {"literal_eos": mode}
        torch.save(ckpt, tmp_path / f"{mode}.ckpt")
        out = export_checkpoint(tmp_path / f"{mode}.ckpt", tmp_path / f"hf_{mode}")
        assert AutoTokenizer.from_pretrained(str(out))(text, add_special_tokens=False).input_ids == expected, mode
