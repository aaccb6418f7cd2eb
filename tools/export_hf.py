#!/usr/bin/env python
"""Export any gpt2dist checkpoint as a Hugging Face folder (safetensors + config + tokenizer).

    python tools/export_hf.py runs/x/checkpoints/last.ckpt runs/x/hf_export

CHECKPOINT may be a single-file .ckpt, a FSDP2 / FSDP1 sharded folder, or a DeepSpeed ZeRO-1/2/3
folder. OUT_DIR appears only when complete (written under a temporary name, then renamed). An
existing OUT_DIR is replaced only if it is empty or a previous export; any other is refused.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gpt2dist.errors import GPT2DistError  # noqa: E402
from gpt2dist.export import export_checkpoint  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="a .ckpt file, or a sharded / DeepSpeed checkpoint folder")
    parser.add_argument("out_dir", help="the Hugging Face folder to write (a previous export there is replaced atomically)")
    which = parser.add_mutually_exclusive_group()  # both: one of them would be ignored
    which.add_argument("--tokenizer", default=None, help="tokenizer folder/id (default: the one recorded in the checkpoint)")
    which.add_argument("--no-tokenizer", action="store_true",
                        help="export the model alone (a checkpoint trained without gpt2dist's data module records none)")
    args = parser.parse_args(argv)
    try:
        out = export_checkpoint(args.checkpoint, args.out_dir, args.tokenizer, no_tokenizer=args.no_tokenizer)
    except GPT2DistError as e:
        print(f"export_hf: error: {e}", file=sys.stderr)
        return 2
    print(f"exported {args.checkpoint} -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
