"""Load a Hugging Face tokenizer, or train a GPT-2-style byte-level BPE on the corpus.

Training is for corpora (or machines) without the GPT-2 tokenizer: the quickstart trains a
small vocabulary on its own text, which also makes a tiny model learn faster.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

from gpt2dist.errors import DataError

EOS = "<|endoftext|>"


def load_tokenizer(name_or_path: str, fix: str = "set data.tokenizer to a local tokenizer folder, or set "
                   "data.train_tokenizer_vocab_size to train one on the corpus"):
    """A `transformers` fast tokenizer from a hub id or a local folder, with an EOS token. `fix` ends
    the error when it cannot be loaded (the caller knows which option names the tokenizer)."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(name_or_path)  # never trust_remote_code
    except Exception as e:  # OSError offline, ValueError for a bad folder
        raise DataError(
            f"cannot load tokenizer {name_or_path!r} ({type(e).__name__}: {str(e).splitlines()[0][:160]}); {fix}"
        ) from None
    if tok.eos_token_id is None:
        raise DataError(f"tokenizer {name_or_path!r} has no eos_token; packing needs one between documents")
    if not tok("a b", add_special_tokens=False).input_ids:
        # transformers builds an empty tokenizer (one token, <|endoftext|>) from a folder without tokenizer
        # files, e.g. an export made with --no-tokenizer: every text encoded to nothing, predict echoed prompts.
        raise DataError(f"tokenizer {name_or_path!r} encodes text to no tokens: the folder holds no tokenizer files "
                        "(tokenizer.json, or vocab.json + merges.txt); pass the tokenizer the model was trained with")
    return tok


def tokenizer_identity(tok) -> str:
    """What the token ids mean: a hash of the vocabulary, the BPE merges and the EOS id. Stored in checkpoints
    and compared on load; unlike `tokenizer_fingerprint`, not the serialisation, which a `tokenizers`
    upgrade may change (its merges went from "a b" strings to [a, b] pairs)."""
    import json

    model = json.loads(tok.backend_tokenizer.to_str()).get("model", {})
    merges = [" ".join(m) if isinstance(m, list) else m for m in model.get("merges") or []]
    payload = {"vocab": sorted(tok.get_vocab().items()), "merges": merges, "eos": tok.eos_token_id}
    return hashlib.sha256(json.dumps(payload, ensure_ascii=False).encode()).hexdigest()[:16]


def tokenizer_fingerprint(tok) -> str:
    """A content hash of the tokenizer (vocab, merges, normalisation), for cache keys."""
    return hashlib.sha256(tok.backend_tokenizer.to_str().encode()).hexdigest()[:16]


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: str | os.PathLike) -> None:
    """Train a byte-level BPE (GPT-2's scheme) and save it as a Hugging Face tokenizer folder.

    The folder is written under a temporary name and renamed, so a crash leaves none half-written,
    and of concurrent writers (a node each) the first rename wins.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 257:
        raise DataError(f"data.train_tokenizer_vocab_size={vocab_size} is too small: use at least 257 (256 bytes + EOS)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte is encodable: no UNK
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, unk_token=EOS)
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out_dir.name + ".tmp-", dir=out_dir.parent))
    try:
        fast.save_pretrained(tmp)
        from gpt2dist.export import apply_umask

        apply_umask(tmp)  # checkpoints record this folder: others must be able to load it
        try:
            os.replace(tmp, out_dir)
        except OSError:
            # Another node's prepare_data (one per node, on a shared cache_dir) trained it first: BPE
            # training is deterministic, so its copy is this one.
            if not (out_dir / "tokenizer.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
