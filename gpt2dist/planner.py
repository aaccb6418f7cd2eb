"""Per-GPU memory estimates for GPT-2 training under each distribution strategy.

Used by `tools/plan.py`. Everything is bytes; N is the parameter count, G the number of
data-parallel ranks (gpus per node x nodes), b the micro-batch, s the sequence length,
d the width, L the layers, V the (padded) vocabulary. `trainer.precision: bf16-mixed` (the
default) is bf16 compute with fp32 weights and fp32 Adam moments, as each strategy does it in
Lightning:

    strategy         params        grads        optimizer (m, v, master)   other
    single / DDP     4N (fp32)     4N (fp32)    8N                         2N autocast bf16 weight copies
    (DDP, G > 1: the gradients are views of its all-reduce buckets, configs/strategy/ddp.yaml's
    gradient_as_bucket_view, so no second copy; but the buckets are allocated once and held, so the
    gradients' 4N is there through forward too. Without the view: + 4N buckets, as DDP's default.)
    (With activation checkpointing the blocks' bf16 copies are not saved for backward: they go when
    autocast exits, and backward recasts one block at a time, so 2N becomes 2 x (root + one block):
    GPT-2 Large 1.55 GB -> 0.17 GB. H200, b16 x 1024, checkpointed: 20.38 GB planned with 2N,
    17.60 GB measured (+15.8%); 19.00 GB (+7.9%) with this.)
    FSDP2 / FSDP1    4N/G          4N/G         8N/G                       gathered bf16 blocks in flight
                                                                           + one block's unsharded grads: fp32
                                                                           (FSDP2 reduces in fp32), bf16 (FSDP1:
                                                                           Lightning reduces in bf16)
    ZeRO-1           2N (bf16)     2N (bf16)    12N/G (m, v, fp32 master)  reduce + all-gather buckets
    ZeRO-2           2N            2N/G         12N/G                      buckets
    ZeRO-3           2N/G          2N/G         12N/G                      gathered bf16 params: up to
                                                                           min(N, 1e9) (DeepSpeed's max live
                                                                           params) + buckets
    ZeRO-3 offload   0 (CPU)       0 (CPU)      0 (CPU: 20N/G)             the same gathered params + buckets
    (CPU per rank: fp32 master, m, v and fp32 grad 16N/G, + the bf16 parameter partitions 2N/G
    (offload_parameters) + DeepSpeed's bf16 gradient partition buffer 2N/G, which stage3.py puts on
    the optimizer's device: GPT-2 XL on 8 GPUs, 3.9 GB per rank, 31 GB per node.)

`trainer.precision: bf16-true` (bf16 weights, no autocast) changes the first two rows:

    single / DDP     2N (bf16)     2N (bf16)    16N: m, v 8N + fp32 master   (DDP: grads held in its buckets)
                                                4N + its fp32 grad 4N (gpt2dist/optim.py: 20N in all, vs 16N)
    FSDP2 / FSDP1    2N/G          2N/G         4N/G (bf16 m, v: no master)  gathered blocks
The ZeRO rows are the same under both: DeepSpeed casts the weights to bf16 and keeps its own masters.

The peak is the larger of two moments (`Estimate.phases`). With one micro-batch per step (DDP,
FSDP): the start of backward, with every activation but no gradient yet (set to None after the last
step) except the tied embedding/head's, made first; and the end of backward, with every gradient and
no activation. With `trainer.accumulate_grad_batches > 1` the gradients stay through
the next micro-batches, so states + activations; likewise under ZeRO (DeepSpeed's gradient buffers)
and activation checkpointing (kept conservative, see `phases`). Checked on CPU (tests/memory_probe.py
states, eager, d512, 8 x 128 tokens), growth per 4 extra layers, measured vs planned MB: one process
303.3 vs 302.3 (accumulating: 352.8 vs 352.8), DDP x2 354.4 vs 352.8 (352.8 vs 352.8), FSDP2 x2
193.4 vs 201.5 (219.2 vs 226.7). H200 (tools/bench.py, one micro-batch per step): GPT-2 Large
b16 38.84 GiB planned, 38.80 measured; with the gradients counted at the activation peak, 41.48.
Lightning itself sets the gradients to None only after the next training_step (its closure runs
training_step, then zero_grad, then backward), so every forward held the last step's gradients: a
real `Trainer.fit` on CPU (same shape, one process) grew 354.1 MB per 4 layers, not 302.3.
GPT2Module.optimizer_step therefore frees them right after the step, as the probe and a plain loop
do: the same fit then grew 302.1 MB (checkpointed 209.9 -> 186.6), final weights bitwise unchanged.

Activations (bf16 matmuls, SDPA flash attention so no s^2 term, and none of its dropout mask),
after Korthikanti et al. 2022 ("Reducing Activation Recomputation"), per layer:

    ACT_PER_LAYER * s * b * d bytes, ACT_PER_LAYER = 36 with fused GELU (torch.compile):
      LN inputs 2 x 4sbh (fp32 residual stream) + LN-output bf16 copies for QKV and MLP-in 2 x 2sbh
      + Q, K, V 6sbh + attention output 2sbh + GELU input 8sbh + MLP-out input 8sbh = 36 sbh
    eager GELU (tanh form) also keeps x^3, the tanh argument and tanh(.): +3 x 8sbh = 60.
    (Saved-tensor hooks on CPU list exactly these: 60 eager, 34 compiled, which recomputes the
    attention residual instead of keeping it.)
    A bf16 residual stream (bf16-true, and every ZeRO row: DeepSpeed runs bf16 weights with no
    autocast) halves the two LN inputs: 36 - 4 = 32 compiled, 60 - 4 = 56 eager.
    An MLP of width f = n_inner (not 4d): the 4h-wide terms scale by f/4d, so 20 + 4f/d compiled
    (GELU input + MLP-out input, 2 bytes each per f element) and 20 + 10f/d eager.
    Dropout (resid_pdrop > 0: the hub's GPT-2 configs and configs/gpt2-*.yaml, which do not set
    model.dropout, train at 0.1): each of the block's two residual dropouts keeps a mask, 1 byte
    per element on CUDA (native_dropout's bool mask): + 2 sbh per layer, and the embedding dropout
    (embd_pdrop) + 1 sbh once. GPT-2 Large on 8 x 80 GB, DDP: 36 -> 38 per layer, micro-batch 31 -> 29.
    (On CPU, saved-tensor hooks measured + 4 per layer, the masks kept at 2 bytes; the CUDA figure
    is native_dropout's bool mask, not yet measured on a GPU. The attention dropout lives inside
    the SDPA kernel, as a seed, not a mask.)

Head: ln_f's fp32 input + its bf16 copy for lm_head, 6 sbh (bf16 stream: 2 + 2 = 4). Logits, per
(token x vocab row): compiled loss 4 (bf16 logits kept for backward + their bf16 grad; the fp32
upcast and log-softmax fuse away), eager loss 12 (bf16 logits, fp32 copy, fp32 log-softmax kept,
fp32 grad), Liger fused linear cross-entropy 0 (chunks; it keeps a bf16 grad of the hidden states,
2 sbh). With activation checkpointing a layer keeps only its input (4 sbh fp32; 2 sbh bf16 stream);
the peak is then the larger of the logits phase and one layer recomputed in backward, not their sum.
Checked on CPU with the real model (tests/memory_probe.py: peak RSS per extra sequence, with
glibc mmap for every tensor). At GPT-2 small's width (L2 d768 V50304 s1024): compiled 252 MiB
measured vs 255 estimated, eager 684 vs 686. Per layer (L6 minus L2, d256 s256): 35.3 / 61.0 / 3.3
B per token x width compiled / eager / checkpointed, and 31.6 / 56.0 / 2.4 with a bf16 stream.
tests/test_planner.py checks both within 10%.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from gpt2dist.metrics import gpt2_block_params

GB = 1e9
GiB = 2**30

ACT_PER_LAYER_FUSED = 36  # bytes per (token x hidden) per layer, compiled blocks (f = 4d)
ACT_PER_LAYER_EAGER = 60  # eager tanh-GELU keeps three more 4h-wide bf16 tensors
ACT_ATTN_PART = 20  # of both: LN inputs 8 + their bf16 copies 4 + Q, K, V 6 + attention output 2
ACT_MLP_FUSED, ACT_MLP_EAGER = 4, 10  # per (token x MLP width f): 36 = 20 + 4 x 4, 60 = 20 + 10 x 4
DROPOUT_MASK_BYTES = 1  # per masked element: CUDA's native_dropout keeps a bool mask
BF16_STREAM_SAVING = 4  # per (token x hidden) per layer: the two LN inputs kept in bf16, not fp32
HEAD_BYTES = 6  # per (token x hidden): ln_f's fp32 input + bf16 copy for lm_head (bf16 stream: 4)
LOGIT_BYTES_COMPILED = 4  # per (token x vocab): bf16 logits + bf16 grad (compiled loss: no fp32 copy)
LOGIT_BYTES_EAGER = 12  # bf16 logits 2 + fp32 copy 4 + fp32 log-softmax 4 (kept) + grads in flight
FUSED_CE_BYTES = 2  # per (token x hidden): Liger's bf16 grad of the hidden states, made in forward
CKPT_INPUT_BYTES = 4  # per (token x hidden) per layer kept under checkpointing: fp32 block input (bf16 stream: 2)
USABLE_FRACTION = 0.92  # of the card: CUDA context, cuBLAS workspaces, allocator fragmentation
DEEPSPEED_BUCKET_ELEMS = 2e8  # Lightning's DeepSpeedStrategy default reduce/allgather bucket size
# DeepSpeed's stage3_max_live_parameters / stage3_max_reuse_distance (both 1e9 elements; neither Lightning nor
# configs/strategy sets them): a gathered parameter reused within that distance stays gathered. GPT-2 Large's
# block i comes back in backward 2 x (35 - i) x 19.7M elements after its forward, so most blocks stay: the
# bound, min(N, 1e9) bf16 elements, is planned (Large: 1.55 GB, not the 0.21 of two blocks). Unmeasured.
DEEPSPEED_MAX_LIVE_ELEMS = 1e9

PRECISIONS = ("bf16-mixed", "bf16-true")
STRATEGIES = ["DDP", "FSDP2", "FSDP1", "ZeRO-1", "ZeRO-2", "ZeRO-3", "ZeRO-3 offload"]
# Preference when several fit: least communication and fewest moving parts first.
PREFERENCE = ["DDP", "ZeRO-1", "ZeRO-2", "FSDP2", "ZeRO-3", "FSDP1", "ZeRO-3 offload"]


@dataclass
class Shape:
    n_layer: int
    n_embd: int
    n_head: int
    vocab: int  # padded rows if the model pads
    n_positions: int = 1024
    n_inner: int | None = None  # the MLP width; None: 4d
    resid_pdrop: float = 0.0  # > 0: each block keeps two dropout masks
    embd_pdrop: float = 0.0  # > 0: the embedding output keeps one

    @property
    def mlp_width(self) -> int:
        return self.n_inner or 4 * self.n_embd

    @property
    def block_params(self) -> int:
        """One GPT2Block: qkv 3d^2+3d, proj d^2+d, MLP 2df+f+d, two LayerNorms 4d (12d^2 + 13d at f = 4d)."""
        return gpt2_block_params(self.n_embd, self.n_inner)

    @property
    def root_params(self) -> int:
        """Outside the blocks: wte V*d (tied lm_head), wpe P*d, final LayerNorm 2d."""
        return self.vocab * self.n_embd + self.n_positions * self.n_embd + 2 * self.n_embd

    @property
    def params(self) -> int:
        return self.n_layer * self.block_params + self.root_params


@dataclass
class Estimate:
    strategy: str
    params: float
    grads: float
    optimizer: float
    other: float
    act_per_sample: float  # activations + logits for one sequence, no checkpointing
    act_per_sample_ckpt: float  # same with per-block checkpointing
    cpu: float = 0.0  # host memory per rank (offload)
    notes: list[str] = field(default_factory=list)
    other_ckpt: float | None = None  # `other` under activation checkpointing, where it differs
    # Gradient bytes alive while the activations peak (the start of backward); None: all of `grads`
    # (gradient accumulation keeps them between micro-batches; DeepSpeed keeps its gradient buffers).
    grads_in_forward: float | None = None

    @property
    def states(self) -> float:
        return self.params + self.grads + self.optimizer + self.other

    def states_at(self, ckpt: bool) -> float:
        """`states`, with `other_ckpt` in place of `other` when checkpointing."""
        if ckpt and self.other_ckpt is not None:
            return self.states - self.other + self.other_ckpt
        return self.states

    def phases(self, ckpt: bool) -> list[tuple[float, float]]:
        """(fixed bytes, bytes per sequence) of each candidate peak; the peak is the largest.

        One micro-batch per step, no checkpointing: the activations peak as backward starts, before
        the gradients exist (GPT2Module.optimizer_step sets them to None after the step; Lightning
        alone does it after the next forward), and backward then frees
        more activation memory per layer than it adds gradients; the other candidate is the end of
        backward, every gradient and no activations (the end-of-backward states still count the
        autocast weight copies, freed by then: conservative by 2N). Checkpointed runs keep every
        gradient next to the activations: their H200 peak (17.60 GB) lay between the gradient-free
        start of backward (16.2 GB) and that (19.0); it fits the end of the forward with the last
        step's gradients still held (12N + 4N + kept inputs + bf16 logits = 17.35 GB, computed), as
        they were before GPT2Module freed them after the step (CPU, checkpointed: 209.9 -> 186.6 MB
        per 4 layers); the plan stays this conservative sum until a GPU measures it again.
        """
        states = self.states_at(ckpt)
        if ckpt or self.grads_in_forward is None:
            return [(states, self.act_per_sample_ckpt if ckpt else self.act_per_sample)]
        return [(states - self.grads + self.grads_in_forward, self.act_per_sample), (states, 0.0)]

    def total(self, b: int, ckpt: bool) -> float:
        return max(fixed + b * per for fixed, per in self.phases(ckpt))

    def max_micro_batch(self, budget: float, ckpt: bool) -> int:
        fits = [math.floor((budget - fixed) / per) if per else (math.inf if fixed <= budget else -1)
                for fixed, per in self.phases(ckpt)]
        return max(0, min(fits))


def shape_from_config(config, pad_to: int = 1) -> Shape:
    vocab = math.ceil(config.vocab_size / pad_to) * pad_to
    return Shape(config.n_layer, config.n_embd, config.n_head, vocab, config.n_positions,
                 getattr(config, "n_inner", None), float(config.resid_pdrop or 0), float(config.embd_pdrop or 0))


def activation_bytes(shape: Shape, seq: int, compiled: bool = True, fused_ce: bool = False,
                     bf16_stream: bool = False) -> tuple[float, float]:
    """(no checkpointing, checkpointing) activation bytes for ONE sequence of `seq` tokens.

    `compiled`: model.compile (fused GELU in the blocks, fused loss); `fused_ce`: Liger's fused
    linear cross-entropy (no logits); `bf16_stream`: bf16 weights without autocast (bf16-true,
    DeepSpeed), so the residual stream between the layers is bf16, not fp32."""
    sd = seq * shape.n_embd
    per_layer = ACT_ATTN_PART * sd + (ACT_MLP_FUSED if compiled else ACT_MLP_EAGER) * seq * shape.mlp_width
    if shape.resid_pdrop > 0:  # the masks of the attention's and the MLP's output dropout
        per_layer += 2 * DROPOUT_MASK_BYTES * sd
    head, kept = HEAD_BYTES * sd, CKPT_INPUT_BYTES * sd
    if shape.embd_pdrop > 0:  # kept through the whole backward, like the head's tensors
        head += DROPOUT_MASK_BYTES * sd
    if bf16_stream:  # an fp32 tensor of width d becomes bf16: 2 bytes less each
        per_layer -= BF16_STREAM_SAVING * sd
        head, kept = head - 2 * sd, kept // 2
    if fused_ce:
        logits = FUSED_CE_BYTES * sd
    else:
        logits = (LOGIT_BYTES_COMPILED if compiled else LOGIT_BYTES_EAGER) * seq * shape.vocab
    full = shape.n_layer * per_layer + head + logits
    # Checkpointing: the logits are gone by the time the first layer is recomputed.
    ckpt = shape.n_layer * kept + head + max(logits, per_layer)
    return full, ckpt


def estimate(strategy: str, shape: Shape, world: int, seq: int, compiled: bool = True, fused_ce: bool = False,
             precision: str = "bf16-mixed", accumulate: int = 1) -> Estimate:
    """Per-GPU bytes for `strategy` on `world` data-parallel ranks under `precision` (see the module
    docstring), with `accumulate` micro-batches per optimizer step (trainer.accumulate_grad_batches)."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}")
    N, G = shape.params, world
    true = precision == "bf16-true"
    act, act_ckpt = activation_bytes(shape, seq, compiled, fused_ce, bf16_stream=true or strategy.startswith("ZeRO"))
    # Sharded strategies gather bf16 weights of the block being computed + the one prefetched,
    # plus the root (embeddings / tied lm_head), which stays gathered through forward and backward.
    gathered = 2 * (2 * shape.block_params) + 2 * shape.root_params
    buckets = 2 * DEEPSPEED_BUCKET_ELEMS * 2  # reduce + all-gather buckets of bf16 elements
    if strategy == "DDP" and true:
        # MasterWeightAdamW: fp32 master 4N + its fp32 grad buffer 4N + m, v 8N.
        e = Estimate(strategy, 2 * N, 2 * N, 16 * N, 0, act, act_ckpt)
    elif strategy == "DDP":
        e = Estimate(strategy, 4 * N, 4 * N, 8 * N, 2 * N, act, act_ckpt,
                     other_ckpt=2 * (shape.root_params + shape.block_params))
    elif strategy in ("FSDP2", "FSDP1") and true:
        # bf16 shards and bf16 AdamW moments; + one block's bf16 unsharded gradients.
        e = Estimate(strategy, 2 * N / G, 2 * N / G, 4 * N / G, gathered + 2 * shape.block_params, act, act_ckpt)
        e.notes.append("bf16-true: no fp32 master weights under FSDP (updates below bf16 resolution are lost)")
    elif strategy in ("FSDP2", "FSDP1"):
        # + one block's unsharded gradients before reduce-scatter: fp32 under FSDP2 (its mp_policy
        # reduces in fp32, gpt2dist/strategies.py), bf16 under FSDP1 (Lightning's FSDPPrecision
        # sets reduce_dtype bf16).
        unsharded_grad = (4 if strategy == "FSDP2" else 2) * shape.block_params
        e = Estimate(strategy, 4 * N / G, 4 * N / G, 8 * N / G, gathered + unsharded_grad, act, act_ckpt)
    elif strategy == "ZeRO-1":
        e = Estimate(strategy, 2 * N, 2 * N, 12 * N / G, buckets, act, act_ckpt)
    elif strategy == "ZeRO-2":
        e = Estimate(strategy, 2 * N, 2 * N / G, 12 * N / G, buckets, act, act_ckpt)
    elif strategy == "ZeRO-3":
        e = Estimate(strategy, 2 * N / G, 2 * N / G, 12 * N / G, 2 * min(N, DEEPSPEED_MAX_LIVE_ELEMS) + buckets, act,
                     act_ckpt)
    elif strategy == "ZeRO-3 offload":
        e = Estimate(strategy, 0.0, 0.0, 0.0, 2 * min(N, DEEPSPEED_MAX_LIVE_ELEMS) + buckets, act, act_ckpt,
                     cpu=20 * N / G)
        e.notes.append("optimizer step on CPU: expect several x slower steps")
    else:
        raise ValueError(f"unknown strategy {strategy!r}; use one of {', '.join(STRATEGIES)}")
    if strategy == "DDP" and G > 1:
        e.notes.append(f"as configs/strategy/ddp.yaml runs it (gradient_as_bucket_view); without the overlay "
                       f"Lightning's DDP keeps a second gradient copy: +{e.grads / 1e9:.2f} GB")
    # Under DDP (G > 1) the gradients are its buckets, held through forward whatever `accumulate` is.
    if accumulate == 1 and strategy in ("DDP", "FSDP2", "FSDP1") and not (strategy == "DDP" and G > 1):
        # At the start of backward only the tied embedding/head's gradient exists (the head is the first
        # op backward reaches): fp32 under bf16-mixed, bf16 when the weights (or FSDP's gathered
        # copies) are bf16.
        e.grads_in_forward = (4 if strategy == "DDP" and not true else 2) * shape.root_params
    return e


def recommend(estimates: list[Estimate], budget: float, min_micro_batch: int) -> tuple[str, bool, int] | None:
    """(strategy, checkpointing, micro-batch): the first strategy in PREFERENCE that reaches
    `min_micro_batch` without checkpointing, else with it, else the largest micro-batch found."""
    min_micro_batch = max(1, min_micro_batch)  # 0 "fits" anything: it must not recommend a plan that does not
    by_name = {e.strategy: e for e in estimates}
    for ckpt in (False, True):
        for name in PREFERENCE:
            e = by_name.get(name)
            if e and e.max_micro_batch(budget, ckpt) >= min_micro_batch:
                return name, ckpt, e.max_micro_batch(budget, ckpt)
    best = max(((e.max_micro_batch(budget, True), -PREFERENCE.index(e.strategy), e.strategy) for e in estimates))
    if best[0] < 1:
        return None
    return best[2], True, best[0]
