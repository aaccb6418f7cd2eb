"""Write Hugging Face model folders (safetensors + config + tokenizer), atomically.

Checkpoints of every strategy are read: single files, FSDP2/FSDP1 sharded folders (torch
distributed checkpoint) and DeepSpeed ZeRO folders.

Used at the end of `fit` (callbacks.HFExport) and by `tools/export_hf.py` for saved checkpoints.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path

import torch

from gpt2dist.errors import CheckpointError, GPT2DistError

# Written into every export: the files it lists are the export's own, so a later export may replace
# the folder. Anything else in it (checkpoints/, notes) is the user's, and the folder is left alone.
EXPORT_MARKER = ".gpt2dist-export.json"
# What save_pretrained writes for a GPT-2 and its tokenizer: exports written before the marker existed.
_HF_FILES = {"config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json",
             "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
             "added_tokens.json", "chat_template.jinja"}
_HF_SHARD = re.compile(r"model-\d+-of-\d+\.safetensors")


def _is_previous_export(path: Path) -> bool:
    entries = list(path.iterdir())
    if any(p.is_symlink() or not p.is_file() for p in entries):  # checkpoints/, logs/, sub/
        return False
    names = {p.name for p in entries}
    if EXPORT_MARKER in names:
        try:
            own = set(json.loads((path / EXPORT_MARKER).read_text())["files"])
        except (OSError, ValueError, KeyError, TypeError):
            return False
        return names <= own | {EXPORT_MARKER}
    if not names:  # an empty folder
        return True
    return ("config.json" in names and bool(names & {"model.safetensors", "model.safetensors.index.json"})
            and all(n in _HF_FILES or _HF_SHARD.fullmatch(n) for n in names))


def check_export_target(out_dir: str | os.PathLike, fix: str = "choose an empty or new folder") -> None:
    """Refuse an `out_dir` that an export would destroy: only an absent or empty folder, or one that
    holds a previous Hugging Face export and nothing else, may be replaced."""
    out_dir = Path(os.path.abspath(out_dir))  # "." has no parent to write the temporary folder in; symlinks kept
    if not (out_dir.exists() or out_dir.is_symlink()):
        ancestor = out_dir.parent
        while not ancestor.exists():
            ancestor = ancestor.parent
        if not ancestor.is_dir() or not os.access(ancestor, os.W_OK | os.X_OK):
            why = "a file" if not ancestor.is_dir() else "not writable"
            raise GPT2DistError(f"export folder {out_dir} cannot be created: {ancestor} is {why}; {fix}")
        return
    if out_dir.is_symlink() or not out_dir.is_dir():
        what = "a symlink" if out_dir.is_symlink() else "a file"
        raise GPT2DistError(f"export folder {out_dir} is {what}, which the export would replace; {fix}")
    if not os.access(out_dir.parent, os.W_OK | os.X_OK):  # the new folder is written beside it, then swapped in
        raise GPT2DistError(f"export folder {out_dir} cannot be replaced: {out_dir.parent} is not writable; {fix}")
    if not _is_previous_export(out_dir):
        held = sorted(p.name + ("/" if p.is_dir() else "") for p in out_dir.iterdir())
        shown = ", ".join(held[:4]) + (", ..." if len(held) > 4 else "")
        raise GPT2DistError(f"export folder {out_dir} exists and is not a previous Hugging Face export (it holds "
                            f"{shown}); the export replaces the whole folder, so {fix}")


def umask() -> int:
    """The process umask. os.umask can only read it by setting it, so /proc is read first (no window
    in which another thread creates files with a different mask)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(folder: Path) -> None:
    """Give a folder made by mkdtemp (0700), and the files in it, the modes any new folder and file
    get under the process umask, so others on shared storage can read what it becomes."""
    mask = umask()
    folder.chmod(0o777 & ~mask)
    for f in folder.rglob("*"):
        f.chmod((0o777 if f.is_dir() else 0o666) & ~mask)


def atomic_replace_dir(tmp: Path, out_dir: Path) -> None:
    """Move the finished folder `tmp` to `out_dir`; an existing `out_dir` is replaced only now.

    `rename` cannot replace a non-empty folder, so the old one is moved aside first. At every
    moment `out_dir` is either the old complete folder, absent, or the new complete folder.
    """
    old = None
    if out_dir.exists():
        # A name of its own (a leftover of a killed process with the same pid, common in containers,
        # made the rename fail): mkdtemp's empty folder, which rename may replace.
        old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
        try:
            os.replace(out_dir, old)
        except BaseException:
            old.rmdir()
            raise
    try:
        os.replace(tmp, out_dir)
    except BaseException:
        if old is not None:
            os.replace(old, out_dir)  # the previous export back in place, not left hidden
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _cap_model_max_length(folder: Path, n_positions: int, split_special_tokens: bool = False) -> None:
    """A tokenizer without a known limit says model_max_length=1e30, so `pipeline` and truncation
    would pass the model prompts longer than its position table (an IndexError in the embedding).
    The saved limit becomes n_positions; a smaller one the user set is kept. `split_special_tokens`
    (data.literal_eos=text: a quoted "<|endoftext|>" is its characters, as the model was trained): written
    too, which save_pretrained leaves out; loaded without it, the folder read such text as the boundary."""
    path = folder / "tokenizer_config.json"
    if not path.is_file():
        return
    config = json.loads(path.read_text(encoding="utf-8"))
    changed = split_special_tokens and not config.get("split_special_tokens")
    if split_special_tokens:
        config["split_special_tokens"] = True
    if not isinstance(config.get("model_max_length"), int) or config["model_max_length"] > n_positions:
        config["model_max_length"] = n_positions
        changed = True
    if changed:
        path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


_HOST = re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname())  # one name part: no "-"


def remove_dead_exports(out_dir: Path) -> list[Path]:
    """Delete the temporary folders of exports to `out_dir` whose process (on this host) is gone: a kill
    mid-export (OOM in the XL gather, SLURM's SIGKILL) left a model-sized `.hf_model.tmp-*` behind for good.
    Another host's, or a live process's, stay."""
    removed = []
    for tmp in out_dir.parent.glob(f".{glob.escape(out_dir.name)}.tmp-{_HOST}-*-*"):  # `[v2]` is no character class
        pid = tmp.name[len(f".{out_dir.name}.tmp-{_HOST}-"):].split("-", 1)[0]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
            continue  # alive (or another user's): its export may be running
        except ProcessLookupError:
            shutil.rmtree(tmp, ignore_errors=True)
            removed.append(tmp)
        except PermissionError:
            continue
    return removed


def save_hf_folder(model, tokenizer, out_dir: str | os.PathLike, fix: str = "choose an empty or new folder") -> Path:
    """Save `model` (a GPT2LMHeadModel) and `tokenizer` as a Hugging Face folder, atomically.

    An existing `out_dir` is replaced only if it is a previous export (`check_export_target`);
    otherwise this raises GPT2DistError ending with `fix`.
    """
    from gpt2dist.perf import unpad_vocab

    out_dir = Path(os.path.abspath(out_dir))
    check_export_target(out_dir, fix)  # before writing anything
    model = unpad_vocab(model)  # a padded vocabulary goes back to the standard row count
    if tokenizer is not None and len(tokenizer) > model.config.vocab_size:  # its top ids would index past the embedding
        raise GPT2DistError(f"the tokenizer has {len(tokenizer)} tokens but the model's vocab_size is "
                            f"{model.config.vocab_size}: export it with the tokenizer it was trained with (tools/export_hf.py --tokenizer DIR)")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    remove_dead_exports(out_dir)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-{_HOST}-{os.getpid()}-", dir=out_dir.parent))
    use_cache = model.config.use_cache
    try:
        # Checkpoints from before perf.apply_activation_checkpointing stopped clearing it carry
        # use_cache=False: an exported model is for inference, where GPT-2's default (True) belongs.
        model.config.use_cache = True
        try:
            model.save_pretrained(tmp, safe_serialization=True)
        finally:
            model.config.use_cache = use_cache  # the caller's model is left as it was
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)  # the caller's tokenizer is left as it is: only the saved copy is capped
            _cap_model_max_length(tmp, model.config.n_positions, getattr(tokenizer, "split_special_tokens", False))
        files = sorted(f.name for f in tmp.iterdir())
        (tmp / EXPORT_MARKER).write_text(json.dumps({"files": files}) + "\n")
        # mkdtemp makes the folder 0700 and safetensors writes its files 0600: give the export the
        # modes any new folder and file get (umask applied), so others on shared storage can read it.
        apply_umask(tmp)
        for f in tmp.iterdir():
            with open(f, "rb") as fh:  # durable before it becomes visible
                os.fsync(fh.fileno())
        check_export_target(out_dir, fix)  # again: the folder may have changed while this one was written
        atomic_replace_dir(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def load_checkpoint_file(path: str | os.PathLike) -> dict:
    """Load a single-file Lightning checkpoint safely (`weights_only=True`), with clear errors."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist; check the path (checkpoints are in <run folder>/checkpoints/)")
    try:
        try:
            # Mapped, not read: AdamW's moments (2 of the file's 3-4 parts) are never touched by an export.
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)  # the legacy (non-zip) format
    except Exception as e:
        if "Weights only load failed" in str(e):  # read in full it may well load: not a truncation
            from gpt2dist.resume import UNSAFE

            raise CheckpointError(f"checkpoint {path}: {UNSAFE}, so it is not loaded; export a checkpoint gpt2dist "
                                  "wrote") from None
        raise CheckpointError(
            f"checkpoint {path} is truncated or corrupt ({type(e).__name__}: {str(e).splitlines()[0][:120]}); "
            "use an earlier checkpoint"
        ) from None


def model_from_lightning_state(checkpoint: dict, source: str = "checkpoint"):
    """A GPT2LMHeadModel rebuilt from a GPT2Module checkpoint dict (`gpt2_config` + `model.*`)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    # Not a dict: a .pt of a bare tensor or list ("in" on a tensor raised a RuntimeError traceback).
    if not isinstance(checkpoint, dict) or "gpt2_config" not in checkpoint or "state_dict" not in checkpoint:
        raise CheckpointError(f"{source} is not a gpt2dist checkpoint (no gpt2_config/state_dict)")
    model = GPT2LMHeadModel(GPT2Config.from_dict(checkpoint["gpt2_config"]))
    state = {k[len("model."):]: v for k, v in checkpoint["state_dict"].items() if k.startswith("model.")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if model.config.tie_word_embeddings:
        missing = [k for k in missing if k != "lm_head.weight"]  # tied to transformer.wte
    if missing or unexpected:
        raise CheckpointError(f"{source} does not match its config: missing {missing[:3]}, unexpected {unexpected[:3]}")
    model.tie_weights()
    return model


def checkpoint_kind(path: str | os.PathLike) -> str:
    """`file` (single-file Lightning checkpoint), `distcp` (FSDP2 / FSDP1 sharded folder) or
    `deepspeed` (a ZeRO-1/2/3 folder)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist; check the path (checkpoints are in <run folder>/checkpoints/)")
    if path.is_file():
        return "file"
    if (path / ".metadata").is_file():
        return "distcp"
    if (path / "latest").is_file() or (path / "checkpoint").is_dir():
        return "deepspeed"
    raise CheckpointError(
        f"{path} is a folder but neither a distributed checkpoint (.metadata) nor a DeepSpeed checkpoint "
        "(latest, checkpoint/); give a .ckpt file or a folder that gpt2dist saved"
    )


def load_distcp_folder(path: Path) -> dict:
    """A FSDP2 / FSDP1 sharded checkpoint folder consolidated in CPU memory (no process group). Lightning's
    `_load_distributed_checkpoint`, except that .metadata, non-tensor entries and meta.pt are read weights-only:
    torch unpickles them in full, so a crafted folder would run code just by being exported."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint._traverse import set_element
    from torch.distributed.checkpoint.metadata import StorageMeta

    from gpt2dist.resume import read_distcp_metadata
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException, not an Exception
    from torch.distributed.checkpoint.format_utils import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    class WeightsOnlyPlanner(_EmptyStateDictLoadPlanner):
        def load_bytes(self, read_item, value) -> None:
            obj = torch.load(value, map_location="cpu", weights_only=True)
            if self.flatten_state_dict:
                set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
            else:
                self.state_dict[read_item.dest_index.fqn] = obj

    class WeightsOnlyReader(FileSystemReader):
        def read_metadata(self, *args, **kwargs):  # torch's, with the .metadata pickle read weights-only
            metadata = read_distcp_metadata(path)
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    read_distcp_metadata(path)  # refused with its own line, before the loader wraps the error
    checkpoint: dict = {}
    try:
        # The weights only: the optimizer's moments (2 x the fp32 weights: XL, 12.5 GB) are not read.
        _load_state_dict(checkpoint, storage_reader=WeightsOnlyReader(path), planner=WeightsOnlyPlanner(keys={"state_dict", "model"}),
                         no_dist=True)
        meta = Path(path) / "meta.pt"  # Lightning's trainer state, beside the shards
        if meta.is_file():
            checkpoint.update(torch.load(meta, map_location="cpu", weights_only=True))
    except (Exception, CheckpointException) as e:
        text = str(e)
        if "Weights only load failed" in text or "weights_only" in text:
            raise CheckpointError(f"sharded checkpoint {path} holds objects that only a full unpickle reads, which "
                                  f"could run code, and gpt2dist never saves them; it is not a gpt2dist checkpoint, "
                                  f"and it is not loaded") from None
        raise CheckpointError(
            f"sharded checkpoint {path} cannot be read ({type(e).__name__}: {text.splitlines()[0][:120] if text else ''}); "
            "a shard may be missing or truncated: use an earlier checkpoint"
        ) from None
    if "state_dict" not in checkpoint and "model" in checkpoint:  # Lightning stores weights under "model"
        checkpoint["state_dict"] = checkpoint.pop("model")
    return checkpoint


def load_deepspeed_folder(path: Path) -> dict:
    """A DeepSpeed ZeRO-1/2/3 checkpoint folder as one fp32 Lightning checkpoint dict.

    DeepSpeed's zero_to_fp32 unpickles its files in full, so they are checked first: a file that
    needs any global but the weights-only types and DeepSpeed's own classes is refused unread.
    """
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from gpt2dist.resume import deepspeed_classes

    tag = (path / "latest").read_text().strip() if (path / "latest").is_file() else "checkpoint"
    allowed = deepspeed_classes(path, sorted((path / tag).glob("*.pt")))
    # As Lightning's convert_zero_checkpoint_to_fp32_state_dict, less the copy it writes: that is the
    # whole fp32 model in a temporary file (XL: 1.56B x 4 bytes = 6.2 GB of /tmp) that nobody reads.
    try:
        weights = get_fp32_state_dict_from_zero_checkpoint(str(path), tag)
        # Lightning's state (loops, callbacks, hyper-parameters) is in rank 0's model-states file.
        states = sorted((path / tag).glob("*model_states.pt"))
        with torch.serialization.safe_globals(allowed):
            client = torch.load(states[0], map_location="cpu", weights_only=True, mmap=True)  # its `module` is not read
    except Exception as e:
        raise CheckpointError(
            f"DeepSpeed checkpoint {path} cannot be read ({type(e).__name__}: {str(e).splitlines()[0][:120]}); "
            "use an earlier checkpoint"
        ) from None
    deepspeed_own = {"module", "optimizer", "lr_scheduler", "csr_tensor_module_names", "skipped_steps",
                     "global_steps", "dp_world_size", "mp_world_size"}  # DeepSpeed's, not Lightning's (as Lightning)
    checkpoint = {k: v for k, v in client.items() if k not in deepspeed_own}
    checkpoint["state_dict"] = weights
    return checkpoint


def load_any_checkpoint(path: str | os.PathLike) -> dict:
    """Any checkpoint gpt2dist writes (single file, FSDP2/FSDP1 sharded, DeepSpeed ZeRO), as one dict
    with the full `state_dict` (keys `model.*`) and `gpt2_config`."""
    kind = checkpoint_kind(path)
    if kind == "file":
        return load_checkpoint_file(path)
    if kind == "distcp":
        return load_distcp_folder(Path(path))
    return load_deepspeed_folder(Path(path))


def export_checkpoint(ckpt_path: str | os.PathLike, out_dir: str | os.PathLike, tokenizer: str | None = None,
                      no_tokenizer: bool = False) -> Path:
    """Turn a gpt2dist checkpoint (single file, FSDP2/FSDP1 sharded folder or DeepSpeed ZeRO folder)
    into a Hugging Face folder. The tokenizer defaults to the one recorded at training time;
    `no_tokenizer`: the model alone, for a checkpoint that records none (trained without the data module)."""
    from gpt2dist.tokenizer import load_tokenizer

    if tokenizer and no_tokenizer:
        raise CheckpointError(f"export of {ckpt_path}: a tokenizer ({tokenizer}) and no_tokenizer both given; give one")
    check_export_target(out_dir)  # before loading a checkpoint that may take minutes
    checkpoint = load_any_checkpoint(ckpt_path)
    model = model_from_lightning_state(checkpoint, str(ckpt_path))
    tok_name = tokenizer or checkpoint.get("tokenizer_name_or_path")
    # The fix names tools/export_hf.py's option: this runs outside a config, data.tokenizer means nothing here.
    fix = ("pass --tokenizer DIR, a local tokenizer folder" if tokenizer else
           "it is the tokenizer the checkpoint recorded at training time: pass --tokenizer DIR with that "
           "tokenizer's folder (e.g. where it was moved)")
    if no_tokenizer:
        return save_hf_folder(model, None, out_dir)
    if not tok_name:  # a folder without one loads in transformers with a one-token tokenizer, silently
        raise CheckpointError(f"{ckpt_path} records no tokenizer (it was trained without gpt2dist's data module); "
                              f"pass --tokenizer DIR, the tokenizer it was trained with (or --no-tokenizer: the model alone)")
    tok = load_tokenizer(tok_name, fix)
    # As the data module set it for training (data.literal_eos=text): the export writes it into its tokenizer.
    tok.split_special_tokens = (checkpoint.get("datamodule_hyper_parameters") or {}).get("literal_eos") == "text"
    from gpt2dist.tokenizer import tokenizer_identity

    recorded = checkpoint.get("tokenizer_identity")
    if recorded and tokenizer_identity(tok) != recorded:
        # As validate/test/predict refuse it (GPT2Module._check_tokenizer): a folder pairing the weights with
        # another tokenizer of the same size loads and generates, as other text, with nothing left to check.
        raise CheckpointError(f"{tok_name} is not the tokenizer {ckpt_path} was trained with "
                              f"({checkpoint.get('tokenizer_name_or_path') or 'not recorded'}): its token ids mean "
                              f"other text; pass --tokenizer DIR with that tokenizer (or a copy of it)")
    return save_hf_folder(model, tok, out_dir)
