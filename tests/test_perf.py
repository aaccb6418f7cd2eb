"""gpt2dist/perf.py (+ its hooks in model.py/export.py): padded vocab, export, compile, checkpointing, FLOPs."""

from __future__ import annotations

import json

import lightning.pytorch as pl
import pytest
import torch
from safetensors import safe_open
from transformers import GPT2LMHeadModel

from gpt2dist.errors import ConfigError
from gpt2dist.export import export_checkpoint, save_hf_folder
from gpt2dist.model import GPT2Module, build_config
from gpt2dist.perf import padded_vocab_size, unpad_vocab

from conftest import TINY

V = 300  # real vocabulary; padded to 384 with multiple 128


def module(seed: int = 0, **kw) -> GPT2Module:
    torch.manual_seed(seed)
    m = GPT2Module(from_scratch=True, config_overrides={**TINY, "vocab_size": V, "bos_token_id": 0, "eos_token_id": 0},
                   dropout=0.0, **kw)
    m.configure_model()
    return m


def test_padded_vocab_size_arithmetic():
    assert padded_vocab_size(50257, 128) == 50304  # 393 * 128
    assert padded_vocab_size(50304, 128) == 50304 and padded_vocab_size(50257, 1) == 50257
    with pytest.raises(ConfigError, match="pad_vocab_to_multiple_of=0 must be >= 1"):
        padded_vocab_size(50257, 0)


def test_padded_model_has_equal_loss_and_never_predicts_padding():
    plain, padded = module(), module(pad_vocab_to_multiple_of=128)
    assert padded.model.config.vocab_size == 384 and padded.vocab_size == 300
    assert padded.model.lm_head.weight is padded.model.transformer.wte.weight  # still tied
    assert torch.count_nonzero(padded.model.lm_head.weight[V:]) == 0
    ids = torch.randint(0, V, (3, 40))
    assert padded(ids).shape[-1] == V  # padded logits sliced off before any loss or argmax
    torch.testing.assert_close(padded.token_losses(ids), plain.token_losses(ids), rtol=0, atol=0)
    # Same gradients on the real rows, none on the padded ones.
    plain.token_losses(ids).mean().backward()
    padded.token_losses(ids).mean().backward()
    g_pad, g_plain = padded.model.transformer.wte.weight.grad, plain.model.transformer.wte.weight.grad
    torch.testing.assert_close(g_pad[:V], g_plain, rtol=1e-5, atol=1e-7)
    assert torch.count_nonzero(g_pad[V:]) == 0


@pytest.mark.parametrize("compiled", [False, True])
def test_loss_of_padded_logits_masks_the_padding_like_a_slice(compiled):
    """The compiled training loss takes the padded-width logits and masks the padding inside (one
    fused kernel); it must equal the loss of the sliced logits, and give the padding no gradient."""
    from gpt2dist.perf import compiled_shifted_token_losses, shifted_token_losses

    fn = compiled_shifted_token_losses if compiled else shifted_token_losses
    torch.manual_seed(0)
    ids = torch.randint(0, V, (2, 16))
    padded = torch.randn(2, 16, 384, requires_grad=True)
    with torch.no_grad():
        padded[..., V:] = 30.0  # large padding logits: any leak into the softmax would move the loss
    sliced = padded.detach()[..., :V].clone().requires_grad_(True)
    masked, ref = fn(padded, ids, real_vocab=V), shifted_token_losses(sliced, ids)
    torch.testing.assert_close(masked, ref, rtol=1e-6, atol=1e-6)
    masked.mean().backward(), ref.mean().backward()
    torch.testing.assert_close(padded.grad[..., :V], sliced.grad, rtol=1e-5, atol=1e-8)
    assert torch.count_nonzero(padded.grad[..., V:]) == 0 and padded.grad[:, -1].abs().sum() == 0  # last position: no target


def test_generation_suppresses_padded_rows(tokenizer):
    torch.manual_seed(0)
    real = len(tokenizer)  # 512 -> padded to 768
    m = GPT2Module(from_scratch=True, config_overrides={**TINY, "vocab_size": real}, dropout=0.0,
                   pad_vocab_to_multiple_of=384)
    m.configure_model()
    m.eval()
    model = m.model
    with torch.no_grad():  # make padded row `real` the argmax everywhere: final hidden = e0, row real = 10 e0
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.zero_()
        model.transformer.ln_f.bias[0] = 1.0
        model.transformer.wte.weight[real, 0] = 10.0
    ids = tokenizer("def ", return_tensors="pt").input_ids
    raw = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False,
                         pad_token_id=tokenizer.eos_token_id)
    assert (raw[0, ids.shape[1]:] == real).all()  # without suppression the padded id would be generated
    text = m.generate_text(tokenizer, "def ", max_new_tokens=3)
    ref = unpad_vocab(model).generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False,
                                      pad_token_id=tokenizer.eos_token_id)
    assert text == tokenizer.decode(ref[0], skip_special_tokens=True)
    # The public helpers on the bare HF model read the real vocabulary from its config (they produced
    # the padded id unless real_vocab was passed).
    from gpt2dist.generation import generate_ids, generate_texts

    assert generate_ids(model, tokenizer, ["def "], 3) == [ref[0].tolist()]
    assert generate_texts(model, tokenizer, ["def "], 3) == [text]


def _check_hf_folder(folder, ref: GPT2Module):
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["vocab_size"] == V and "unpadded_vocab_size" not in cfg
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        assert f.get_slice("transformer.wte.weight").get_shape() == [V, TINY["n_embd"]]
    hf = GPT2LMHeadModel.from_pretrained(folder).eval()
    ids = torch.randint(0, V, (2, 24))
    torch.testing.assert_close(hf(ids).logits, ref.eval()(ids), rtol=0, atol=1e-6)
    torch.testing.assert_close(hf(input_ids=ids, labels=ids).loss, ref.token_losses(ids).mean(), rtol=0, atol=1e-6)


def test_export_slices_padded_vocab_to_standard_hf_shape(tmp_path):
    plain, padded = module(), module(pad_vocab_to_multiple_of=128)
    save_hf_folder(padded.model, None, tmp_path / "padded")
    _check_hf_folder(tmp_path / "padded", plain)  # equal to the unpadded model
    assert padded.model.config.vocab_size == 384  # the training model itself is untouched


class _Blocks(torch.utils.data.Dataset):
    def __len__(self):
        return 8

    def __getitem__(self, i):
        return {"input_ids": torch.randint(0, V, (32,), generator=torch.Generator().manual_seed(i))}


def test_padded_checkpoint_exports_to_standard_hf_folder(tmp_path):
    m = module(pad_vocab_to_multiple_of=128, lr=1e-3, warmup_steps=1)
    trainer = pl.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path,
                         callbacks=[pl.callbacks.ModelCheckpoint(dirpath=tmp_path, filename="last")])
    trainer.fit(m, torch.utils.data.DataLoader(_Blocks(), batch_size=4))
    ckpt = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert ckpt["gpt2_config"]["vocab_size"] == 384 and ckpt["gpt2_config"]["unpadded_vocab_size"] == V
    export_checkpoint(tmp_path / "last.ckpt", tmp_path / "hf", no_tokenizer=True)  # trained without the data module
    _check_hf_folder(tmp_path / "hf", m)  # trained weights, sliced back to 300 rows


def test_activation_checkpointing_leaves_the_exported_kv_cache_on(tmp_path):
    from transformers import GPT2LMHeadModel

    from gpt2dist.export import save_hf_folder

    m = module(activation_checkpointing=True)
    assert m.model.config.use_cache is True  # checkpoints save this config
    save_hf_folder(m.model, None, tmp_path / "hf")
    m.model.config.use_cache = False  # as a checkpoint from an older gpt2dist holds it
    save_hf_folder(m.model, None, tmp_path / "old")
    assert m.model.config.use_cache is False  # the caller's model is left as it was
    for out in ("hf", "old"):
        loaded = GPT2LMHeadModel.from_pretrained(tmp_path / out)
        assert loaded.config.use_cache is True
        assert loaded(torch.tensor([[1, 2, 3]])).past_key_values is not None  # incremental decoding works


def test_activation_checkpointing_same_loss_and_grads():
    a, b = module(), module(activation_checkpointing=True)
    a.train(), b.train()
    ids = torch.randint(0, V, (2, 32))
    la, lb = a.token_losses(ids).mean(), b.token_losses(ids).mean()
    la.backward(), lb.backward()
    torch.testing.assert_close(la, lb, rtol=0, atol=0)
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7, msg=n)


@pytest.mark.parametrize("pad", [1, 128])
def test_regional_compile_matches_eager(pad):
    eager, comp = module(pad_vocab_to_multiple_of=pad), module(compile=True, pad_vocab_to_multiple_of=pad)
    assert all(getattr(blk, "_compiled_call_impl", None) is not None for blk in comp.model.transformer.h)
    ids = torch.randint(0, V, (2, 32))
    le, lc = eager.token_losses(ids).mean(), comp.token_losses(ids).mean()
    le.backward(), lc.backward()
    torch.testing.assert_close(lc, le, rtol=1e-5, atol=1e-5)
    for (n, p), (_, q) in zip(eager.named_parameters(), comp.named_parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-3, atol=1e-5, msg=n)


def test_compiled_blocks_share_one_graph_and_generation_stays_eager(tokenizer):
    """10 blocks, over dynamo's recompile limit of 8. A training forward that filled a KV cache made
    each block's first cache write recompile, so blocks 9+ ran eager (found on an H200)."""
    from torch._dynamo.utils import counters

    from gpt2dist.generation import greedy_text

    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    m = GPT2Module(from_scratch=True, dropout=0.0, compile=True,
                   config_overrides={**TINY, "n_layer": 10, "vocab_size": 512, "bos_token_id": 0, "eos_token_id": 0})
    m.configure_model()
    ids = torch.randint(0, 512, (2, 32))
    for _ in range(2):
        m.token_losses(ids).mean().backward()
    # One graph for all 10 blocks, one for the loss.
    assert counters["stats"]["unique_graphs"] == 2, dict(counters["stats"])
    assert counters["frames"]["total"] == 2, dict(counters["frames"])
    greedy_text(m.model.eval(), tokenizer, "def ", 6)  # new lengths + a cache: would recompile every block
    assert counters["stats"]["unique_graphs"] == 2, dict(counters["stats"])


def test_fused_cross_entropy_without_gpu_is_a_config_error():
    with pytest.raises(ConfigError, match="fused_cross_entropy=true needs a CUDA GPU and the liger-kernel"):
        module(fused_cross_entropy=True)


def test_bias_after_matmul_same_loss_grads_and_checkpoint():
    from transformers.pytorch_utils import Conv1D

    from gpt2dist.perf import BiasAfterMatmul

    a, b = module(), module(bias_after_matmul=True)
    swapped = [m for m in b.model.modules() if isinstance(m, BiasAfterMatmul)]
    assert len(swapped) == 4 * TINY["n_layer"] and all(isinstance(m, Conv1D) for m in swapped)
    assert not any(isinstance(m, BiasAfterMatmul) for m in a.model.modules())
    assert list(a.state_dict()) == list(b.state_dict())  # same keys: checkpoints and exports unchanged
    ids = torch.randint(0, V, (2, 32))
    la, lb = a.token_losses(ids).mean(), b.token_losses(ids).mean()
    la.backward(), lb.backward()
    torch.testing.assert_close(lb, la, rtol=1e-6, atol=1e-6)  # fp32: addmm vs mm + add, rounding only
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-6, msg=n)
    # Under bf16 autocast the output stays bf16 (an fp32 bias must not promote the activations).
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = swapped[0](torch.randn(2, 5, TINY["n_embd"]))
    assert y.dtype == torch.bfloat16


def test_bias_after_matmul_compiles_to_mm_not_addmm():
    """The reason for the switch: Inductor must not fuse `mm + bias` back into addmm (which it does
    when the sum is saved for backward and the add takes the mm's output directly)."""
    import re

    from torch._inductor.utils import run_and_get_code

    def addmm_and_mm(**kw):
        torch._dynamo.reset()
        m = module(compile=True, **kw)
        ids = torch.randint(0, V, (2, 32))
        _, code = run_and_get_code(lambda: m.token_losses(ids).mean().backward())
        text = "\n".join(code)
        return len(re.findall(r"\baddmm\(", text)), len(re.findall(r"\bmm\(", text))

    plain, swapped = addmm_and_mm(), addmm_and_mm(bias_after_matmul=True)
    assert plain[0] > 0, plain  # the probe sees addmm where it is used
    assert swapped[0] == 0 and swapped[1] > plain[1], swapped


def test_compile_options_reach_inductor_and_a_bad_one_is_one_line():
    from torch._inductor.utils import run_and_get_code

    def block_code(**kw):  # the forward alone: only the blocks' graph (the loss region keeps its defaults)
        torch._dynamo.reset()
        m = module(compile=True, **kw)
        _, code = run_and_get_code(lambda: m(torch.randint(0, V, (2, 32))))
        return "\n".join(code)

    assert "assert_size_stride(" in block_code()  # Inductor's default: size_asserts on
    assert "assert_size_stride(" not in block_code(compile_options={"size_asserts": False})
    with pytest.raises(ConfigError, match=r"^model.compile_options: 'coordinate_descent_tunning' is not an Inductor "
                                          r"option \(did you mean 'coordinate_descent_tuning'\?\)"):
        GPT2Module(compile=True, compile_options={"coordinate_descent_tunning": True})
    with pytest.raises(ConfigError, match="cannot both be set"):
        GPT2Module(compile=True, compile_mode="max-autotune", compile_options={"coordinate_descent_tuning": True})
    # A mode torch.compile lacks, or an option of the wrong type: one line at construction, not a
    # RuntimeError traceback at the first compiled forward (after data preparation).
    with pytest.raises(ConfigError, match=r"^model.compile_mode='max_autotune': Unrecognized mode=max_autotune, "
                                          r"should be one of: .*max-autotune"):
        GPT2Module(compile=True, compile_mode="max_autotune")
    with pytest.raises(ConfigError, match=r"^model.compile_options: .*coordinate_descent_tuning.*should be bool"):
        GPT2Module(compile=True, compile_options={"coordinate_descent_tuning": 1})
    GPT2Module(compile=True, compile_mode="max-autotune")  # a known mode passes


def test_tf32_setting_leaves_the_matmul_precision_readable(monkeypatch):
    """After a user's torch.set_float32_matmul_precision (Lightning's hint), model.tf32 set the legacy
    allow_tf32 flag, and every later get_float32_matmul_precision() (Inductor's autotuning, the next
    Trainer) raised on the mix of APIs. Without CUDA nothing is set (oneDNN's CPU matmuls stay IEEE)."""
    from gpt2dist.perf import set_tf32

    before = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    cpu = torch.backends.mkldnn.matmul.fp32_precision
    set_tf32(True)
    assert torch.backends.mkldnn.matmul.fp32_precision == cpu and torch.get_float32_matmul_precision() == before[0]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # the flags are process-wide: settable on CPU
    try:
        for user, tf32, expected in [("high", False, "highest"), ("medium", True, "high"), ("highest", True, "high")]:
            torch.set_float32_matmul_precision(user)
            set_tf32(tf32)
            assert torch.get_float32_matmul_precision() == expected and torch.backends.cudnn.allow_tf32 is tf32
            assert torch.backends.cuda.matmul.allow_tf32 is tf32  # what the cuBLAS kernels read
    finally:
        torch.set_float32_matmul_precision(before[0])
        torch.backends.cudnn.allow_tf32 = before[1]
