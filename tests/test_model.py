"""gpt2dist/model.py: loss, optimizer groups, schedule, eval metrics, config checks."""

from __future__ import annotations

import warnings

import copy
import json
import math
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch import Callback
from transformers import GPT2Config, GPT2LMHeadModel

from gpt2dist.errors import ConfigError
from gpt2dist.model import GPT2Module, build_config

from conftest import TINY


def tiny_module(**kw) -> GPT2Module:
    m = GPT2Module(from_scratch=True, config_overrides={**TINY, "vocab_size": 300}, dropout=0.0, **kw)
    m.configure_model()
    return m


def test_loss_equals_hf_labels_loss():
    torch.manual_seed(0)
    m = tiny_module()
    ids = torch.randint(0, 300, (3, 32))
    ours = m.token_losses(ids).mean()
    ref = m.model(input_ids=ids, labels=ids).loss
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6)


def test_weight_decay_only_on_matrices():
    m = tiny_module(weight_decay=0.05)
    m.trainer = SimpleNamespace(max_steps=100, estimated_stepping_batches=100, strategy=None)  # what configure_optimizers reads
    opt = m.configure_optimizers()["optimizer"]
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    n_params = len(list(m.parameters()))
    assert len(decay["params"]) + len(no_decay["params"]) == n_params
    assert any(p.dim() == 1 for p in no_decay["params"])  # biases and LayerNorm weights exist
    assert opt.defaults.get("fused")  # one fused kernel, on CPU too: it takes the NaN guard's found_inf


def test_lr_schedule_warmup_then_cosine_to_min_lr():
    m = tiny_module(lr=1e-3, min_lr=1e-4, warmup_steps=10)
    total = 110
    lrs = [m.lr_at(s, total) for s in range(total + 5)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(a < b for a, b in zip(lrs[:9], lrs[1:10]))  # linear warmup
    assert all(a >= b for a, b in zip(lrs[10:total], lrs[11:total + 1]))  # monotone decay
    assert lrs[60] == pytest.approx(1e-4 + 0.5 * 9e-4)  # half way: cosine midpoint
    assert lrs[total] == pytest.approx(1e-4) and lrs[-1] == pytest.approx(1e-4)



def test_a_schedule_with_no_decay_after_warmup_is_flagged():
    """warmup_steps at or past the schedule's steps (the default 100 in a 50-step fine-tune) never reaches
    lr nor decays: a warning naming both and a fix. min_lr above lr: a config error."""
    m = tiny_module(warmup_steps=100)
    m.trainer = SimpleNamespace(max_steps=50, estimated_stepping_batches=50, strategy=None)
    with pytest.warns(UserWarning, match=r"model.warmup_steps=100 is not below the 50 steps of the lr schedule.*lower "
                                         r"model.warmup_steps \(e.g. 2, 5%\)"):
        m.configure_optimizers()
    assert m.lr_at(49, 50) == pytest.approx(0.5 * m.hparams.lr)  # what that run ends at
    m = tiny_module(lr=1e-3, min_lr=1e-2)  # builds (validate/test/predict of such a run's checkpoints); fit stops
    m.trainer = SimpleNamespace(max_steps=500, estimated_stepping_batches=500, strategy=None)
    with pytest.raises(ConfigError, match=r"model.min_lr=0.01 is above model.lr=0.001"):
        m.configure_optimizers()
    for lr in (0.0, -1e-4):  # were a bare ZeroDivisionError in the schedule's lambda, torch's "Invalid learning rate"
        m = tiny_module(lr=lr, min_lr=-1.0)
        m.trainer = SimpleNamespace(max_steps=500, estimated_stepping_batches=500, strategy=None)
        with pytest.raises(ConfigError, match=rf"^model.lr={lr} must be > 0"):
            m.configure_optimizers()


@pytest.mark.parametrize("limit", [1.0, 5])
def test_the_schedule_decays_over_the_steps_max_epochs_allows(tmp_path, tokenizer_dir, corpus_dir, limit):
    """`--trainer.max_epochs 1` on top of a preset's max_steps: the cosine ran over max_steps (1000), which that
    run never reached, so the epoch kept the peak lr and no warmup warning fired. The decay is the run's steps,
    min(max_steps, what max_epochs allows), counted from the data module (Lightning's own count builds the train
    loader before a resume restores its position): equal to Lightning's estimated_stepping_batches."""
    import lightning.pytorch as pl

    from gpt2dist.data import TokenBlockDataModule

    class LRs(Callback):
        def __init__(self):
            self.lrs = []

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            self.lrs.append(optimizer.param_groups[0]["lr"])

    dm = TokenBlockDataModule(train_files=[str(corpus_dir / "bisect.txt")], tokenizer=str(tokenizer_dir), block_size=16,
                              batch_size=8, num_workers=0, val_fraction=0.0, cache_dir=str(tmp_path / "cache"))
    m = GPT2Module(from_scratch=True, config_overrides={**TINY, "vocab_size": 512}, dropout=0.0, lr=1e-3, min_lr=1e-4,
                   warmup_steps=1)
    lrs = LRs()
    trainer = pl.Trainer(accelerator="cpu", max_epochs=1, max_steps=1000, limit_train_batches=limit, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0, callbacks=[lrs])
    trainer.fit(m, datamodule=dm)
    steps = trainer.global_step
    assert 3 <= steps < 100 and m._schedule["decay_steps"] == steps == trainer.estimated_stepping_batches
    assert lrs.lrs == pytest.approx([m.lr_at(s, steps) for s in range(steps)]) and lrs.lrs[-1] < 0.3e-3
    m = tiny_module()
    for unbounded in (float("inf"), -1):  # -1: Lightning's answer for a loader without a length
        m.trainer = SimpleNamespace(max_steps=-1, estimated_stepping_batches=unbounded, strategy=None)
        with pytest.raises(ConfigError, match=r"trainer.max_steps and trainer.max_epochs are both unbounded"):
            m.configure_optimizers()


def test_load_from_checkpoint_builds_the_saved_model_with_its_perf_knobs(tmp_path):
    """GPT2Module.load_from_checkpoint: Lightning's configure_model ran first (from_pretrained of
    model_name_or_path: a download, or an error once that folder was gone), then on_load_checkpoint swapped
    in a bare model: activation_checkpointing (and compile, bias_after_matmul) were silently off."""
    import shutil

    import lightning.pytorch as pl

    torch.manual_seed(0)
    base = tmp_path / "base"
    GPT2LMHeadModel(GPT2Config(**TINY, vocab_size=300)).save_pretrained(base)
    m = GPT2Module(str(base), from_scratch=False, dropout=0.0, warmup_steps=1, activation_checkpointing=True,
                   bias_after_matmul=True)
    ids = torch.randint(0, 300, (8, 16), generator=torch.Generator().manual_seed(0))
    trainer = pl.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(m, torch.utils.data.DataLoader([{"input_ids": x} for x in ids], batch_size=4))
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    shutil.rmtree(base)  # the checkpoint holds the config and every weight
    loaded = GPT2Module.load_from_checkpoint(tmp_path / "last.ckpt", weights_only=True)
    with pytest.raises(TypeError, match="instance"):  # as Lightning's: not a load into this instance
        loaded.load_from_checkpoint(tmp_path / "last.ckpt", weights_only=True)
    assert loaded.model.transformer.h[0].gradient_checkpointing is True
    assert {type(b.attn.c_attn).__name__ for b in loaded.model.transformer.h} == {"BiasAfterMatmul"}
    trained = {k: v for k, v in m.state_dict().items()}
    assert loaded.state_dict().keys() == trained.keys()
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in trained.items())
    m.eval(), loaded.eval()
    with torch.no_grad():
        assert torch.equal(loaded(ids[:2]), m(ids[:2]))


def test_compile_settings_without_compile_say_they_do_nothing():
    """model.compile_mode / compile_options without model.compile=true compiled nothing, silently."""
    with pytest.warns(UserWarning, match=r"model.compile_mode / compile_options are set \(max-autotune\) but "
                                         r"model.compile is false: nothing is compiled"):
        tiny_module(compile_mode="max-autotune")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tiny_module(compile=True, compile_mode="max-autotune")


class _GradsAtStepStart(Callback):
    """Records the weights at train start, and whether every gradient was already freed when each
    later optimizer step's first micro-batch starts."""

    def __init__(self, accumulate: int):
        self.accumulate, self.freed, self.start = accumulate, [], None

    def on_train_start(self, trainer, pl_module) -> None:
        self.start = copy.deepcopy(pl_module.model.state_dict())

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if batch_idx % self.accumulate == 0 and trainer.global_step > 0:
            self.freed.append(all(p.grad is None for p in pl_module.parameters()))


@pytest.mark.parametrize("accumulate", [1, 2])
def test_gradients_are_freed_after_each_step_and_training_is_unchanged(accumulate):
    """Lightning sets the gradients to None only after the next training_step, so every forward held
    the last step's (4 bytes per parameter under bf16-mixed); GPT2Module frees them right after the
    step. Training is unchanged: the weights equal a plain AdamW loop's over the same micro-batches."""
    import lightning.pytorch as pl

    torch.manual_seed(0)
    hp = {"lr": 1e-3, "min_lr": 1e-3, "warmup_steps": 0, "weight_decay": 0.1}  # a constant lr
    batches = [{"input_ids": torch.randint(0, 300, (2, 32))} for _ in range(3 * accumulate)]
    m, probe = tiny_module(**hp), _GradsAtStepStart(accumulate)
    pl.Trainer(accelerator="cpu", devices=1, max_steps=3, accumulate_grad_batches=accumulate, logger=False,
               enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
               callbacks=[probe]).fit(m, torch.utils.data.DataLoader(batches, batch_size=None))
    assert probe.freed == [True, True]

    ref = tiny_module(**hp)
    ref.model.load_state_dict(probe.start)
    ref.trainer = SimpleNamespace(max_steps=3, estimated_stepping_batches=3, strategy=None)
    opt = ref.configure_optimizers()["optimizer"]
    for step in range(3):
        for b in batches[step * accumulate:(step + 1) * accumulate]:
            (ref.token_losses(b["input_ids"]).mean() / accumulate).backward()
        opt.step()
        opt.zero_grad()
    got = m.model.state_dict()
    assert any(not torch.equal(got[k], v) for k, v in probe.start.items())  # it trained
    for k, v in ref.model.state_dict().items():
        torch.testing.assert_close(got[k], v, rtol=0, atol=1e-6, msg=k)

def test_eval_loss_is_token_weighted_and_ignores_padding():
    torch.manual_seed(0)
    m = tiny_module()
    m.trainer = SimpleNamespace(strategy=SimpleNamespace(reduce=lambda t, reduce_op: t))
    logged = {}
    m.log = lambda k, v, **kw: logged.__setitem__(k, float(v))
    a, b = torch.randint(0, 300, (2, 16)), torch.randint(0, 300, (1, 16))
    m._eval_start()
    m._eval_step({"input_ids": a, "loss_weight": torch.ones(2)})
    m._eval_step({"input_ids": torch.cat([b, a[:1]]), "loss_weight": torch.tensor([1.0, 0.0])})  # 2nd is padding
    m._eval_end("val")
    all_tokens = m.token_losses(torch.cat([a, b]))
    expected = all_tokens.mean().item()
    assert logged["val/loss"] == pytest.approx(expected, rel=1e-6)
    assert logged["val/ppl"] == pytest.approx(math.exp(expected), rel=1e-5)


def test_config_checks_block_size_and_vocab():
    dm = SimpleNamespace(tokenizer=None, block_size=128)
    m = GPT2Module(from_scratch=True, config_overrides=TINY)
    m._trainer = SimpleNamespace(datamodule=dm)
    with pytest.raises(ConfigError, match="data.block_size=128 exceeds the model's n_positions=64"):
        m.configure_model()
    dm = SimpleNamespace(tokenizer=[0] * 600, block_size=32)  # len() is all that is read
    m = GPT2Module(from_scratch=False, model_name_or_path="gpt2", config_overrides={**TINY, "vocab_size": 500})
    m._trainer = SimpleNamespace(datamodule=dm)
    with pytest.raises(ConfigError, match="tokenizer has 600 tokens but the model's vocab_size is 500"):
        m.resolve_config()
    with pytest.raises(ConfigError, match="has no field 'n_layers'"):
        build_config("gpt2", {"n_layers": 3})


def test_released_sizes_build_offline():
    cfg = build_config("gpt2-large")
    assert (cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.vocab_size) == (36, 1280, 20, 50257)


def test_pretrained_local_folder_loads_weights(tmp_path):
    ref = GPT2LMHeadModel(GPT2Config(**TINY, vocab_size=300))
    ref.save_pretrained(tmp_path / "m")
    m = GPT2Module(model_name_or_path=str(tmp_path / "m"))
    m.configure_model()
    for (k, a), (_, b) in zip(ref.state_dict().items(), m.model.state_dict().items()):
        assert torch.equal(a, b), k
    bad = GPT2Module(model_name_or_path=str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="missing"):
        bad.configure_model()


def test_decay_groups_survive_zero3_partitioning_and_fsdp1_names():
    """ZeRO-3 replaces each parameter by an empty 1-D partition (shape kept in ds_shape); the
    groups must still follow the original shapes (found on the H100: every weight went undecayed
    and LambdaLR got more lambdas than the wrapped optimizer had groups)."""
    m = tiny_module(weight_decay=0.05)
    m.trainer = SimpleNamespace(max_steps=10, estimated_stepping_batches=10,
                                strategy=SimpleNamespace())
    expected = {n for n, p in m.named_parameters() if p.dim() >= 2}
    m._param_ndim = {}  # as if built inside deepspeed.zero.Init: only ds_shape tells the truth
    for p in m.parameters():
        p.ds_shape = p.shape
        p.data = torch.empty(0)
    opt = m.configure_optimizers()["optimizer"]
    decayed = {n for n, p in m.named_parameters() if any(p is q for q in opt.param_groups[0]["params"])}
    assert decayed == expected and len(opt.param_groups) == 2
    from gpt2dist.model import _unwrapped_name
    assert _unwrapped_name("model.transformer.h.0._fsdp_wrapped_module._checkpoint_wrapped_module.attn.c_attn.weight") \
        == "model.transformer.h.0.attn.c_attn.weight"


def test_greedy_text_empty_prompt_starts_from_eos_and_a_full_prompt_is_refused(tokenizer):
    """An empty prompt is an unconditional sample (from EOS, as every packed document starts); a prompt
    that fills n_positions leaves nothing to generate: one line naming it, not an index error."""
    from gpt2dist.generation import greedy_text

    torch.manual_seed(0)
    eos = tokenizer.eos_token_id
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), bos_token_id=eos, eos_token_id=eos, **TINY)).eval()
    out = model.generate(torch.tensor([[eos]]), attention_mask=torch.ones(1, 1, dtype=torch.long), max_new_tokens=5,
                         do_sample=False, pad_token_id=eos)
    assert greedy_text(model, tokenizer, "", 5) == tokenizer.decode(out[0], skip_special_tokens=True)
    n_pos = TINY["n_positions"]
    fits = tokenizer.decode([tokenizer("a").input_ids[0]] * (n_pos - 1))
    assert len(tokenizer(fits).input_ids) == n_pos - 1
    assert greedy_text(model, tokenizer, fits, 5).startswith(fits)  # room for one new token: it runs
    with pytest.raises(ConfigError) as err:
        greedy_text(model, tokenizer, fits + "a", 5)
    assert f"is {n_pos} tokens" in str(err.value) and f"at most {n_pos - 1} tokens" in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("tokens", [0, -3])
def test_max_new_tokens_below_one_is_refused(tokens):
    """It generated one token anyway (generate_ids' budget is at least 1), with exit 0."""
    with pytest.raises(ConfigError, match=rf"^model.max_new_tokens={tokens} must be >= 1"):
        GPT2Module(from_scratch=True, max_new_tokens=tokens)


def test_16_mixed_clips_and_logs_the_unscaled_grad_norm():
    """Under a GradScaler the fused AdamW (our default) unscales inside its step: Lightning refused to clip
    ("does not allow for gradient clipping", and every preset clips), and train/grad_norm was the scaled norm
    (x init_scale). Now the norms logged at scale 1024 equal those at scale 1."""
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import Callback
    from lightning.pytorch.plugins.precision import MixedPrecision

    from gpt2dist.monitor import TrainMonitor

    class Norms(Callback):
        def __init__(self):
            self.seen = []

        def on_train_batch_end(self, trainer, *args):
            self.seen.append(float(trainer.callback_metrics["train/grad_norm"]))

    def norms(init_scale: float) -> list[float]:
        torch.manual_seed(0)
        module = GPT2Module(from_scratch=True, config_overrides={**TINY, "vocab_size": 512}, dropout=0.0, warmup_steps=2)
        ids = torch.randint(0, 512, (4 * 3, 16), generator=torch.Generator().manual_seed(0))
        loader = torch.utils.data.DataLoader([{"input_ids": x} for x in ids], batch_size=4)
        probe = Norms()
        trainer = pl.Trainer(accelerator="cpu", max_steps=3, logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1,
                             gradient_clip_val=1.0, callbacks=[TrainMonitor(), probe],
                             plugins=[MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=init_scale))])
        trainer.fit(module, train_dataloaders=loader)
        assert trainer.precision_plugin.scaler.get_scale() == init_scale  # no step overflowed
        return probe.seen

    unscaled, scaled = norms(1.0), norms(1024.0)
    assert len(unscaled) == 3 and all(n > 0 for n in unscaled)
    assert scaled == pytest.approx(unscaled, rel=1e-2)


def test_bf16_mixed_clips_with_the_fused_adamw():
    """bf16-mixed has no GradScaler, but Lightning's AMP plugin refused to clip for the fused AdamW ("does not
    allow for gradient clipping ... 'fused' optimizer?"): every GPU preset (bf16-mixed, gradient_clip_val 1.0)
    died at its first optimizer step. The fused AdamW now steps gradients clipped to the limit."""
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import Callback

    from gpt2dist.monitor import TrainMonitor

    class Probe(Callback):
        def __init__(self):
            self.raw, self.stepped = [], []

        def on_train_start(self, trainer, pl_module):
            opt = trainer.optimizers[0]
            assert opt.defaults["fused"]
            norm = lambda: torch.linalg.vector_norm(torch.stack([p.grad.norm() for g in opt.param_groups for p in g["params"] if p.grad is not None]))
            # after the step (the closure computing the gradients runs inside it); the fused AdamW leaves them as it read them
            opt.register_step_post_hook(lambda *_: self.stepped.append(float(norm())))

        def on_train_batch_end(self, trainer, *args):
            self.raw.append(float(trainer.callback_metrics["train/grad_norm"]))

    torch.manual_seed(0)
    module = GPT2Module(from_scratch=True, config_overrides={**TINY, "vocab_size": 512}, dropout=0.0, warmup_steps=2)
    ids = torch.randint(0, 512, (4 * 3, 16), generator=torch.Generator().manual_seed(0))
    probe = Probe()
    trainer = pl.Trainer(accelerator="cpu", max_steps=3, precision="bf16-mixed", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1,
                         gradient_clip_val=0.5, callbacks=[TrainMonitor(), probe])
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader([{"input_ids": x} for x in ids], batch_size=4))
    assert len(probe.raw) == len(probe.stepped) == 3 and min(probe.raw) > 0.5  # each step had to be clipped
    assert probe.stepped == pytest.approx([0.5] * 3, rel=1e-3)


def test_attention_kernel_is_the_configured_one_when_built_from_scratch_too():
    """model.attn_implementation=eager set a plain config attribute that building from a config ignores: a
    from-scratch (or ZeRO-3) model ran SDPA, and output_attentions returned nothing."""
    m = GPT2Module(from_scratch=True, config_overrides={**TINY, "vocab_size": 300}, attn_implementation="eager")
    m.configure_model()
    assert m.model.config._attn_implementation == "eager"
    out = m.model(torch.randint(0, 300, (1, 8)), output_attentions=True)
    assert len(out.attentions) == TINY["n_layer"] and out.attentions[0].shape == (1, TINY["n_head"], 8, 8)


@pytest.mark.parametrize("precision, dtype", [("32-true", torch.float32), ("bf16-mixed", torch.float32),
                                              ("bf16-true", torch.bfloat16)])
def test_pretrained_weights_load_in_the_precisions_dtype_not_the_stored_one(tmp_path, precision, dtype):
    """from_pretrained keeps the stored dtype: a folder saved in bf16 trained bf16 weights under 32-true and
    bf16-mixed ("autocast over fp32 weights"), and the optimizer switched to MasterWeightAdamW unasked."""
    import lightning.pytorch as pl
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(**TINY, vocab_size=300)).to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    module = GPT2Module(model_name_or_path=str(tmp_path / "bf16"), dropout=0.0, warmup_steps=1)
    ids = torch.randint(0, 300, (4, 16), generator=torch.Generator().manual_seed(0))
    trainer = pl.Trainer(accelerator="cpu", max_steps=1, precision=precision, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader([{"input_ids": x} for x in ids], batch_size=4))
    assert {p.dtype for p in module.parameters()} == {dtype}
    opt = trainer.optimizers[0]
    assert type(getattr(opt, "_optimizer", opt)).__name__ == ("MasterWeightAdamW" if dtype == torch.bfloat16 else "AdamW")


def test_a_checkpoint_is_refused_under_another_tokenizer_of_the_same_size(tmp_path, corpus_dir):
    """A trained tokenizer (data.train_tokenizer_vocab_size) is trained again when the corpus changes: one more
    file kept 300 tokens, with other merges. validate read the weights through the new ids and reported a
    worse loss, without a word; the checkpoint records what its ids mean, and the error names the fix."""
    import shutil

    from conftest import run_cli
    from run_fixtures import fit_args

    corpus, root = tmp_path / "corpus", tmp_path / "run"
    shutil.copytree(corpus_dir, corpus)
    args = [a for a in fit_args(root, corpus, tmp_path / "unused", max_steps=2) if not a.startswith(
        ("--data.tokenizer=", "--model.config_overrides=", "--samples."))]
    args += ["--data.train_tokenizer_vocab_size=300", "--samples.sample_every_n_steps=0",
             f"--model.config_overrides={json.dumps(TINY)}"]
    p = run_cli(*args, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    first_tok = torch.load(root / "checkpoints" / "last.ckpt", weights_only=True)["tokenizer_name_or_path"]
    evaluate = ["validate", *args[1:], "--ckpt_path", "last"]
    (corpus / "more.txt").write_text("def added(x):\n    return x * 2 + len(str(x))\n" * 40)
    p = run_cli(*evaluate, timeout=300)
    assert p.returncode == 2, p.stderr[-3000:]
    assert p.stderr.strip().splitlines()[-1] == (
        f"gpt2dist: error: the checkpoint was trained with another tokenizer ({first_tok}) than this run's "
        f"({p.stderr.split(' than this run' + chr(39) + 's (')[1].split(')')[0]}): its token ids mean other text; "
        f"set data.tokenizer={first_tok} and data.train_tokenizer_vocab_size=null (the data changed, so a new "
        "tokenizer was trained)"), p.stderr[-2000:]
    # The fix it names: the recorded tokenizer, none trained.
    p = run_cli(*evaluate, f"--data.tokenizer={first_tok}", "--data.train_tokenizer_vocab_size=null", timeout=300)
    assert p.returncode == 0 and "val/loss" in p.stdout, p.stderr[-3000:]


def test_a_folder_without_tokenizer_files_is_refused(tmp_path):
    """transformers builds a one-token tokenizer from a folder holding only config.json (an export made with
    --no-tokenizer): every text encoded to no ids, and predict echoed its prompts with exit 0."""
    from gpt2dist.errors import DataError
    from gpt2dist.tokenizer import load_tokenizer

    GPT2LMHeadModel(GPT2Config(**TINY, vocab_size=300)).config.save_pretrained(tmp_path)
    with pytest.raises(DataError, match="encodes text to no tokens: the folder holds no tokenizer files"):
        load_tokenizer(str(tmp_path))


def test_predict_needs_indexed_items_and_a_tokenizer(tokenizer):
    """A list of bare strings got index=batch_idx for every string: one seed (equal samples) and one place in
    the output for all; with no datamodule, an AttributeError on None. Indexed items are generated."""
    import lightning.pytorch as pl

    m = GPT2Module(from_scratch=True, config_overrides={**TINY, "vocab_size": len(tokenizer)}, dropout=0.0, do_sample=True)
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(ConfigError, match=r"^predict batches must be \{'index': i, 'prompt': text\} items.*got str items$"):
        trainer.predict(m, torch.utils.data.DataLoader(["def ", "import ", "x"], batch_size=3))
    with pytest.raises(ConfigError, match="^predict needs the run's tokenizer"):
        trainer.predict(m, torch.utils.data.DataLoader([{"index": 0, "prompt": "def "}], batch_size=None))
    m.configure_model()
    m._datamodule = lambda: SimpleNamespace(tokenizer=tokenizer)
    rows = m.predict_step([{"index": i, "prompt": "def "} for i in range(3)], 0)
    assert [r["index"] for r in rows] == [0, 1, 2] and len({r["text"] for r in rows}) == 3  # a seed per row
