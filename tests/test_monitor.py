"""gpt2dist/monitor.py: throughput timing under accumulation and pauses, grad norm (also FSDP2),
and greedy samples under FSDP2 sharding (real 2-process gloo)."""

from __future__ import annotations

import os
import re
import warnings
from types import SimpleNamespace

import pytest
import torch

from gpt2dist import monitor as mon
from gpt2dist.metrics import gpt2_flops_per_token
from gpt2dist.model import GPT2Module

from conftest import TINY, spawn_ranks


def tiny_module(vocab=512) -> GPT2Module:
    torch.manual_seed(0)
    m = GPT2Module(from_scratch=True, config_overrides={**TINY, "vocab_size": vocab}, dropout=0.0)
    m.configure_model()
    return m


class Clock:
    def __init__(self):
        self.t, self.reads = 100.0, 0

    def __call__(self):
        self.reads += 1  # on CUDA each read is a device sync (TrainMonitor._now)
        return self.t


def test_throughput_counts_every_micro_batch_and_excludes_validation(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(mon.time, "perf_counter", clock)
    module = tiny_module()
    logged = {}
    module.log = lambda k, v, **kw: logged.__setitem__(k, float(v))
    connector = SimpleNamespace(should_update_logs=False)  # Lightning's "this step is written to the loggers"
    trainer = SimpleNamespace(global_step=0, world_size=4, log_every_n_steps=10, sanity_checking=False,
                              strategy=None, _logger_connector=connector)
    cb = mon.TrainMonitor(peak_tflops=1e-6)  # 1 MFLOP/s peak: MFU is checkable on CPU
    cb.on_train_start(trainer, module)
    batch = {"input_ids": torch.zeros(2, 16, dtype=torch.long)}  # 32 tokens per micro-batch

    def optimizer_step(micro_seconds, accum=4, validation_seconds=0.0):
        for i in range(accum):
            cb.on_train_batch_start(trainer, module, batch, i)
            clock.t += micro_seconds
            if i == accum - 1:
                trainer.global_step += 1
            cb.on_train_batch_end(trainer, module, None, batch, i)
        if validation_seconds:
            cb.on_validation_start(trainer, module)
            clock.t += validation_seconds  # must not count

    optimizer_step(5.0)  # warm-up step: skipped; the window opens at its end
    reads = clock.reads
    optimizer_step(0.25, validation_seconds=30.0)  # 128 tokens in 1.0 s; not a logging step
    assert not logged
    assert clock.reads == reads + 1  # the validation pause only: no per-step read
    connector.should_update_logs = True
    optimizer_step(0.5)  # 128 tokens in 2.0 s, a logging step: the window closes
    assert clock.reads == reads + 3  # + the restart after validation and the close
    # window: 256 tokens / 3.0 s per device; job = x4 ranks
    assert logged["throughput/tokens_per_sec_per_device"] == pytest.approx(256 / 3.0)
    assert logged["throughput/tokens_per_sec"] == pytest.approx(4 * 256 / 3.0)
    fpt = gpt2_flops_per_token(module.model.config, 16)
    assert logged["throughput/mfu"] == pytest.approx(256 / 3.0 * fpt / 1e6)
    connector.should_update_logs = False
    for _ in range(5):
        optimizer_step(1.0)  # 5 steps, 640 tokens in 20 s, with no clock read (no sync) at all
    assert clock.reads == reads + 3
    connector.should_update_logs = True
    optimizer_step(0.25)  # closes the next window: 768 tokens in 21 s
    assert logged["throughput/tokens_per_sec_per_device"] == pytest.approx(768 / 21.0)


def test_building_the_validation_loader_is_not_training_time(monkeypatch):
    """A real fit: Lightning builds the validation loader (data.num_workers forks) before on_validation_start.
    A clock that jumps 100 s while the loader starts: the first tokens/s logged after the validation equals the
    one before it (the same steps, the same fake time), not 100 s worth lower."""
    import lightning.pytorch as pl

    clock = Clock()
    monkeypatch.setattr(mon.time, "perf_counter", clock)

    class SlowStart(torch.utils.data.DataLoader):
        def __iter__(self):
            clock.t += 100.0  # what the worker processes' start costs, exaggerated
            return super().__iter__()

    class Steps(pl.Callback):  # each training micro-batch takes 1 s of the fake clock
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            clock.t += 1.0

    ids = torch.randint(0, 512, (40, 16), generator=torch.Generator().manual_seed(0))
    train = torch.utils.data.DataLoader([{"input_ids": x} for x in ids], batch_size=4)
    val = SlowStart([{"input_ids": x, "loss_weight": torch.tensor(1.0)} for x in ids[:8]], batch_size=4)
    module, logged = tiny_module(), []
    log = module.log

    def spy(key, value, **kw):
        if key == "throughput/tokens_per_sec":
            logged.append((module.trainer.global_step, float(value)))
        return log(key, value, **kw)

    module.log = spy
    pl.Trainer(accelerator="cpu", max_steps=8, val_check_interval=4, limit_val_batches=1, num_sanity_val_steps=0,
               log_every_n_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
               enable_model_summary=False, callbacks=[Steps(), mon.TrainMonitor()]).fit(module, train, val)
    rates = dict(logged)
    assert sorted(rates) == [2, 4, 6, 8], logged
    assert rates[6] == pytest.approx(rates[4], rel=0.05) and rates[6] == pytest.approx(64.0, rel=0.05), logged


def test_old_window_knob_is_accepted_and_ignored():
    """Saved configs from before the logging-step window name monitor.window: they still load, with a warning."""
    with pytest.warns(UserWarning, match="monitor.window=20 is ignored"):
        cb = mon.TrainMonitor(window=20)
    assert not hasattr(cb, "window")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mon.TrainMonitor()  # no warning by default


def test_a_mig_slice_warns_and_logs_no_mfu(monkeypatch):
    """A MIG slice matched its whole GPU's peak: an MFU several times too low. No MFU, and the warning says why."""
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3 MIG 1g.10gb")
    cb = mon.TrainMonitor()
    with pytest.warns(UserWarning, match=r"is a MIG slice \(a fraction of the GPU's peak\); set monitor.peak_tflops"):
        cb.on_train_start(SimpleNamespace(global_step=0), SimpleNamespace(device=torch.device("cuda", 0)))
    assert cb.peak_flops is None


def test_cpu_warns_and_logs_no_mfu():
    module = tiny_module()
    trainer = SimpleNamespace(global_step=0)
    cb = mon.TrainMonitor()
    with pytest.warns(UserWarning, match="no MFU on cpu"):
        cb.on_train_start(trainer, module)
    assert cb.peak_flops is None


def test_grad_norm_single_process_equals_torch():
    module = tiny_module()
    ids = torch.randint(0, 512, (2, 16))
    module.token_losses(ids).mean().backward()
    expected = torch.nn.utils.clip_grad_norm_(module.parameters(), max_norm=1e9)
    assert mon.total_grad_norm(module.parameters()).item() == pytest.approx(expected.item(), rel=1e-6)


def _fsdp2_worker(rank, world, init_file, tokenizer_dir, out_q):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from transformers.models.gpt2.modeling_gpt2 import GPT2Block

    from gpt2dist.tokenizer import load_tokenizer

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        tok = load_tokenizer(tokenizer_dir)
        ref = tiny_module(len(tok))
        sharded = tiny_module(len(tok))  # same seed: same weights
        ids = torch.randint(0, len(tok), (2, 16), generator=torch.Generator().manual_seed(1))
        # Reference: the unsharded model on the same (identical on both ranks) batch.
        ref.token_losses(ids).mean().backward()
        ref_norm = torch.nn.utils.get_total_norm([p.grad for p in ref.parameters()]).item()
        ref_texts = mon.generate_samples(ref, tok, ["def ", "import"], 8, seed=3)
        # FSDP2 as gpt2dist's strategy applies it: each block, then the LightningModule root.
        mesh = init_device_mesh("cpu", (world,))
        for block in [m for m in sharded.model.modules() if isinstance(m, GPT2Block)]:
            fully_shard(block, mesh=mesh)
        fully_shard(sharded, mesh=mesh)
        sharded.token_losses(ids).mean().backward()
        norm = mon.total_grad_norm(sharded.parameters()).item()
        local_only = torch.nn.utils.get_total_norm([p.grad.to_local() for p in sharded.parameters()]).item()
        texts = mon.generate_samples(sharded, tok, ["def ", "import"], 8, seed=3)
        out_q.put((rank, ref_norm, norm, local_only, ref_texts, texts))
        dist.barrier()  # neither rank tears gloo down while the other still has work in flight
    finally:
        dist.destroy_process_group()
    # Results flushed, then no interpreter teardown: collecting FSDP2 objects while gloo's worker
    # threads wind down aborted it once in CI ("terminate called without an active exception").
    out_q.close()
    out_q.join_thread()
    os._exit(0)


def test_grad_norm_and_samples_under_fsdp2(tmp_path, tokenizer_dir):
    results = spawn_ranks(_fsdp2_worker, 2, str(tmp_path / "init"), str(tokenizer_dir))
    for rank, ref_norm, norm, local_only, ref_texts, texts in results:
        assert norm == pytest.approx(ref_norm, rel=1e-5)  # the full norm on every rank
        assert local_only < ref_norm * 0.99  # a rank's shard alone would under-report
        assert texts == ref_texts and all(len(t) > len(p) for t, p in zip(texts, ["def ", "import"]))


def _fsdp1_worker(rank, world, init_file, out_q):
    import torch.distributed as dist
    from lightning.pytorch.strategies import FSDPStrategy
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FullyShardedDataParallel, ShardingStrategy

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))
        ref = tiny_module(128)
        ref.token_losses(ids).mean().backward()  # the same batch on every rank: the full gradient is this one
        ref_norm = torch.nn.utils.get_total_norm([p.grad for p in ref.parameters()]).item()
        norms = {}
        for sharding in ("FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD", "HYBRID_SHARD"):
            # HYBRID_SHARD: 2 emulated nodes x 2 ranks, shards within a node, a copy per node.
            mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard")) if sharding == "HYBRID_SHARD" else None
            model = FullyShardedDataParallel(tiny_module(128), device_id=torch.device("cpu"), use_orig_params=True,
                                             sharding_strategy=ShardingStrategy[sharding], device_mesh=mesh)
            model(ids, per_token_loss=True).mean().backward()
            strategy = FSDPStrategy(sharding_strategy=sharding, device_mesh=mesh)
            strategy.model = model
            strategy.parallel_devices = [torch.device("cpu")] * world
            norms[sharding] = mon.total_grad_norm(model.parameters(), strategy).item()
        out_q.put((rank, ref_norm, norms))
        dist.barrier()
    finally:
        dist.destroy_process_group()
    out_q.close()
    out_q.join_thread()
    os._exit(0)


def test_grad_norm_under_every_fsdp1_sharding(tmp_path):
    """FSDP1's grad norm is the full model's under each sharding strategy, on every rank (4 gloo ranks).
    NO_SHARD and HYBRID_SHARD (the multi-node choice) logged sqrt(4) and sqrt(2) x the norm: the squares
    were summed over the world, where every rank, or every node, holds a copy."""
    for rank, ref_norm, norms in spawn_ranks(_fsdp1_worker, 4, str(tmp_path / "init")):
        for sharding, norm in norms.items():
            assert norm == pytest.approx(ref_norm, rel=1e-5), (rank, sharding, norm / ref_norm)


def test_between_logging_steps_only_device_tensors_are_logged(tmp_path):
    """A real fit with gpt2dist fit's per-step callbacks and a progress bar, logging every 4th step.
    On the other steps the only value logged is the grad norm, a tensor that stays on the device:
    no Python number (Lightning copies those to the GPU: a host sync) and no all-reduce. Progress-bar
    values are CPU tensors (a bar refresh reads them; reading a GPU tensor would sync)."""
    import lightning.pytorch as pl

    from gpt2dist.faults import FaultTolerance

    module = GPT2Module(from_scratch=True, config_overrides={**TINY, "vocab_size": 512}, dropout=0.0, warmup_steps=2)
    calls = []
    real_log = module.log
    step = [0]

    class Step(pl.Callback):  # which optimizer step (1-based) is running: no accumulation here
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            step[0] = trainer.global_step + 1

    def log(name, value, **kw):
        calls.append((step[0], name, value, kw.get("prog_bar", False)))
        return real_log(name, value, **kw)

    module.log = log
    ids = torch.randint(0, 512, (8 * 4, 16), generator=torch.Generator().manual_seed(0))
    loader = torch.utils.data.DataLoader([{"input_ids": x} for x in ids], batch_size=4)
    trainer = pl.Trainer(accelerator="cpu", max_steps=8, log_every_n_steps=4, logger=False, enable_checkpointing=False,
                         enable_model_summary=False, default_root_dir=tmp_path,
                         callbacks=[Step(), mon.TrainMonitor(skip_first_steps=1), FaultTolerance()])
    trainer.fit(module, train_dataloaders=loader)
    logging_steps = {4, 8}
    between = [(s, n) for s, n, v, _ in calls if s not in logging_steps]
    assert {n for _, n in between} == {"train/grad_norm"} and {s for s, _ in between} == {1, 2, 3, 5, 6, 7}
    assert all(isinstance(v, torch.Tensor) for s, _, v, _ in calls if s not in logging_steps)
    at_log = {n for s, n, _, _ in calls if s == 8}
    assert {"train/loss", "lr", "loss", "train/grad_norm", "throughput/tokens_per_sec", "tok/s"} <= at_log
    for _, name, value, prog_bar in calls:
        if prog_bar:
            assert isinstance(value, torch.Tensor) and value.device.type == "cpu", name
    assert all(isinstance(v, float) for v in trainer.progress_bar_metrics.values() if not isinstance(v, str))


def test_tokens_trained_is_restored_or_derived_for_checkpoints_without_it():
    from types import SimpleNamespace

    from gpt2dist.monitor import TrainMonitor

    trainer = SimpleNamespace(global_step=10, accumulate_grad_batches=2, world_size=4,
                              datamodule=SimpleNamespace(batch_size=8, block_size=64))
    restored = TrainMonitor(enabled=False)
    restored.load_state_dict({"tokens_trained": 12_345})  # counted: an epoch's short last step included
    restored.on_train_start(trainer, None)
    assert restored.tokens_trained == 12_345
    old = TrainMonitor(enabled=False)  # a checkpoint with no state for it: Lightning never calls load_state_dict
    old.on_train_start(trainer, None)
    assert old.tokens_trained == 10 * 2 * 4 * 8 * 64  # steps x accumulation x ranks x seqs x tokens
    fresh = TrainMonitor(enabled=False)
    fresh.load_state_dict({"tokens_trained": 99})
    fresh.on_train_start(SimpleNamespace(**{**vars(trainer), "global_step": 0}), None)
    assert fresh.tokens_trained == 0


def test_tokens_are_counted_while_the_monitor_is_off(tmp_path):
    """The count is checkpointed either way: a run resumed with monitor.enabled=true logged train/tokens
    from 0, off by the whole first segment."""
    import lightning.pytorch as pl

    module = GPT2Module(from_scratch=True, config_overrides={**TINY, "vocab_size": 512}, dropout=0.0, warmup_steps=1)
    ids = torch.randint(0, 512, (5 * 4, 16), generator=torch.Generator().manual_seed(0))
    loader = torch.utils.data.DataLoader([{"input_ids": x} for x in ids], batch_size=4)  # the 5th batch: short
    off = mon.TrainMonitor(enabled=False)
    trainer = pl.Trainer(accelerator="cpu", max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path, callbacks=[off])
    trainer.fit(module, train_dataloaders=loader)
    assert off.state_dict() == {"tokens_trained": 3 * 4 * 16}  # steps x seqs x tokens


def test_samples_txt_after_a_resume_holds_each_step_once(tmp_path, monkeypatch):
    """samples.txt is appended to: a run killed after sampling past its last checkpoint, resumed, samples those
    steps again and wrote them twice (step 4 twice below); the W&B table, restored from the checkpoint, did not."""
    monkeypatch.setattr(mon, "generate_samples", lambda module, tok, prompts, n, seed, strategy=None:
                        [f"{p} at step {module.step}" for p in prompts])

    def trainer(step, ckpt_path=None):
        return SimpleNamespace(global_step=step, callbacks=[], is_global_zero=True, strategy=None, loggers=[],
                               datamodule=SimpleNamespace(tokenizer=object()), ckpt_path=ckpt_path,
                               checkpoint_callback=SimpleNamespace(dirpath=str(tmp_path)))

    def train(cb, t, to):
        cb.on_train_start(t, None)
        while t.global_step < to:
            t.global_step += 1
            cb.on_train_batch_end(t, SimpleNamespace(step=t.global_step), None, None, 0)

    first = mon.SampleLogger(sample_every_n_steps=2, prompts=["The"])
    train(first, trainer(0), 2)
    checkpoint = {"rows": [list(r) for r in first.state_dict()["rows"]]}  # saved at step 2
    train(first, trainer(2), 5)  # samples step 4, then killed at step 5
    resumed = mon.SampleLogger(sample_every_n_steps=2, prompts=["The"])
    resumed.load_state_dict(checkpoint)
    train(resumed, trainer(2, ckpt_path="last.ckpt"), 6)
    text = (tmp_path / "samples.txt").read_text()
    assert re.findall(r"=== step (\d+) \| prompt 'The'\nThe at step (\d+)", text) == [("2", "2"), ("4", "4"), ("6", "6")]
    assert [r[0] for r in resumed.rows] == [2, 4, 6]
    assert not list(tmp_path.glob(".samples.txt*"))
    # A fresh fit in the same folder (its old checkpoints are set aside), also of the same callback object
    # (the Python API): the file and the table are its own, not appended to the earlier run's.
    for cb in (mon.SampleLogger(sample_every_n_steps=2, prompts=["The"]), resumed):
        train(cb, trainer(0), 2)
        text = (tmp_path / "samples.txt").read_text()
        assert re.findall(r"=== step (\d+) \| prompt 'The'\nThe at step (\d+)", text) == [("2", "2")]
        assert [r[0] for r in cb.rows] == [2]


def test_a_new_fit_does_not_reuse_the_last_fits_cached_grad_norm():
    """The step's norm is cached on the module by (trainer, global_step): a rollback fit in the same process
    (the Python API) resumes at the global_step of the NaN norm that stopped the last one, and read it again."""
    module = tiny_module()
    trainer = SimpleNamespace(global_step=2, strategy=None)
    module.token_losses(torch.randint(0, 512, (2, 16))).mean().backward()
    module._step_grad_norm = ((id(trainer), 2), torch.tensor(float("nan")))  # what the stopped fit left
    mon.TrainMonitor(enabled=False).on_train_start(SimpleNamespace(global_step=2, strategy=None, world_size=1, datamodule=None,
                                                                   accumulate_grad_batches=1), module)
    assert torch.isfinite(mon.step_grad_norm(trainer, module))


def test_samples_go_beside_the_checkpoints_in_an_object_store(tmp_path, monkeypatch):
    """checkpoint.dirpath s3://b/ckpt: Path() made it `s3:/b/ckpt`, a local folder named "s3:" under the working
    directory, where samples.txt was written (and, on resume, rewritten) instead of anywhere the run keeps."""
    import fsspec

    monkeypatch.chdir(tmp_path)  # where the "memory:" folder was made
    logger = mon.SampleLogger()
    trainer = SimpleNamespace(checkpoint_callback=SimpleNamespace(dirpath="memory://b/run-1/ckpt"),
                              default_root_dir="memory://b/run-1")
    path = logger.path(trainer)
    assert path == "memory://b/run-1/ckpt/samples.txt"
    logger.rows = [[2, "def ", "x = 1"]]
    logger._write(path, logger.rows, append=True)
    logger.rows.append([4, "def ", "y = 2"])
    logger._write(path, logger.rows[-1:], append=True)  # an object store cannot append: rewritten from every row
    with fsspec.open(path, "r") as f:
        assert f.read() == "".join(mon._sample_entry(*r) for r in logger.rows)
    assert logger._exists(path) and not list(tmp_path.rglob("samples.txt"))
    trainer.checkpoint_callback.dirpath = str(tmp_path / "ckpt")
    assert logger.path(trainer) == tmp_path / "ckpt" / "samples.txt"
