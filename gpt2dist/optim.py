"""AdamW with fp32 master weights for bf16 parameters (`trainer.precision: bf16-true`).

Under bf16-true the model's weights, activations and gradients are bf16: no autocast casts
each forward, and half the bytes move through every elementwise kernel. But AdamW stepping
bf16 weights directly loses every update below bf16's resolution (8 mantissa bits: a weight of
1.0 only moves in steps of 2^-7 ~ 0.008, and lr x update is often 1e-4). `MasterWeightAdamW`
keeps an fp32 master copy of each weight, as DeepSpeed's bf16 optimizer and llm.c do:

    master_grad = fp32(p.grad);  AdamW(master, master_grad) in fp32;  p = bf16(master)  (round to nearest)

Memory per parameter: 2 (bf16 weight) + 2 (bf16 grad) + 4 (master) + 4 (fp32 grad buffer)
+ 8 (m, v) = 20 bytes, against 16 under bf16-mixed (4 + 4 + 8). Single device and DDP; the
sharded strategies keep fp32 parameters themselves (FSDP2/FSDP1 under bf16-mixed, DeepSpeed's
bf16 optimizer).

Gradient accumulation sums in fp32, in that same grad buffer (no extra memory): summed in the
bf16 `p.grad`, every micro-batch would round the running sum (8 micro-batches: 7 roundings, and a
small gradient added to a large sum loses its low bits). `accumulate()` after each micro-batch
that does not step moves the bf16 grads into the fp32 sums; the last micro-batch's grads get the
sums added with one rounding: `fold()` on one device, or the fp32 all-reduce under DDP
(`gpt2dist.strategies.fp32_allreduce_hook` reads `pending_sums()`), so clipping, the NaN guard
and grad-norm logging see the whole window's gradient in `p.grad`. GPT2Module calls them.

`param_groups` hold the model's own (bf16) parameters, so LR schedulers, gradient clipping and
grad-norm logging see them. Its `state_dict()` is a plain AdamW state dict (the fp32 moments,
indexed like the groups) plus `masters` by parameter name: plain AdamW can resume from it, and
GPT2Module moves the masters into the checkpoint's `state_dict` so they are stored once.
"""

from __future__ import annotations

import torch
from lightning.pytorch.utilities import rank_zero_warn

HYPER = ("lr", "betas", "eps", "weight_decay")  # what schedulers or users may change per group


class MasterWeightAdamW(torch.optim.Optimizer):
    """AdamW over fp32 master copies of low-precision parameters (see the module docstring)."""

    def __init__(self, named_groups: list[dict], lr: float, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.01, fused: bool = False):
        """
        Args:
            named_groups: Param groups whose "params" are (name, parameter) pairs; names key the masters in state_dict.
            lr: Learning rate.
            betas: AdamW betas.
            eps: AdamW epsilon.
            weight_decay: Decoupled weight decay (a group may override it).
            fused: The fused CUDA AdamW kernel for the fp32 step.
        """
        self.names = [[n for n, _ in g["params"]] for g in named_groups]
        groups = [{**g, "params": [p for _, p in g["params"]]} for g in named_groups]
        super().__init__(groups, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        with torch.no_grad():
            masters = [[p.detach().float().clone() for p in g["params"]] for g in self.param_groups]
        self.inner = torch.optim.AdamW(
            [{**{k: g[k] for k in HYPER}, "params": ms} for g, ms in zip(self.param_groups, masters)],
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, fused=fused)
        self._grads: list[torch.Tensor] = []  # fp32 grad views of one flat buffer, set up on the first step
        self._grads_key: tuple = ()  # the masters they belong to
        self._pending: list[torch.nn.Parameter] = []  # parameters whose fp32 grad holds a micro-batch sum

    def add_param_group(self, param_group: dict) -> None:
        """A group added after construction (e.g. Lightning's BaseFinetuning unfreezing a layer) gets
        its masters too: without them its parameters never stepped."""
        super().add_param_group(param_group)
        if hasattr(self, "inner"):  # not the first groups, which torch.optim.Optimizer.__init__ adds
            self._sync_groups()

    def _sync_groups(self) -> None:
        """Masters and an inner group for each group the inner AdamW lacks: added by add_param_group, or
        set whole (BaseFinetuning restores `optimizer.param_groups = ...` on resume, before the state
        loads). Their masters are named by position, param_group<i>.<j>, the same either way."""
        have = len(self.inner.param_groups)
        if len(self.param_groups) < have:
            raise RuntimeError(f"MasterWeightAdamW: {have - len(self.param_groups)} param group(s) were removed; "
                               "their fp32 masters cannot follow (add groups, or rebuild the optimizer)")
        for i in range(have, len(self.param_groups)):
            group = self.param_groups[i]
            with torch.no_grad():
                masters = [p.detach().float().clone() for p in group["params"]]
            self.inner.add_param_group({**{k: group[k] for k in HYPER}, "params": masters})
            self.names.append([f"param_group{i}.{j}" for j in range(len(masters))])

    def pairs(self):
        """(model parameter, its fp32 master), group by group."""
        self._sync_groups()
        for g, ig in zip(self.param_groups, self.inner.param_groups):
            yield from zip(g["params"], ig["params"])

    def masters(self) -> dict[str, torch.Tensor]:
        """{parameter name: its fp32 master}."""
        names = [n for group in self.names for n in group]
        return {n: m for n, (_, m) in zip(names, self.pairs())}

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._sync_groups()
        for g, ig in zip(self.param_groups, self.inner.param_groups):
            ig.update({k: g[k] for k in HYPER})
        if self._pending:  # accumulated sums that no one added to p.grad yet
            self.fold()
        pairs = [(p, m) for p, m in self.pairs() if p.grad is not None]
        if not pairs:
            return loss
        params = [p for p, _ in pairs]
        self._fp32_grads(pairs)
        torch._foreach_copy_(self._grads, [p.grad for p in params])  # bf16 -> fp32, exact
        # The NaN guard's flag (gpt2dist/faults.py): the fused kernel skips the step when it is set.
        self.inner.found_inf = getattr(self, "found_inf", None)
        self.inner.step()
        torch._foreach_copy_(params, [m for _, m in pairs])  # fp32 -> bf16, round to nearest
        return loss

    def _fp32_grads(self, pairs: list) -> list[torch.Tensor]:
        """The fp32 grads of these (parameter, master) pairs: views of one flat buffer, set up again
        when another set of parameters has gradients."""
        masters = [m for _, m in pairs]
        key = tuple(id(m) for m in masters)
        if key != self._grads_key:  # first step, or another set of parameters has gradients
            if self._pending:
                self.fold()  # the sums go back into p.grad before their buffer is replaced
            for _, m in self.pairs():
                m.grad = None  # a master without a fresh gradient must not step on a stale one
            flat = torch.empty(sum(m.numel() for m in masters), dtype=torch.float32, device=masters[0].device)
            for v, m in zip(flat.split([m.numel() for m in masters]), masters):
                m.grad = v.view_as(m)
            self._grads, self._grads_key = [m.grad for m in masters], key
        return self._grads

    @torch.no_grad()
    def accumulate(self) -> None:
        """After the backward of a micro-batch that does not step: add the bf16 grads to the fp32
        sums and zero them (the tensors stay: DDP may hold views of them)."""
        pairs = [(p, m) for p, m in self.pairs() if p.grad is not None]
        if not pairs:
            return
        grads = [p.grad for p, _ in pairs]
        sums = self._fp32_grads(pairs)
        if self._pending:
            torch._foreach_add_(sums, grads)
        else:  # the window's first micro-batch: the buffer still holds the last step's grads
            torch._foreach_copy_(sums, grads)
        torch._foreach_zero_(grads)
        self._pending = [p for p, _ in pairs]

    def pending_sums(self) -> dict[torch.nn.Parameter, torch.Tensor]:
        """{parameter: its fp32 gradient sum over the window's earlier micro-batches}; empty when
        nothing was accumulated."""
        return dict(zip(self._pending, self._grads)) if self._pending else {}

    @torch.no_grad()
    def fold(self) -> None:
        """After the last micro-batch's backward (one device): p.grad = bf16(p.grad + fp32 sum),
        one rounding for the whole window."""
        if self._pending:
            for p, total in zip(self._pending, self._grads):
                if p.grad is None:
                    p.grad = total.to(p.dtype)
                else:
                    p.grad.add_(total)  # computed in fp32 (type promotion), rounded once to bf16
        self._pending = []

    def discard_pending(self) -> None:
        """The sums were consumed elsewhere (DDP's fp32 all-reduce added them to the buckets)."""
        self._pending = []

    @torch.no_grad()
    def to(self, device: torch.device) -> MasterWeightAdamW:
        """Move the masters and the inner AdamW's state (moments, steps) to `device`, in place (the
        inner optimizer keys its state by the master tensors). The fp32 grad buffer is dropped: the
        next step sets it up again."""
        if self._pending:
            self.fold()
        for _, m in self.pairs():
            m.grad = None
            torch.utils.swap_tensors(m, m.to(device))  # the same tensor object, now on `device`
        self._grads, self._grads_key = [], ()
        for st in self.inner.state.values():
            for k, v in st.items():
                if torch.is_tensor(v):
                    st[k] = v.to(device)
        return self

    def state_dict(self) -> dict:
        sd = self.inner.state_dict()  # fp32 moments and steps, groups indexed 0..n-1 as ours
        for saved, group in zip(sd["param_groups"], self.param_groups):
            # Ours, not the inner copy synced at the last step: a scheduler has set the next lr since.
            saved.update({k: v for k, v in group.items() if k != "params"})
        sd["masters"] = self.masters()
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        """Loads our own state dict, or a plain AdamW one (then the masters start from the weights)."""
        self._sync_groups()
        self.inner.load_state_dict({"state": state_dict["state"], "param_groups": state_dict["param_groups"]})
        for g, saved in zip(self.param_groups, state_dict["param_groups"]):
            g.update({k: v for k, v in saved.items() if k != "params"})
        masters = state_dict.get("masters")
        mine = self.masters()
        if not isinstance(masters, dict) or not set(mine) <= set(masters):
            rank_zero_warn("the optimizer state holds no fp32 master weights (saved without model.master_weights, or "
                           "under another precision): they start from the current bf16 weights")
            masters = {n: p for n, p in zip(mine, (p for p, _ in self.pairs()))}
        with torch.no_grad():
            for name, m in mine.items():
                m.copy_(masters[name])


def skips_on_found_inf(optimizer) -> bool:
    """Whether `optimizer.step()` leaves weights, moments and step count untouched when its
    `found_inf` attribute is a tensor holding 1: the fused AdamW kernel's contract with
    GradScaler (`_step_supports_amp_scaling`), also through MasterWeightAdamW's inner AdamW."""
    inner = optimizer.inner if isinstance(optimizer, MasterWeightAdamW) else optimizer
    # The groups too: load_state_dict replaces them (GPT2Module puts this run's kernel back at train start).
    return bool(getattr(inner, "_step_supports_amp_scaling", False)) and all(g.get("fused") for g in inner.param_groups)
