#!/usr/bin/env bash
# One GPT-2 Medium-shaped run (random init, seq 1024, bf16, 20 steps) per strategy on one GPU:
# DDP, FSDP2, FSDP1, DeepSpeed ZeRO-2, ZeRO-3, ZeRO-3 offload. One table row each (final loss,
# tokens/s, peak GPU memory), then resume + export checks of a ZeRO-3 and an FSDP1 checkpoint.
# Budget: ~5 min on one H100. Everything lands under $OUT (default: a temp dir).
#   bash tools/gpu_check_strategies.sh               # GPU
#   bash tools/gpu_check_strategies.sh --cpu-smoke   # CPU: tiny model, DDP x2, FSDP2 x2 eager and compiled
#   bash tools/gpu_check_strategies.sh --rows fsdp1,fsdp1+compile,deepspeed_zero2,deepspeed_zero2+compile
#                                                    # compile's gain where the overlays turn it off (same call)
set -uo pipefail
cd "$(dirname "$0")/.."
# The GPU machine lacks deepspeed, torchdata, jsonargparse, datasets: the lead ships wheels in .whl/.
# Only where they are missing: a full environment (here, CI) keeps its own.
if compgen -G ".whl/*.whl" > /dev/null && ! python3 -c "import deepspeed, jsonargparse, torchdata" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONPATH="${PYTHONPATH:-}:$PWD"
export TOKENIZERS_PARALLELISM=true
exec python3 tools/gpu_check_strategies.py "$@"
