"""gpt2dist/callbacks.py: HFExport runs before Lightning's teardown and writes the trained weights;
PredictionWriter's file holds one run's predictions."""

from __future__ import annotations

import json
import re

import lightning.pytorch as pl
import pytest
import torch
from safetensors.torch import load_file

from gpt2dist.callbacks import HFExport, PredictionWriter
from gpt2dist.errors import GPT2DistError
from gpt2dist.model import GPT2Module

from conftest import TINY


class _Blocks(torch.utils.data.Dataset):
    def __len__(self):
        return 8

    def __getitem__(self, i):
        return {"input_ids": torch.randint(0, 128, (32,), generator=torch.Generator().manual_seed(i))}


def test_export_runs_before_teardown_with_the_trained_weights(tmp_path, monkeypatch):
    """Lightning's teardown moves the model and optimizer state to CPU before `on_fit_end`; ZeRO-3's
    gather then ran NCCL on CPU tensors (an H200 run). On CPU the order is the only visible sign."""
    order = []
    real_teardown = pl.strategies.SingleDeviceStrategy.teardown
    monkeypatch.setattr(pl.strategies.SingleDeviceStrategy, "teardown",
                        lambda self: (order.append("teardown"), real_teardown(self))[1])
    hook = next(h for h in ("on_train_end", "on_fit_end") if h in HFExport.__dict__)  # whichever exports
    real_export = getattr(HFExport, hook)

    def export(self, trainer, pl_module):
        order.append("export")
        real_export(self, trainer, pl_module)

    monkeypatch.setattr(HFExport, hook, export)
    torch.manual_seed(0)
    m = GPT2Module(from_scratch=True, dropout=0.0, lr=1e-2, warmup_steps=1,
                   config_overrides={**TINY, "vocab_size": 128, "bos_token_id": 0, "eos_token_id": 0})
    trainer = pl.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path,
                         callbacks=[HFExport(sample_prompt=None)])
    m.configure_model()
    initial = {k: v.clone() for k, v in m.model.state_dict().items()}
    trainer.fit(m, torch.utils.data.DataLoader(_Blocks(), batch_size=4))
    assert order == ["export", "teardown"], order
    exported = load_file(tmp_path / "hf_model" / "model.safetensors")
    trained = m.model.state_dict()
    assert not torch.equal(exported["transformer.h.0.mlp.c_fc.weight"], initial["transformer.h.0.mlp.c_fc.weight"])
    for name, tensor in exported.items():
        torch.testing.assert_close(tensor, trained[name], rtol=0, atol=0, msg=name)


def _fit(root, seed: int) -> GPT2Module:
    torch.manual_seed(seed)
    m = GPT2Module(from_scratch=True, dropout=0.0, lr=1e-2, warmup_steps=1,
                   config_overrides={**TINY, "vocab_size": 128, "bos_token_id": 0, "eos_token_id": 0})
    trainer = pl.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, default_root_dir=root,
                         callbacks=[HFExport(sample_prompt=None)])
    trainer.fit(m, torch.utils.data.DataLoader(_Blocks(), batch_size=4))
    return m


def test_export_replaces_its_own_previous_export_but_not_a_foreign_folder(tmp_path, monkeypatch):
    _fit(tmp_path, 0)
    second = _fit(tmp_path, 1)  # the same config run again: its hf_model is replaced
    exported = load_file(tmp_path / "hf_model" / "model.safetensors")
    assert torch.equal(exported["transformer.wte.weight"], second.model.state_dict()["transformer.wte.weight"])

    foreign = tmp_path / "other"
    (foreign / "hf_model" / "checkpoints").mkdir(parents=True)
    (foreign / "hf_model" / "checkpoints" / "last.ckpt").write_bytes(b"weights")
    # Refused at the start of fit (before training), not after it: one line naming the folder and the fix.
    monkeypatch.setattr(GPT2Module, "training_step", lambda *a, **k: pytest.fail("trained before refusing"))
    with pytest.raises(GPT2DistError, match=r"other/hf_model exists and is not a previous Hugging Face export "
                                            r"\(it holds checkpoints/\).*set export.dirname to another name"):
        _fit(foreign, 2)
    assert (foreign / "hf_model" / "checkpoints" / "last.ckpt").read_bytes() == b"weights"
    assert sorted(p.name for p in foreign.iterdir()) == ["hf_model"]


class _Echo(pl.LightningModule):
    def predict_step(self, prompt: str, batch_idx: int) -> dict:
        return {"prompt": prompt, "text": prompt + "!"}


def test_each_predict_run_replaces_the_predictions_file(tmp_path):
    path = tmp_path / "predictions.jsonl"

    def predict(prompts):
        trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                             default_root_dir=tmp_path, callbacks=[PredictionWriter()])
        trainer.predict(_Echo(), torch.utils.data.DataLoader(prompts, batch_size=1, collate_fn=lambda x: x[0]),
                        return_predictions=False)
        return [json.loads(line)["prompt"] for line in path.read_text().splitlines()]

    assert predict(["a", "b", "c"]) == ["a", "b", "c"]
    assert predict(["d", "e"]) == ["d", "e"]  # not a, b, c, d, e
    assert sorted(p.name for p in tmp_path.iterdir()) == ["predictions.jsonl"]  # no temporary left

    class _Dies(_Echo):
        def predict_step(self, prompt, batch_idx):
            if batch_idx == 1:
                raise RuntimeError("killed")
            return super().predict_step(prompt, batch_idx)

    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=tmp_path, callbacks=[PredictionWriter()])
    with pytest.raises(RuntimeError, match="killed"):
        trainer.predict(_Dies(), torch.utils.data.DataLoader(["f", "g"], batch_size=1, collate_fn=lambda x: x[0]))
    assert [json.loads(line)["prompt"] for line in path.read_text().splitlines()] == ["d", "e"]  # still whole
    assert predict(["h"]) == ["h"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["predictions.jsonl"]  # the stale temporary is gone


def test_early_stop_is_off_by_default_and_the_config_patience_wins_over_the_checkpoints():
    from gpt2dist.callbacks import EarlyStop
    from gpt2dist.errors import ConfigError

    assert not EarlyStop().enabled  # the CLI always adds it: off unless asked
    assert EarlyStop(patience=3).enabled and EarlyStop(stopping_threshold=2.5).enabled
    # Lightning's load_state_dict takes the checkpoint's patience: a raised patience would be ignored.
    es = EarlyStop(patience=5)
    es.load_state_dict(EarlyStop(patience=2).state_dict())
    assert es.patience == 5
    with pytest.raises(ConfigError, match="early_stopping.patience=0 must be >= 1"):
        EarlyStop(patience=0)
    with pytest.raises(ConfigError, match="early_stopping.min_delta=-0.1 must be >= 0"):
        EarlyStop(patience=1, min_delta=-0.1)


class _TokenizedData(pl.LightningDataModule):
    def __init__(self, tokenizer):
        super().__init__()
        self.tokenizer = tokenizer

    def train_dataloader(self):
        return torch.utils.data.DataLoader(_Blocks(), batch_size=4)


@pytest.mark.parametrize("where", ["export.sample_prompt", "samples.prompts[1]"])
def test_a_prompt_too_long_to_sample_from_is_refused_before_training(tmp_path, tokenizer, where):
    """A prompt with no position left to generate into used to fail the run after its last step (the
    export's sample) or at the first sample step, with the other ranks left waiting in a collective."""
    from gpt2dist.errors import ConfigError
    from gpt2dist.monitor import SampleLogger

    long = "def f(x):\n    return x\n" * 20  # far above TINY's n_positions=64
    assert len(tokenizer(long).input_ids) > TINY["n_positions"]
    callbacks = ([HFExport(sample_prompt=long)] if where.startswith("export") else
                 [HFExport(sample_prompt=None), SampleLogger(sample_every_n_steps=1, prompts=["def ", long])])
    steps = []

    class Steps(pl.Callback):
        def on_train_batch_start(self, trainer, *args):
            steps.append(trainer.global_step)

    m = GPT2Module(from_scratch=True, dropout=0.0, config_overrides={**TINY, "vocab_size": len(tokenizer)})
    trainer = pl.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path,
                         callbacks=[Steps(), *callbacks])
    with pytest.raises(ConfigError, match=rf"^{re.escape(where)} 'def f.*is \d+ tokens.*n_positions=64.*at most 63 tokens"):
        trainer.fit(m, datamodule=_TokenizedData(tokenizer))
    assert steps == [] and not (tmp_path / "hf_model").exists()


def test_sampling_knobs_out_of_range_are_refused_by_name():
    from gpt2dist.errors import ConfigError
    from gpt2dist.monitor import SampleLogger, TrainMonitor

    for make, message in [(lambda: HFExport(sample_repetition_penalty=0.0), "export.sample_repetition_penalty=0.0 must be > 0"),
                          (lambda: HFExport(sample_repetition_penalty=-1.3), "export.sample_repetition_penalty=-1.3 must be > 0"),
                          (lambda: HFExport(sample_tokens=0), "export.sample_tokens=0 must be >= 1"),
                          (lambda: SampleLogger(max_new_tokens=0), "samples.max_new_tokens=0 must be >= 1"),
                          (lambda: SampleLogger(sample_every_n_steps=-5), "samples.sample_every_n_steps=-5 must be >= 0"),
                          (lambda: TrainMonitor(peak_tflops=-989.0), "monitor.peak_tflops=-989.0 must be > 0"),
                          (lambda: TrainMonitor(skip_first_steps=-1), "monitor.skip_first_steps=-1 must be >= 0")]:
        with pytest.raises(ConfigError, match=re.escape(message)):
            make()


def test_the_validation_line_says_which_step_an_older_train_loss_is_from(tmp_path, capsys):
    """train/loss is logged on logging steps only: at a validation between them, the line showed the last
    logging step's loss as this step's."""
    from gpt2dist.callbacks import ValidationReport

    losses = {}

    class Losses(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses[trainer.global_step] = float(outputs["loss"])

    torch.manual_seed(0)
    m = GPT2Module(from_scratch=True, dropout=0.0, lr=1e-2, warmup_steps=1,
                   config_overrides={**TINY, "vocab_size": 128, "bos_token_id": 0, "eos_token_id": 0})
    loader = torch.utils.data.DataLoader(_Blocks(), batch_size=1)
    trainer = pl.Trainer(accelerator="cpu", max_steps=8, log_every_n_steps=4, val_check_interval=2, limit_val_batches=2,
                         num_sanity_val_steps=0, logger=False, enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False, default_root_dir=tmp_path, callbacks=[Losses(), ValidationReport()])
    val = torch.utils.data.DataLoader([{**_Blocks()[i], "loss_weight": torch.tensor(1.0)} for i in range(2)], batch_size=1)
    trainer.fit(m, loader, val)
    lines = [ln.split("  val/loss")[0] for ln in capsys.readouterr().out.splitlines() if "val/loss" in ln]
    assert lines == ["step      2",  # no logging step yet: no train/loss
                     f"step      4  train/loss {losses[4]:.4f}",
                     f"step      6  train/loss {losses[4]:.4f} (step 4)",
                     f"step      8  train/loss {losses[8]:.4f}"], lines


def test_early_stopping_names_the_min_delta_as_configured():
    from gpt2dist.callbacks import EarlyStop

    es = EarlyStop(patience=1, min_delta=0.01)
    es._evaluate_stopping_criteria(torch.tensor(2.0))
    stop, reason = es._evaluate_stopping_criteria(torch.tensor(1.995))  # not better by more than 0.01
    assert stop and reason.endswith("(early_stopping.patience=1, min_delta=0.01)"), reason


def _threshold_fit(root, max_steps: int, ckpt_path=None, val=None, min_steps=None, val_every: int = 1, **early_stopping):
    """A real in-process fit validating every step, val/loss {1: 3.0, 2: 2.4, 3: 2.2, 4: 1.9, 5: 1.8} (or `val`),
    with the CLI's EarlyStop, FaultTolerance (last.ckpt at the end of fit) and a last.ckpt callback."""
    import lightning.pytorch as pl
    import torch
    from lightning.pytorch.callbacks import ModelCheckpoint

    from gpt2dist.callbacks import EarlyStop
    from gpt2dist.faults import FaultTolerance

    from conftest import linear_module

    val = val or {1: 3.0, 2: 2.4, 3: 2.2, 4: 1.9, 5: 1.8}

    trainer = pl.Trainer(accelerator="cpu", max_steps=max_steps, min_steps=min_steps, min_epochs=0 if min_steps else None,
                         val_check_interval=val_every, check_val_every_n_epoch=None,
                         limit_val_batches=1, num_sanity_val_steps=0, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=root,
                         callbacks=[EarlyStop(**early_stopping), FaultTolerance(),
                                    ModelCheckpoint(dirpath=root, save_last=True, save_top_k=0)])
    data = torch.utils.data.DataLoader(torch.randn(10, 2, generator=torch.Generator().manual_seed(0)), batch_size=1)
    trainer.fit(linear_module(lambda m, b: val[m.trainer.global_step]), data, data, ckpt_path=ckpt_path)
    return trainer.global_step


def test_a_stop_held_back_by_min_steps_is_called_off_when_the_value_improves(tmp_path):
    """patience 1, min_steps 4: step 2 (3.1 after 3.0) asks to stop, held back to step 4. Step 3 improves, so that
    stop no longer holds. Lightning still stopped at step 4 (a stale reason, improving there too), and the
    resume, its patience not used up, trained on. Now the stop is called off, and step 5 (2.9 after 2.8)
    stops the run, for good."""
    val = {1: 3.0, 2: 3.1, 3: 2.9, 4: 2.8, 5: 2.9, 6: 3.0, 7: 2.7, 8: 2.6}
    assert _threshold_fit(tmp_path, 8, val=val, min_steps=4, patience=1) == 5
    with pytest.warns(UserWarning, match=r"resume: this run stopped early at step 5 "):
        assert _threshold_fit(tmp_path, 8, str(tmp_path / "last.ckpt"), val=val, min_steps=4, patience=1) == 5
    # Still held back, and still holding at min_steps: the stop comes there (step 4: 3.2, no better than 3.0).
    assert _threshold_fit(tmp_path / "b", 8, val={**val, 3: 3.3, 4: 3.2}, min_steps=4, patience=1) == 4


def test_a_stop_held_back_by_min_steps_survives_a_resume(tmp_path):
    """Validation every 2 steps, patience 1, min_steps 5: step 4 (3.1 after 3.0) asks to stop, held back;
    Lightning validates again at min_steps and stops there (3.2). Interrupted at step 4 (a requeue between the
    deferral and min_steps), the resume knew of no stop (trainer.should_stop is not saved): it trained on to
    the next regular validation, step 6, and exported other weights."""
    val = {2: 3.0, 4: 3.1, 5: 3.2, 6: 3.3, 8: 3.4, 10: 3.5}
    assert _threshold_fit(tmp_path / "whole", 10, val=val, min_steps=5, val_every=2, patience=1) == 5
    assert _threshold_fit(tmp_path / "cut", 4, val=val, min_steps=5, val_every=2, patience=1) == 4
    assert _threshold_fit(tmp_path / "cut", 10, str(tmp_path / "cut" / "last.ckpt"), val=val, min_steps=5, val_every=2,
                          patience=1) == 5
    # A larger patience on resume: the deferred stop no longer holds, the run goes on (to step 8: 3 without a best).
    assert _threshold_fit(tmp_path / "cut2", 4, val=val, min_steps=5, val_every=2, patience=1) == 4
    assert _threshold_fit(tmp_path / "cut2", 10, str(tmp_path / "cut2" / "last.ckpt"), val=val, min_steps=5, val_every=2,
                          patience=3) == 8


def test_a_threshold_stop_is_judged_again_by_the_configs_threshold_on_resume(tmp_path):
    """A run stopped by stopping_threshold stayed stopped on resume whatever the config's threshold, and the
    warning said to raise patience (which changed nothing). As with patience, the config's value decides."""
    last = str(tmp_path / "last.ckpt")
    assert _threshold_fit(tmp_path, 5, stopping_threshold=2.5) == 2  # 2.4 < 2.5
    with pytest.warns(UserWarning, match=r"resume: this run stopped early at step 2 \(Stopping threshold reached: "
                                         r"val/loss = 2.4.*\); nothing left to train. To go on, move "
                                         r"early_stopping.stopping_threshold \(now 2.5\) past 2.4, or set it to null$"):
        assert _threshold_fit(tmp_path, 5, last, stopping_threshold=2.5) == 2  # the same threshold: stays stopped
    assert _threshold_fit(tmp_path, 5, last, stopping_threshold=2.0) == 4  # a lower one: goes on to 1.9 < 2.0
    assert _threshold_fit(tmp_path, 5, last, stopping_threshold=2.0) == 4  # and stays stopped there
    assert _threshold_fit(tmp_path, 5, last, patience=5) == 5  # no threshold now: trains on to max_steps
    # A checkpoint written before the stopping value was stored: stays stopped, and says so (was a TypeError).
    from types import SimpleNamespace

    from gpt2dist.callbacks import EarlyStop

    stopped = EarlyStop(stopping_threshold=2.5)
    stopped.stopping_reason, stopped.stopped_step = stopped.stopping_reason.STOPPING_THRESHOLD, 2
    state = {k: v for k, v in stopped.state_dict().items() if k != "stopped_value"}
    resumed, trainer = EarlyStop(stopping_threshold=2.5), SimpleNamespace(global_step=2, should_stop=False)
    resumed.load_state_dict(state)
    with pytest.warns(UserWarning, match=r"move early_stopping.stopping_threshold \(now 2.5\) past the value that stopped it"):
        resumed.on_train_start(trainer, None)
    assert trainer.should_stop
