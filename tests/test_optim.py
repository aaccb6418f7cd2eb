"""gpt2dist/optim.py: AdamW over fp32 master copies of bf16 weights (trainer.precision bf16-true)."""

from __future__ import annotations

import io
import warnings
from types import SimpleNamespace

import pytest
import torch

from gpt2dist.optim import MasterWeightAdamW

KW = dict(lr=1e-3, betas=(0.9, 0.95), eps=1e-8)


def bf16_params(seed: int = 0) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(8, 4, generator=g).bfloat16()),
            torch.nn.Parameter(torch.randn(4, generator=g).bfloat16())]


def named(params, wd: float = 0.1) -> list[dict]:
    return [{"params": [("w", params[0])], "weight_decay": wd}, {"params": [("b", params[1])], "weight_decay": 0.0}]


def grads(step: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return [torch.randn(8, 4, generator=g).bfloat16(), torch.randn(4, generator=g).bfloat16()]


def run(opt, params, steps: range, lr_scale=lambda s: 1.0):
    for s in steps:
        for p, gr in zip(params, grads(s)):
            p.grad = gr.clone()
        for group in opt.param_groups:
            group["lr"] = KW["lr"] * lr_scale(s)  # as an LR scheduler writes it
        opt.step()
        opt.zero_grad()


def test_masters_follow_fp32_adamw_exactly_and_weights_are_their_rounding():
    params = bf16_params()
    opt = MasterWeightAdamW(named(params), weight_decay=0.1, **KW)
    # Reference: plain fp32 AdamW on fp32 copies, fed the same (bf16-valued) gradients.
    ref = [torch.nn.Parameter(p.detach().float()) for p in params]
    ref_opt = torch.optim.AdamW([{"params": [ref[0]], "weight_decay": 0.1}, {"params": [ref[1]], "weight_decay": 0.0}], **KW)
    sched = lambda s: (s + 1) / 5  # noqa: E731 - a warmup: the masters must see each new lr
    run(opt, params, range(5), sched)
    for s in range(5):
        for r, gr in zip(ref, grads(s)):
            r.grad = gr.float()
        for group in ref_opt.param_groups:
            group["lr"] = KW["lr"] * sched(s)
        ref_opt.step()
    masters = opt.masters()
    assert torch.equal(masters["w"], ref[0].detach()) and torch.equal(masters["b"], ref[1].detach())
    for p, m in zip(params, masters.values()):
        assert p.dtype == torch.bfloat16 and m.dtype == torch.float32
        assert torch.equal(p.detach(), m.bfloat16())  # round to nearest of the master


def test_a_group_added_later_gets_masters_and_steps_as_if_it_was_there_from_the_start():
    """add_param_group (Lightning's BaseFinetuning unfreezing a layer) added the parameters to the outer
    groups only: they never stepped, silently, and had no masters in the state dict."""
    params, later = bf16_params(), bf16_params()
    opt = MasterWeightAdamW(named(params)[:1], weight_decay=0.1, **KW)
    opt.add_param_group({"params": [later[1]], "weight_decay": 0.0})  # as BaseFinetuning's unfreeze passes it
    opt.add_param_group({"params": [params[1]], "weight_decay": 0.0})
    ref_params = bf16_params()
    ref = MasterWeightAdamW(named(ref_params), weight_decay=0.1, **KW)  # the same groups from the start
    run(opt, [params[0], later[1]], range(3))
    run(ref, ref_params, range(3))
    assert torch.equal(params[0], ref_params[0]) and torch.equal(later[1], ref_params[1])
    assert not torch.equal(later[1], bf16_params()[1])  # it stepped
    assert list(opt.masters()) == ["w", "param_group1.0", "param_group2.0"] and len(opt.state_dict()["masters"]) == 3
    assert len(opt.inner.param_groups) == 3 and opt.inner.param_groups[1]["weight_decay"] == 0.0
    # A resume (a new process: new parameters, the state through torch.save): BaseFinetuning sets
    # `optimizer.param_groups` whole on the new optimizer, then the optimizer state loads.
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    saved = torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)
    new = [torch.nn.Parameter(p.detach().clone()) for p in (params[0], later[1], params[1])]
    resumed = MasterWeightAdamW([{"params": [("w", new[0])], "weight_decay": 0.1}], **KW)
    resumed.param_groups = [resumed.param_groups[0], *({**g, "params": [q]} for g, q in zip(opt.param_groups[1:], new[1:]))]
    resumed.load_state_dict(saved)  # was "a different number of parameter groups"
    assert all(torch.equal(m, saved["masters"][n]) for n, m in resumed.masters().items()) and len(resumed.masters()) == 3
    run(resumed, new[:2], range(3, 5))
    run(opt, [params[0], later[1]], range(3, 5))
    assert torch.equal(new[1], later[1]) and torch.equal(new[0], params[0])  # resumed exactly


def test_teardown_moves_the_masters_and_moments_off_the_training_device():
    """Lightning's teardown moves optimizer.state to the CPU; ours lives in the inner AdamW, keyed by the
    masters, and stayed on the GPU after fit (16 B/param). GPT2Module.teardown now moves it, in place."""
    from gpt2dist.model import GPT2Module

    params = bf16_params()
    opt = MasterWeightAdamW(named(params), weight_decay=0.1, **KW)
    run(opt, params, range(2))
    before = {n: m.clone() for n, m in opt.masters().items()}
    module = GPT2Module(from_scratch=True, config_overrides={"n_layer": 1, "n_embd": 8, "n_head": 2, "vocab_size": 16})
    module._trainer = SimpleNamespace(optimizers=[opt])
    module.teardown("fit")  # to the CPU: where they are; then somewhere observable
    assert all(torch.equal(m, before[n]) for n, m in opt.masters().items())
    opt.to(torch.device("meta"))
    tensors = [*opt.masters().values(), *(v for st in opt.inner.state.values() for v in st.values() if torch.is_tensor(v))]
    assert len(tensors) == 2 + 2 * 3 and all(t.is_meta for t in tensors)  # masters; exp_avg, exp_avg_sq, step
    assert set(map(id, opt.inner.state)) == {id(m) for _, m in opt.pairs()}  # the same tensors: state still keyed


def test_a_parameter_without_a_gradient_does_not_step():
    params = bf16_params()
    opt = MasterWeightAdamW(named(params, wd=0.0), **KW)
    run(opt, params, range(2))
    frozen, w_before = (params[1].detach().clone(), opt.masters()["b"].clone()), opt.masters()["w"].clone()
    params[0].grad = grads(2)[0]  # "b" gets none this step (adam would still move it on its momentum)
    opt.step()
    assert torch.equal(params[1].detach(), frozen[0]) and torch.equal(opt.masters()["b"], frozen[1])
    assert not torch.equal(opt.masters()["w"], w_before)  # "w" did step


def test_small_updates_accumulate_in_the_masters_but_are_lost_in_plain_bf16_adamw():
    # lr 1e-4 on weights near 1: each step moves a weight by ~1e-4, below bf16's spacing at 1.0 (2^-7).
    p_master = torch.nn.Parameter(torch.ones(64, dtype=torch.bfloat16))
    p_plain = torch.nn.Parameter(torch.ones(64, dtype=torch.bfloat16))
    opt = MasterWeightAdamW([{"params": [("p", p_master)]}], lr=1e-4, weight_decay=0.0)
    plain = torch.optim.AdamW([p_plain], lr=1e-4, weight_decay=0.0)
    for _ in range(200):
        for p, o in ((p_master, opt), (p_plain, plain)):
            p.grad = torch.ones_like(p)
            o.step()
    assert torch.equal(p_plain.detach(), torch.ones(64, dtype=torch.bfloat16))  # 200 updates, all lost
    assert torch.allclose(opt.masters()["p"], torch.full((64,), 1 - 200 * 1e-4), atol=1e-5)  # ~0.98
    assert (p_master.detach() < 1).all()  # and the bf16 weights followed


def test_state_dict_resumes_exactly_and_loads_into_plain_adamw():
    params = bf16_params()
    opt = MasterWeightAdamW(named(params), **KW)
    run(opt, params, range(3))
    for group in opt.param_groups:
        group["lr"] = 0.5 * KW["lr"]  # a scheduler sets the next step's lr after each step: saved is that one
    sd = opt.state_dict()
    assert [g["lr"] for g in sd["param_groups"]] == [0.5 * KW["lr"]] * 2
    assert set(sd["masters"]) == {"w", "b"} and all(v.dtype == torch.float32 for v in sd["masters"].values())
    assert sd["state"][0]["exp_avg"].dtype == torch.float32  # fp32 moments, indexed like a plain AdamW
    saved = {k: v.clone() if torch.is_tensor(v) else v for k, v in sd["masters"].items()}

    # Resume in a fresh optimizer over fresh (rounded) weights: steps 3..5 equal the uninterrupted run.
    resumed_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    resumed = MasterWeightAdamW(named(resumed_params), **KW)
    resumed.load_state_dict(torch.load(_roundtrip(sd), weights_only=True))
    assert torch.equal(resumed.masters()["w"], saved["w"])  # not re-derived from the bf16 weights
    assert [g["lr"] for g in resumed.param_groups] == [0.5 * KW["lr"]] * 2
    run(opt, params, range(3, 6))
    run(resumed, resumed_params, range(3, 6))
    for a, b in zip(params, resumed_params):
        assert torch.equal(a, b)
    assert all(torch.equal(opt.masters()[k], resumed.masters()[k]) for k in ("w", "b"))

    # A plain AdamW (e.g. after switching to bf16-mixed) takes the moments from it.
    fp32 = [torch.nn.Parameter(m.clone()) for m in saved.values()]
    plain = torch.optim.AdamW([{"params": [fp32[0]], "weight_decay": 0.01}, {"params": [fp32[1]], "weight_decay": 0.0}], **KW)
    plain.load_state_dict(sd)
    assert torch.equal(plain.state[fp32[0]]["exp_avg"], sd["state"][0]["exp_avg"])


def test_accumulated_micro_batches_are_summed_in_fp32_and_rounded_once():
    """accumulate() x 7, then fold(): p.grad is the fp32 sum of the 8 bf16 micro-batch gradients,
    rounded once; summing in the bf16 p.grad (7 roundings) misses it on many elements."""
    params = bf16_params()
    opt = MasterWeightAdamW(named(params), **KW)
    micro = [grads(k) for k in range(8)]
    for k, gs in enumerate(micro):
        for p, g in zip(params, gs):
            p.grad = g.clone() if p.grad is None else p.grad.add_(g)  # as autograd accumulates
        if k < 7:
            opt.accumulate()
            assert all(not p.grad.any() for p in params)  # moved into the fp32 sums
    opt.fold()
    for i, p in enumerate(params):
        exact = micro[0][i].float()
        for gs in micro[1:7]:
            exact += gs[i].float()
        exact = (micro[7][i].float() + exact).bfloat16()
        assert torch.equal(p.grad, exact)
        assert i == 1 or (_bf16_running_sum([gs[i] for gs in micro]) != exact).sum() > 0  # the problem (w: 32 elements; b has only 4)
    # The step steps on the folded gradient, and the next window starts from zero.
    opt.step()
    assert opt.pending_sums() == {}


def test_step_folds_sums_that_no_one_added():
    """accumulate() then step() without fold(): the step folds the sums itself (none are lost)."""
    a, b = bf16_params(), bf16_params()
    folded, unfolded = MasterWeightAdamW(named(a), **KW), MasterWeightAdamW(named(b), **KW)
    for opt, params in ((folded, a), (unfolded, b)):
        for k in range(3):
            for p, g in zip(params, grads(k)):
                p.grad = g.clone() if p.grad is None else p.grad.add_(g)
            if k < 2:
                opt.accumulate()
        if opt is folded:
            opt.fold()
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(a, b))
    assert not torch.equal(a[0], bf16_params()[0])  # it stepped


@pytest.mark.parametrize("devices", [1, 2])
def test_bf16_true_fit_sums_accumulated_gradients_in_fp32(tmp_path, corpus_dir, tokenizer_dir, devices):
    """`gpt2dist fit`, bf16-true, 8 micro-batches per step (1 process, and DDP x2 under no_sync):
    the gradient the first optimizer step sees equals, on every element, the fp32 sum of the
    recorded micro-batch gradients (under DDP: each rank's fp32 sum / 2, all-reduced in fp32),
    rounded once to bf16."""
    from conftest import REPO
    from test_faults import cli, ok, overlay, write_config

    config = write_config(tmp_path, corpus_dir, tokenizer_dir, "acc", devices=devices, dropout=0.0)
    hooks = overlay(tmp_path / "acc", {"class_path": "fault_plugins.RecordGrads", "init_args": {"out": str(tmp_path)}})
    ok(cli(config, "--config", str(hooks), "--trainer.precision", "bf16-true", "--trainer.max_steps", "1",
           "--trainer.accumulate_grad_batches", "8", "--trainer.val_check_interval", "8",  # a multiple of the 8 (faults.py)
           "--data.batch_size", "1", "--export.enabled", "false",
           *(["--config", str(REPO / "configs/strategy/ddp.yaml")] if devices > 1 else [])))
    ranks = [torch.load(tmp_path / f"grads-rank{r}.pt", weights_only=True) for r in range(devices)]
    assert all(len(r["micro"]) == 8 for r in ranks)
    names = ranks[0]["final"].keys()
    mismatched = 0
    for n in names:
        wide = []
        for r in ranks:
            total = r["micro"][0][n].float()
            for m in r["micro"][1:7]:
                total += m[n].float()
            wide.append((r["micro"][7][n].float() + total) / devices)
        exact = sum(wide[1:], wide[0]).bfloat16()
        for r in ranks:
            assert torch.equal(r["final"][n], exact), n
        bf16_sums = [_bf16_running_sum([m[n] for m in r["micro"]]) for r in ranks]
        mismatched += (sum(s.float() / devices for s in bf16_sums).bfloat16() != exact).sum().item()
    assert mismatched > 0  # summing in bf16 would have missed them


def _bf16_running_sum(tensors: list[torch.Tensor]) -> torch.Tensor:
    total = tensors[0].clone()
    for t in tensors[1:]:
        total += t
    return total


def _roundtrip(sd: dict):
    import io

    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return buf


@pytest.mark.flaky(reruns=1, only_rerun=["resume not bitwise"])  # as tests/test_faults.py's resume tests
def test_bf16_true_ddp_kill_resume_is_bitwise_exact_and_exports_the_fp32_masters(tmp_path, corpus_dir, tokenizer_dir):
    """`gpt2dist fit` under trainer.precision bf16-true, DDP x2 (accumulation 2, dropout 0.1; gradient
    mean in fp32): the checkpoint's state_dict holds the fp32 masters once (the optimizer state points there), the
    export holds them too, and a SIGKILL mid-accumulation + `--ckpt_path last` ends bitwise equal."""
    from safetensors.torch import load_file

    from conftest import REPO
    from test_faults import assert_bitwise, cli, kill, ok, resume, run_dir, weights, write_config

    args = ["--config", str(REPO / "configs/strategy/ddp.yaml"), "--trainer.precision", "bf16-true"]
    ref = write_config(tmp_path, corpus_dir, tokenizer_dir, "bf16_ref", devices=2)
    p = ok(cli(ref, *args))
    assert "DDP: bf16 gradients are all-reduced in fp32" in p.stderr  # gpt2dist.strategies.fp32_allreduce_hook
    ckpt = torch.load(run_dir(ref) / "checkpoints" / "step0000006.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["optimizer_states"][0]["masters"] == "state_dict"  # stored once
    state = {k[len("model."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("model.") and v.is_floating_point()}
    assert {v.dtype for v in state.values()} == {torch.float32}
    # Masters, not bf16 weights cast up: after 6 steps almost no weight lies on the bf16 grid.
    off_grid = sum((v != v.bfloat16().float()).sum().item() for v in state.values())
    assert off_grid > 0.9 * sum(v.numel() for v in state.values())
    exported = load_file(run_dir(ref) / "hf_model" / "model.safetensors")
    assert all(exported[k].dtype == torch.float32 and torch.equal(exported[k], state[k]) for k in exported)

    config = write_config(tmp_path, corpus_dir, tokenizer_dir, "bf16_kill", devices=2)
    kill(config, {"step": 4, "when": "mid_accumulation"}, *args)
    resumed = resume(config, *args)
    assert "(global_step 3" in resumed.stderr
    assert_bitwise(weights(run_dir(config)), weights(run_dir(ref)))


def test_bf16_true_resumes_a_32_true_checkpoint_with_its_fp32_weights_as_masters(tmp_path, corpus_dir, tokenizer_dir):
    from test_faults import cli, ok, run_dir, write_config

    fp32 = write_config(tmp_path, corpus_dir, tokenizer_dir, "fp32", dropout=0.0)
    ok(cli(fp32))
    ckpt = run_dir(fp32) / "checkpoints" / "step0000005.ckpt"
    switched = write_config(tmp_path, corpus_dir, tokenizer_dir, "switched", dropout=0.0)
    p = ok(cli(switched, "--trainer.precision", "bf16-true", "--ckpt_path", str(ckpt)))
    assert "no fp32 master weights" not in p.stderr  # the 32-true weights became the masters, not their rounding
    before = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    after = torch.load(run_dir(switched) / "checkpoints" / "step0000006.ckpt", map_location="cpu", weights_only=True)
    assert after["optimizer_states"][0]["masters"] == "state_dict"
    # One bf16-true step from the fp32 weights: the masters moved by about lr, not by bf16 rounding.
    deltas = [(after["state_dict"][k] - v).abs().max().item() for k, v in before.items() if v.is_floating_point()]
    assert 0 < max(deltas) < 5e-3


def test_which_optimizer_each_precision_and_strategy_gets():
    """bf16 weights on one device/DDP: masters; switched off, or under FSDP2: plain AdamW and a
    warning that says why and what to use; fp32 weights: plain AdamW, silently."""
    from lightning.pytorch.strategies import ModelParallelStrategy

    from test_model import tiny_module

    def optimizer(strategy=None, dtype=torch.bfloat16, **kw):
        module = tiny_module(warmup_steps=1, **kw).to(dtype)  # a warmup within the 5 steps: no schedule warning
        module.trainer = SimpleNamespace(strategy=strategy, max_steps=5, estimated_stepping_batches=5)
        return module.configure_optimizers()["optimizer"]

    assert isinstance(optimizer(), MasterWeightAdamW)
    with pytest.warns(UserWarning, match="model.master_weights is false"):
        assert type(optimizer(master_weights=False)) is torch.optim.AdamW
    with pytest.warns(UserWarning, match="ModelParallelStrategy keeps none; use trainer.precision bf16-mixed"):
        assert type(optimizer(ModelParallelStrategy())) is torch.optim.AdamW
    with pytest.warns(UserWarning, match="16-true: AdamW steps fp16 weights"):
        optimizer(dtype=torch.float16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert type(optimizer(dtype=torch.float32)) is torch.optim.AdamW
