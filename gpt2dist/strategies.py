"""Sharding strategies: FSDP2 for GPT-2, ZeRO-3-safe weight init, and full-state gathering.

The strategy is chosen by one overlay in `configs/strategy/` (DDP, FSDP2, FSDP1, DeepSpeed ZeRO
1/2/3). Three things need model-specific code, and live here:

- `FSDP2Strategy`: Lightning's `ModelParallelStrategy` with typed FSDP2 knobs, data parallel only.
  `GPT2Module.configure_model` calls `shard_fsdp2`, which applies `fully_shard` to each
  `GPT2Block` and then to the root over `device_mesh["data_parallel"]`.
- `init_partitioned`: under DeepSpeed ZeRO-3 the model is built inside `deepspeed.zero.Init`,
  so each parameter is partitioned as soon as its module is built and Hugging Face's own
  initialisation/`from_pretrained` would write into empty shards. We gather, write on rank 0
  and let DeepSpeed re-partition.
- `full_state_dict`: the model's full (unsharded, fp32, CPU) weights on rank 0, whatever the
  strategy, for the end-of-fit Hugging Face export.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Literal

import torch
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy

log = logging.getLogger(__name__)


class FSDP2Strategy(ModelParallelStrategy):
    """FSDP2 (`torch.distributed.fsdp.fully_shard`) over every process: pure data parallelism
    with parameters, gradients and optimizer state sharded across ranks. Runs on CPU (gloo) too."""

    def __init__(
        self,
        activation_checkpointing: bool = False,
        cpu_offload: bool = False,
        reshard_after_forward: bool = True,
        mixed_precision: Literal["auto", "none"] = "auto",
        save_distributed_checkpoint: bool = True,
        process_group_backend: str | None = None,
    ):
        """
        Args:
            activation_checkpointing: Recompute each GPT2Block's activations in backward (less memory, ~30% more compute).
            cpu_offload: Keep sharded parameters, gradients and optimizer state in CPU memory (GPU memory for the largest models).
            reshard_after_forward: Free gathered block weights after forward (ZeRO-3-like); False keeps them until backward (ZeRO-2-like, faster, more memory).
            mixed_precision: auto: bf16 parameters with fp32 gradient reduction when trainer.precision is bf16; none: no FSDP2 casting.
            save_distributed_checkpoint: Save one shard per rank (a folder); False gathers a single file on rank 0.
            process_group_backend: nccl / gloo (default: from the accelerator).
        """
        # data_parallel_size is set in setup_environment: "auto" in Lightning means num_nodes
        # (with tensor parallelism inside a node), but here every process is a data-parallel rank.
        super().__init__(data_parallel_size="auto", tensor_parallel_size=1,
                         save_distributed_checkpoint=save_distributed_checkpoint,
                         process_group_backend=process_group_backend)
        self.activation_checkpointing = activation_checkpointing
        self.cpu_offload = cpu_offload
        self.reshard_after_forward = reshard_after_forward
        self.mixed_precision = mixed_precision

    def setup_environment(self) -> None:
        self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()

    def model_to_device(self) -> None:
        if not self.cpu_offload:
            return super().model_to_device()
        # Lightning moves the whole module to the GPU after configure_model has sharded it: that took the
        # offloaded shards off the CPU, and FSDP2 refuses them at its first forward ("should be materialized
        # on CPU"). Only the buffers go to the device; FSDP2 copies each parameter shard in for its all-gather.
        from lightning.fabric.utilities.device_dtype_mixin import _DeviceDtypeModuleMixin

        for module in self.model.modules():
            for name, buf in module.named_buffers(recurse=False):
                module._buffers[name] = buf.to(self.root_device)
            if isinstance(module, _DeviceDtypeModuleMixin):
                # What .to() would have recorded: the LightningModule's device is the GPU it computes on (its
                # validation sums, NCCL reductions and the monitor's CUDA syncs follow it), not the CPU shards'.
                module._device = self.root_device

    def save_checkpoint(self, checkpoint, filepath, storage_options=None) -> None:
        if not self._save_distributed_checkpoint or storage_options is not None:
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        # Shards go to a temporary folder, renamed onto the name once complete (gpt2dist/faults.py).
        from gpt2dist.faults import save_distributed_atomically

        save_distributed_atomically(self, super().save_checkpoint, checkpoint, filepath)

    def load_checkpoint(self, checkpoint_path, weights_only: bool | None = None) -> dict:
        """A sharded folder as Lightning loads it; a single file (one process, DDP, or FSDP2 with
        save_distributed_checkpoint false) with its optimizer state matched to parameters by group."""
        from pathlib import Path

        path = Path(self.broadcast(checkpoint_path))
        if not path.is_file():
            return super().load_checkpoint(checkpoint_path, weights_only)
        # Lightning maps a file's integer optimizer keys to parameters in model.parameters() order, but
        # GPT2Module's AdamW lists its decay group first: moments landed on parameters of other shapes.
        from lightning.fabric.strategies.model_parallel import _load_raw_module_state
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        checkpoint = torch.load(path, mmap=True, map_location="cpu", weights_only=weights_only)
        strict = self.lightning_module.strict_loading
        _load_raw_module_state(checkpoint.pop("state_dict"), self.model, strict=strict)
        names = {id(p): n for n, p in self.model.named_parameters()}
        options = StateDictOptions(broadcast_from_rank0=True, full_state_dict=True, strict=strict)
        for optimizer, state in zip(self.optimizers, checkpoint.pop("optimizer_states", [])):
            set_optimizer_state_dict(self.model, optimizer, optim_state_dict=_optimizer_state_by_name(state, optimizer, names),
                                     options=options)
        return checkpoint


def _optimizer_state_by_name(state: dict, optimizer, names: dict[int, str]) -> dict:
    """A single file's optimizer state (integer keys, one per parameter in each group's order) keyed by
    parameter name (`names`: id(param) -> name), the full-state form FSDP loads. Lightning numbered a file's
    parameters in model.parameters() order, but GPT2Module's AdamW lists its decay group first: moments
    landed on parameters of other shapes."""
    if not state["state"] or not isinstance(next(iter(state["state"])), int):
        return state  # keyed by name already (FSDP1's own full state dict), or no moments yet
    by_name, groups = {}, []
    for saved, live in zip(state["param_groups"], optimizer.param_groups):
        fqns = [names[id(p)] for p in live["params"]]  # same groups, same order: configure_optimizers
        by_name.update({fqn: state["state"][i] for i, fqn in zip(saved["params"], fqns) if i in state["state"]})
        groups.append({**saved, "params": fqns})
    return {"state": by_name, "param_groups": groups}


class FSDP1Strategy(FSDPStrategy):
    """FSDP1 (`FullyShardedDataParallel`, Lightning's FSDPStrategy) with each GPT2Block as one
    unit. GPU only."""

    def __init__(
        self,
        sharding_strategy: Literal["FULL_SHARD", "SHARD_GRAD_OP", "HYBRID_SHARD", "NO_SHARD"] = "FULL_SHARD",
        activation_checkpointing: bool = True,
        cpu_offload: bool = False,
        state_dict_type: Literal["full", "sharded"] = "sharded",
        limit_all_gathers: bool = True,
        process_group_backend: str | None = None,
    ):
        """
        Args:
            sharding_strategy: FULL_SHARD (params+grads+optimizer), SHARD_GRAD_OP (grads+optimizer), HYBRID_SHARD (full shard inside a node, replicate across nodes), NO_SHARD (DDP-like).
            activation_checkpointing: Recompute each GPT2Block's activations in backward.
            cpu_offload: Keep parameters and gradients in CPU memory between uses.
            state_dict_type: sharded: one checkpoint shard per rank (a folder); full: one file gathered on rank 0.
            limit_all_gathers: Rate-limit prefetching all-gathers (avoids memory spikes).
            process_group_backend: nccl / gloo (default: from the accelerator).
        """
        block = _gpt2_block_class()
        super().__init__(
            auto_wrap_policy={block},
            activation_checkpointing_policy={block} if activation_checkpointing else None,
            sharding_strategy=sharding_strategy,
            cpu_offload=cpu_offload,
            state_dict_type=state_dict_type,
            limit_all_gathers=limit_all_gathers,
            process_group_backend=process_group_backend,
        )

    def setup(self, trainer) -> None:
        super().setup(trainer)
        # Lightning's FSDPPrecision refuses to clip by norm (it has no handle on the root unit), and every
        # preset clips (gradient_clip_val 1.0): the first optimizer step died. The root FSDP unit's
        # clip_grad_norm_ sums the shards' squares over the right group (world, node or none), then scales.
        self.precision_plugin.clip_grad_by_norm = lambda optimizer, clip_val: self.model.clip_grad_norm_(clip_val)

    @contextmanager
    def block_backward_sync(self):
        """No `no_sync` between accumulated micro-batches. Lightning enters it for any model with a no_sync
        method, FSDP1's too, which then keeps every rank's unsharded gradients in the bf16 compute dtype
        (+2 bytes x N per GPU, summed in bf16); under NO_SHARD (what FSDP1 runs on one GPU) the next
        forward died assigning the tied head's bf16 gradient to its fp32 weight (every preset
        accumulates). Reduce-scattered each micro-batch, they stay sharded and are summed in fp32."""
        yield None

    def load_checkpoint(self, checkpoint_path, weights_only: bool | None = None) -> dict:
        """A sharded folder as Lightning loads it; a single file (one process, DDP, or FSDP1 with
        state_dict_type full) with its optimizer state matched to parameters by group, as for FSDP2:
        Lightning's numbering put moments on parameters of other shapes (heap corruption in the fused step)."""
        from pathlib import Path

        from lightning.pytorch.trainer.states import TrainerFn

        path = Path(self.broadcast(checkpoint_path))
        if not path.is_file():
            return super().load_checkpoint(checkpoint_path, weights_only)
        from lightning.fabric.strategies.fsdp import _get_full_state_dict_context
        from lightning.fabric.strategies.model_parallel import _load_raw_module_state
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        from torch.distributed.fsdp._common_utils import clean_tensor_name

        checkpoint = torch.load(path, mmap=True, map_location="cpu", weights_only=weights_only)
        _load_raw_module_state(checkpoint.pop("state_dict"), module=self.model, world_size=self.world_size,
                               strict=self.lightning_module.strict_loading)
        states = checkpoint.pop("optimizer_states", None)  # popped: Lightning's restore would load them again
        if not states or self.lightning_module.trainer.state.fn != TrainerFn.FITTING:
            return checkpoint
        # The names FSDP's full optimizer state uses: the module's, without the wrappers' prefixes.
        names = {id(p): clean_tensor_name(n) for n, p in self.model.named_parameters()}
        with _get_full_state_dict_context(self.model, world_size=self.world_size, rank0_only=False):
            for optimizer, state in zip(self.optimizers, states):
                state = FSDP.optim_state_dict_to_load(model=self.model, optim=optimizer,
                                                      optim_state_dict=_optimizer_state_by_name(state, optimizer, names))
                optimizer.load_state_dict(state)
        return checkpoint

    def save_checkpoint(self, checkpoint, filepath, storage_options=None) -> None:
        if self._state_dict_type != "sharded" or storage_options is not None:
            return super().save_checkpoint(checkpoint, filepath, storage_options)  # one file: CheckpointIO, atomic
        from gpt2dist.faults import save_distributed_atomically

        save_distributed_atomically(self, super().save_checkpoint, checkpoint, filepath)


class AtomicDeepSpeedStrategy(DeepSpeedStrategy):
    """Lightning's DeepSpeedStrategy (same arguments), but each checkpoint folder is written under a
    temporary name and renamed once every rank has written its part: `last` never points at a
    half-written folder. GPU only."""

    def save_checkpoint(self, checkpoint, filepath, storage_options=None) -> None:
        if storage_options is not None:
            return super().save_checkpoint(checkpoint, filepath, storage_options)  # raises TypeError
        from gpt2dist.faults import save_distributed_atomically

        save_distributed_atomically(self, super().save_checkpoint, checkpoint, filepath)

    def _evaluating(self) -> bool:
        """validate / test / predict of a DeepSpeed folder (not Lightning's load_full_weights file)."""
        from lightning.pytorch.trainer.states import TrainerFn

        # load_full_weights: Lightning's own single-file route (ZeRO-3 only), left as it is.
        return self.lightning_module.trainer.state.fn != TrainerFn.FITTING and not self.load_full_weights

    def load_checkpoint(self, checkpoint_path, weights_only: bool | None = None) -> dict:
        """Fit: Lightning's (DeepSpeed resumes its own folders). validate/test/predict: the folder's
        consolidated fp32 weights on rank 0, whatever ZeRO stage and number of processes wrote it."""
        if not self._evaluating():
            return super().load_checkpoint(checkpoint_path, weights_only)
        # Not engine.load_checkpoint: an inference engine has no optimizer, which ZeRO-3 loading calls
        # (AttributeError '_restore_from_bit16_weights'), and ZeRO-1/2 engines cannot read a ZeRO-3 folder.
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        from gpt2dist.errors import CheckpointError
        from gpt2dist.resume import _meta

        path = self.broadcast(str(checkpoint_path))
        checkpoint, why = _meta(path)  # Lightning's client state (trainer progress, gpt2_config, ...)
        if checkpoint is None:
            raise CheckpointError(f"--ckpt_path {path}: not a complete DeepSpeed checkpoint folder ({why}); pass an older one")
        deepspeed_keys = {"module", "optimizer", "lr_scheduler", "csr_tensor_module_names", "skipped_steps",
                          "global_steps", "dp_world_size", "mp_world_size", "buffer_names", "param_shapes",
                          "frozen_param_shapes", "frozen_param_fragments", "shared_params", "ds_config", "ds_version"}
        checkpoint = {k: v for k, v in checkpoint.items() if k not in deepspeed_keys}
        # DeepSpeed's zero_to_fp32 (as tools/export_hf.py) on rank 0 only: it reads every rank's
        # optimizer shard, and load_model_state_dict writes from rank 0.
        checkpoint["state_dict"] = get_fp32_state_dict_from_zero_checkpoint(path) if self.is_global_zero else {}
        return checkpoint

    def load_model_state_dict(self, checkpoint, strict: bool = True) -> None:
        """Evaluation: rank 0's consolidated weights into every rank's (partitioned or whole) parameters."""
        if not self._evaluating():
            return super().load_model_state_dict(checkpoint, strict)
        from gpt2dist.errors import CheckpointError

        module = self.lightning_module
        state = checkpoint["state_dict"]
        problem = ""
        if self.is_global_zero:
            expected = set(module.state_dict().keys())
            missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
            if missing or (strict and unexpected):
                problem = f"missing {missing[:3]}, unexpected {unexpected[:3]}"
        problem = self.broadcast(problem)  # every rank stops together (the loads below are collective)
        if problem:
            raise CheckpointError(f"the DeepSpeed checkpoint does not fit this model ({problem}); use the model config it was trained with")
        # Lightning's ZeRO-3 loader: per module, gather, write on rank 0, re-partition.
        self._restore_zero_state(checkpoint, strict=strict)
        if not self.zero_stage_3:  # whole copies per rank (ZeRO-1/2): rank 0's weights to every rank
            for tensor in [*module.parameters(), *module.buffers()]:
                torch.distributed.broadcast(tensor.data, src=0)


# Lightning's ModelParallelStrategy (FSDP2) takes these precisions (and the legacy "32", "bf16" names);
# 16-mixed's GradScaler and 64-true it refuses in a ValueError traceback from inside Trainer(...).
_FSDP2_PRECISIONS = ("32-true", "bf16-mixed", "bf16-true", "16-true")


def check_strategy_precision(strategy, precision) -> None:
    """Before the Trainer is built: refuse, in one line, a precision the chosen strategy cannot run.
    `strategy` is the config's trainer.strategy (a class_path dict or a name), `precision` its value."""
    from gpt2dist.errors import ConfigError

    path = strategy.get("class_path") if hasattr(strategy, "get") else None
    if not isinstance(path, str) or "." not in path:
        return
    try:
        import importlib

        module, _, name = path.rpartition(".")
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return  # jsonargparse names a class it cannot import itself
    legacy = {"32": "32-true", "bf16": "bf16-mixed", "16": "16-mixed", "64": "64-true"}
    given = "32-true" if precision is None else legacy.get(str(precision), str(precision))
    if isinstance(cls, type) and issubclass(cls, ModelParallelStrategy) and given not in _FSDP2_PRECISIONS:
        raise ConfigError(f"trainer.precision={precision}: FSDP2 ({name}) takes {', '.join(_FSDP2_PRECISIONS)}; "
                          "on a GPU without bf16 (V100, T4) use 16-mixed with configs/strategy/ddp.yaml or fsdp1.yaml")


def _gpt2_block_class():
    from transformers.models.gpt2.modeling_gpt2 import GPT2Block

    return GPT2Block


def shard_fsdp2(module, mesh, precision: str = "32-true") -> None:
    """Apply `fully_shard` to each GPT2Block of `module.model`, then to the root (`module`).

    Per-block units overlap one block's all-gather with the previous block's compute; the root
    unit holds the embeddings, final LayerNorm and the (tied) LM head.
    """
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    strategy = module.trainer.strategy if module._trainer is not None else None
    ac = getattr(strategy, "activation_checkpointing", False)
    offload = getattr(strategy, "cpu_offload", False)
    reshard = getattr(strategy, "reshard_after_forward", True)
    mp_mode = getattr(strategy, "mixed_precision", "auto")
    # Pinned host memory (async copies to the GPU) needs an accelerator: on a CPU mesh, plain memory.
    pin = mesh.device_type != "cpu"
    kwargs = {"mesh": mesh, "offload_policy": CPUOffloadPolicy(pin_memory=pin) if offload else OffloadPolicy()}
    if mp_mode == "auto" and "bf16" in str(precision):
        # bf16 compute and all-gathers (half the traffic), fp32 gradient reduce-scatter: summing
        # bf16 gradients over many ranks loses precision (8 mantissa bits).
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    if ac:
        # Hugging Face's own checkpointing keeps parameter names unchanged (a checkpoint_wrapper
        # would add `_checkpoint_wrapped_module.` to every key and break export/resume).
        module.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    block_cls = _gpt2_block_class()
    blocks = [m for m in module.model.modules() if isinstance(m, block_cls)]
    for i, block in enumerate(blocks):
        # The last block is gathered again at once by the root's backward: keep it.
        fully_shard(block, reshard_after_forward=reshard and i < len(blocks) - 1, **kwargs)
    fully_shard(module, reshard_after_forward=reshard, **kwargs)
    log.info("FSDP2: %d GPT2Blocks + root sharded over %d ranks (activation checkpointing %s, CPU offload %s, %s)",
             len(blocks), mesh.size(), ac, offload, "bf16 params / fp32 reduce" if "mp_policy" in kwargs else "fp32")


# ----------------------------------------------------------------------------- DeepSpeed


def deepspeed_offloads_optimizer(strategy) -> bool:
    """True under DeepSpeed with `offload_optimizer`. Then our torch AdamW steps the fp32 CPU
    partitions: DeepSpeed refuses a client optimizer there unless `zero_force_ds_cpu_optimizer`
    is off, and its own DeepSpeedCPUAdam would need a C++ build at start-up on every node."""
    from lightning.pytorch.strategies import DeepSpeedStrategy

    if not isinstance(strategy, DeepSpeedStrategy) or not isinstance(strategy.config, dict):
        return False
    offload = strategy.config.get("zero_optimization", {}).get("offload_optimizer")
    if not offload or offload.get("device", "none") == "none":
        return False
    strategy.config.setdefault("zero_force_ds_cpu_optimizer", False)
    return True



def keeps_own_master_weights(strategy) -> bool | None:
    """Who keeps fp32 master weights when the parameters are bf16 (bf16-true): True for DeepSpeed
    (its bf16 optimizer), None for FSDP1/FSDP2 (their optimizer state is saved per parameter
    through distributed checkpointing: there, bf16-mixed computes in bf16 over fp32 sharded
    parameters instead), False for single device and DDP (gpt2dist.optim.MasterWeightAdamW)."""
    from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy

    if isinstance(strategy, DeepSpeedStrategy):
        return True
    if isinstance(strategy, (FSDPStrategy, ModelParallelStrategy)):
        return None
    return False


class FP32Reduce:
    """State of `fp32_allreduce_hook`: `pending` maps a parameter to its local fp32 gradient sum over
    the accumulation window's earlier micro-batches (MasterWeightAdamW.pending_sums), which the
    last micro-batch's all-reduce adds to the bucket before the mean is taken."""

    def __init__(self, process_group=None):
        self.process_group = process_group
        self.pending: dict = {}


def fp32_allreduce_hook(state, bucket):
    """DDP communication hook: the mean of low-precision (bf16-true) gradients is taken in fp32.

    DDP's own all-reduce sums the bf16 buckets in bf16, one rounding per partial sum: with many
    ranks the mean loses bits that the fp32 master weights would keep. Here the bucket is upcast,
    plus any fp32 sums of earlier micro-batches (`FP32Reduce.pending`: accumulation under no_sync),
    divided by the world size, summed in fp32, and rounded to bf16 once (twice the bytes on the
    wire for the bf16 buckets; fp32 buckets are all-reduced exactly as DDP does by default).
    `state`: an FP32Reduce, or a process group (None: the world).
    """
    import torch.distributed as dist
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    process_group = state.process_group if isinstance(state, FP32Reduce) else state
    pending = state.pending if isinstance(state, FP32Reduce) else {}
    buffer = bucket.buffer()
    if buffer.dtype == torch.float32 and not pending:
        return allreduce_hook(process_group, bucket)
    group = process_group if process_group is not None else dist.group.WORLD
    wide = buffer.float()
    if pending:
        # The bucket lays its parameters' gradients end to end, in bucket.parameters() order.
        offset = 0
        for p in bucket.parameters():
            total = pending.get(p)
            if total is not None:
                wide[offset:offset + p.numel()].add_(total.view(-1))
            offset += p.numel()
    wide.div_(dist.get_world_size(group))
    fut = dist.all_reduce(wide, group=group, async_op=True).get_future()

    def narrow(fut):
        return buffer.copy_(fut.value()[0])  # fp32 -> bf16, round to nearest

    return fut.then(narrow)


def use_fp32_gradient_reduce(trainer) -> bool:
    """Under DDP with bf16 parameters (trainer.precision bf16-true), register `fp32_allreduce_hook`
    on the DDP wrapper (before the first backward), its FP32Reduce state at `ddp._gpt2dist_fp32_reduce`.
    Returns whether it did."""
    from torch.nn.parallel import DistributedDataParallel

    ddp = getattr(trainer.strategy, "model", None)
    if not isinstance(ddp, DistributedDataParallel) or getattr(ddp, "_gpt2dist_fp32_reduce", None) is not None:
        return False
    if getattr(trainer.strategy, "_ddp_comm_hook", None) is not None:
        return False  # the user's own hook (strategy.init_args.ddp_comm_hook) wins
    if not any(p.dtype == torch.bfloat16 for p in ddp.parameters()):
        return False
    state = FP32Reduce(ddp.process_group)
    ddp.register_comm_hook(state, fp32_allreduce_hook)
    ddp._gpt2dist_fp32_reduce = state
    return True


def fp32_reduce_state(trainer) -> FP32Reduce | None:
    """The FP32Reduce state of the DDP wrapper's fp32_allreduce_hook, when registered."""
    state = getattr(getattr(trainer.strategy, "model", None), "_gpt2dist_fp32_reduce", None)
    return state if isinstance(state, FP32Reduce) else None


def is_zero3_partitioned(model: torch.nn.Module) -> bool:
    """True when `model`'s parameters were created inside `deepspeed.zero.Init` (ZeRO-3)."""
    return any(hasattr(p, "ds_id") for p in model.parameters())


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_available() and torch.distributed.is_initialized() else 0


def _post_order(module: torch.nn.Module):
    """`module` and its descendants in `Module.apply`'s order (children first)."""
    for child in module.children():
        yield from _post_order(child)
    yield module


def init_partitioned(model, state_dict: dict | None) -> None:
    """Write weights into a ZeRO-3 partitioned model: `state_dict` (pretrained), or Hugging Face's
    GPT-2 initialisation when None.

    All ranks gather the full parameters (`GatheredParameters`, modifier_rank=0), rank 0 writes
    them, and DeepSpeed broadcasts and re-partitions on exit. The full model is briefly
    materialised on every GPU (1.5B params x 4 bytes = 6 GB), never the optimizer state.
    """
    import deepspeed

    params = list(model.parameters())
    with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
        if _rank() == 0:
            with torch.no_grad():
                if state_dict is None:
                    for p in params:  # HF's init functions skip tensors marked initialised
                        p._is_hf_initialized = False
                    # Not model.apply: inside zero.Init DeepSpeed patches Module.apply into a per-module
                    # gather + broadcast that every rank must join, and only rank 0 is here (a deadlock).
                    # Same post-order as apply: children before parents, so parents' inits win.
                    for module in _post_order(model):
                        model._init_weights(module)
                else:
                    missing, unexpected = model.load_state_dict(state_dict, strict=False)
                    missing = [k for k in missing if k != "lm_head.weight"]  # tied to wte
                    if missing or unexpected:
                        raise RuntimeError(f"pretrained weights do not fit: missing {missing[:3]}, unexpected {unexpected[:3]}")


def pretrained_state_dict(folder: str) -> dict:
    """The weights of a local Hugging Face GPT-2 folder (safetensors or pytorch_model.bin), on CPU."""
    import glob
    import os

    from safetensors.torch import load_file

    files = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
    state: dict = {}
    if files:
        for f in files:
            state.update(load_file(f))
    else:
        bins = sorted(glob.glob(os.path.join(folder, "pytorch_model*.bin")))
        if not bins:
            raise FileNotFoundError(f"no *.safetensors or pytorch_model*.bin in {folder}")
        for f in bins:
            state.update(torch.load(f, map_location="cpu", weights_only=True))
    # Old GPT-2 checkpoints store the base model without the `transformer.` prefix.
    if not any(k.startswith("transformer.") for k in state):
        state = {f"transformer.{k}": v for k, v in state.items()}
    return {k: v for k, v in state.items() if not k.endswith((".attn.bias", ".attn.masked_bias"))}


# ----------------------------------------------------------------------------- gathering


def is_sharded(trainer) -> bool:
    """True when the model's parameters are split across ranks (FSDP1/FSDP2/ZeRO-3)."""
    from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy

    strategy = trainer.strategy
    if isinstance(strategy, (FSDPStrategy, ModelParallelStrategy)):
        return True
    return isinstance(strategy, DeepSpeedStrategy) and strategy.zero_stage_3


def needs_gather(trainer) -> bool:
    """True when `pl_module.model` cannot be saved as is: sharded, or DeepSpeed's bf16 copy."""
    from lightning.pytorch.strategies import DeepSpeedStrategy

    return is_sharded(trainer) or isinstance(trainer.strategy, DeepSpeedStrategy)


def full_state_dict(trainer, pl_module) -> dict:
    """`pl_module.model`'s full weights as fp32 CPU tensors on rank 0 ({} on the other ranks).
    Every rank must call it (the gathers are collective)."""
    from lightning.pytorch.strategies import DeepSpeedStrategy

    strategy = trainer.strategy
    if isinstance(strategy, DeepSpeedStrategy):
        # DeepSpeed trains bf16/fp16 copies of the weights; export its fp32 master weights.
        # safe_get_full_fp32_param is collective under ZeRO-3 (every rank must call it).
        from deepspeed.utils import safe_get_full_fp32_param

        model = pl_module.model
        keys = set(model.state_dict().keys())
        out = {}
        for name, p in model.named_parameters():
            full = safe_get_full_fp32_param(p)
            if full is None:  # no optimizer mapping (e.g. frozen): the parameter itself
                import deepspeed

                with deepspeed.zero.GatheredParameters([p], enabled=hasattr(p, "ds_id")):
                    full = p.detach().clone()
            if trainer.is_global_zero:
                out[name] = full.detach().float().cpu().clone()
        if trainer.is_global_zero:
            out.update({n: b.detach().cpu().clone() for n, b in model.named_buffers() if n in keys})
        return out
    if is_sharded(trainer):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        # FSDP1 and FSDP2 alike; cpu_offload=True leaves the full dict on rank 0 only. FSDP1 on a CPU
        # device (tests) cannot "offload" to where it already is: it frees the storage it copies from.
        from lightning.pytorch.strategies import FSDPStrategy

        offload = not (isinstance(strategy, FSDPStrategy) and pl_module.device.type == "cpu")
        state = get_model_state_dict(strategy.model, options=StateDictOptions(full_state_dict=True, cpu_offload=offload))
        if not trainer.is_global_zero:
            return {}
        prefix = "model."
        return {k[len(prefix):]: v.float() for k, v in state.items() if k.startswith(prefix)}
    if not trainer.is_global_zero:
        return {}
    return {k: v.detach().float().cpu().clone() for k, v in pl_module.model.state_dict().items()}


def fitting_state_dict(model, state: dict, source: str) -> dict:
    """`state` checked against the partitioned model on every rank, before any collective (a rank raising
    inside the gather would leave the others waiting): a missing or misshapen tensor is a one-line error;
    extra tensors (fewer layers by config_overrides) are dropped with a warning, as from_pretrained does."""
    from lightning.pytorch.utilities import rank_zero_warn

    from gpt2dist.errors import ConfigError

    shapes = {n: tuple(getattr(p, "ds_shape", p.shape)) for n, p in model.named_parameters()}
    missing = [n for n in shapes if n not in state and n != "lm_head.weight"]  # lm_head is tied to wte
    misshapen = [f"{n} {tuple(state[n].shape)} != {shapes[n]}" for n in shapes if n in state and tuple(state[n].shape) != shapes[n]]
    if missing or misshapen:
        raise ConfigError(f"pretrained weights from model.model_name_or_path={source!r} do not fit the model config "
                          f"(missing {missing[:3]}, shapes {misshapen[:3]}); drop model.config_overrides that change "
                          f"shapes, or set model.from_scratch=true")
    unexpected = [k for k in state if k not in shapes and k != "lm_head.weight"]
    if unexpected:
        rank_zero_warn(f"pretrained weights from {source!r}: {len(unexpected)} tensors the model config has no place "
                       f"for are not used ({unexpected[:3]})")
    return {k: v for k, v in state.items() if k in shapes}


def build_zero3_model(config, hparams):
    """A GPT2LMHeadModel built inside DeepSpeed's `zero.Init` (ZeRO-3), with correct weights:
    pretrained ones from a local folder (or the hub cache), else Hugging Face's initialisation."""
    import os

    from transformers import GPT2LMHeadModel

    from gpt2dist.errors import ConfigError

    model = GPT2LMHeadModel(config)
    state = None
    if not hparams.from_scratch:
        path = hparams.model_name_or_path
        if not os.path.isdir(path):
            try:
                from huggingface_hub import snapshot_download

                path = snapshot_download(path, allow_patterns=["*.safetensors", "*.json"])
            except Exception as e:
                raise ConfigError(f"cannot fetch pretrained weights for {path!r} under ZeRO-3 ({type(e).__name__}); "
                                  "give a local folder, or set model.from_scratch=true") from None
        try:
            state = pretrained_state_dict(path)
        except Exception as e:  # no weight file, a corrupt one
            raise ConfigError(f"cannot load pretrained weights from model.model_name_or_path={hparams.model_name_or_path!r} "
                              f"under ZeRO-3 ({type(e).__name__}: {str(e).splitlines()[0][:160]}); give a folder with "
                              f"model.safetensors, or set model.from_scratch=true") from None
        state = fitting_state_dict(model, state, hparams.model_name_or_path)
    init_partitioned(model, state)
    model.tie_weights()
    return model
