"""gpt2dist/launch.py: the submission check that slurm/submit.sh runs before sbatch."""

from __future__ import annotations

import pytest
import yaml

from conftest import REPO
from gpt2dist.errors import ConfigError
from gpt2dist.launch import check_srun_world, check_submission


def cfg(tmp_path, **sections):
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(sections))
    return str(p)


def test_global_batch_arithmetic():
    line = check_submission(2, 8, ["--config", str(REPO / "configs/gpt2-large.yaml"), "--trainer.num_nodes=2"])
    # 8 seqs x 2 accum x 16 GPUs = 256 seqs x 1024 tokens
    assert line.endswith("= 256 seqs x 1024 tokens = 262,144 tokens/step"), line


@pytest.mark.parametrize("nodes, tasks, trainer, extra, needle", [
    (2, 8, {"num_nodes": 1}, [], "sets trainer.num_nodes=1 but the job asks for --nodes 2"),
    (1, 4, {"devices": 8}, [], "sets trainer.devices=8 but the job runs 4 task(s) per node"),
    (1, 4, {"devices": [0, 1]}, [], "sets trainer.devices=[0, 1]"),
    (1, 4, {}, ["--trainer.devices", "2"], "sets trainer.devices=2"),
    (2, 4, {"strategy": {"class_path": "x", "init_args": {"data_parallel_size": 4, "tensor_parallel_size": 1}}}, [],
     "= 4, but the job has 2 node(s) x 4 = 8 processes"),
])
def test_world_size_mismatch_is_refused(tmp_path, nodes, tasks, trainer, extra, needle):
    with pytest.raises(ConfigError, match=None) as e:
        check_submission(nodes, tasks, ["--config", cfg(tmp_path, trainer=trainer), *extra])
    assert needle in str(e.value)


def test_matching_world_size_and_missing_config(tmp_path):
    assert "8 processes" in check_submission(1, 8, ["--config", str(REPO / "configs/gpt2-large.yaml")])
    with pytest.raises(ConfigError, match="config file 'nope.yaml' does not exist"):
        check_submission(1, 1, ["--config", "nope.yaml"])
    with pytest.raises(ConfigError, match="no --config given"):
        check_submission(1, 1, ["--trainer.max_steps=3"])
    # `gpt2dist fit -c FILE` is LightningCLI's short form: the same file, the same checks.
    assert "8 processes" in check_submission(1, 8, ["-c", str(REPO / "configs/gpt2-large.yaml")])
    with pytest.raises(ConfigError, match="config file 'nope.yaml' does not exist"):
        check_submission(1, 1, ["-c", "nope.yaml"])
    with pytest.raises(ConfigError, match="sets trainer.num_nodes=1 but the job asks for --nodes 2"):
        check_submission(2, 8, ["-c", str(REPO / "configs/gpt2-large.yaml")])


def test_a_later_strategy_class_drops_the_earlier_ones_settings(tmp_path):
    """A config with ModelParallelStrategy (data_parallel_size 4), then the FSDP2 overlay: the CLI runs FSDP2,
    which takes no data_parallel_size. submit.sh merged the two and refused the valid 8-process job."""
    mp = tmp_path / "mp.yaml"
    mp.write_text(yaml.safe_dump({"trainer": {"strategy": {"class_path": "lightning.pytorch.strategies.ModelParallelStrategy",
                                                           "init_args": {"data_parallel_size": 4, "tensor_parallel_size": 1}}}}))
    args = ["--config", str(REPO / "configs/gpt2-large.yaml"), "--config", str(mp)]
    with pytest.raises(ConfigError, match="= 4, but the job has 1 node"):
        check_submission(1, 8, args)
    assert "8 processes" in check_submission(1, 8, [*args, "--config", str(REPO / "configs/strategy/fsdp.yaml")])
    # The same class, spelled short: its settings stay (the CLI resolves both to one class).
    short = tmp_path / "short.yaml"
    short.write_text(yaml.safe_dump({"trainer": {"strategy": {"class_path": "ModelParallelStrategy"}}}))
    with pytest.raises(ConfigError, match="= 4, but the job has 1 node"):
        check_submission(1, 8, [*args, "--config", str(short)])


def test_model_parallel_sizes_default_as_lightning_resolves_them_and_tensor_parallel_is_refused(tmp_path):
    """Lightning's ModelParallelStrategy defaults both sizes to "auto" (data parallel = nodes, tensor parallel =
    devices per node). The check took tensor parallel for 1: it passed data_parallel_size 16 on 2 x 8 (which
    Lightning stops at start: 16 x 8 != 16), refused 2 (2 x 8 = 16, valid for Lightning), and printed a
    16-process global batch for two "auto"s, where GPT2Module (no tensor parallelism) trains on 2."""
    mp = "lightning.pytorch.strategies.ModelParallelStrategy"
    large = ["--config", str(REPO / "configs/gpt2-large.yaml"), "--trainer.num_nodes=2"]
    for init, needle in (({"data_parallel_size": 16}, "tensor_parallel_size=8 (auto: the devices per node)"),
                         ({"data_parallel_size": 2}, "tensor_parallel_size=8 (auto: the devices per node)"),
                         ({}, "tensor_parallel_size=8 (auto"),
                         ({"data_parallel_size": 8, "tensor_parallel_size": 2}, "tensor_parallel_size=2 (as set)")):
        with pytest.raises(ConfigError, match=None) as e:
            check_submission(2, 8, [*large, "--config", cfg(tmp_path, trainer={"strategy": {"class_path": mp, "init_args": init}})])
        assert needle in str(e.value) and "GPT2Module has no tensor parallelism; use configs/strategy/fsdp.yaml" in str(e.value)
    ok = cfg(tmp_path, trainer={"strategy": {"class_path": mp, "init_args": {"tensor_parallel_size": 1, "data_parallel_size": 16}}})
    assert "16 processes" in check_submission(2, 8, [*large, "--config", ok])


def test_arguments_apply_in_order_as_the_cli_applies_them():
    """LightningCLI: a --config after an override overrides it (`gpt2dist fit ... --print_config` agrees).
    The line said 32 seqs where the job trains 128."""
    large = str(REPO / "configs/gpt2-large.yaml")  # 8 seqs x 2 accum
    before = check_submission(1, 8, ["--data.batch_size", "4", "--trainer.accumulate_grad_batches=1", "--config", large])
    after = check_submission(1, 8, ["--config", large, "--data.batch_size", "4", "--trainer.accumulate_grad_batches=1"])
    assert "8 seqs x 2 accum x 8 processes" in before and "= 128 seqs" in before, before
    assert "4 seqs x 1 accum x 8 processes" in after and "= 32 seqs" in after, after


def test_a_malformed_config_file_is_one_line(tmp_path):
    bad, listed = tmp_path / "bad.yaml", tmp_path / "list.yaml"
    bad.write_text("trainer:\n  max_steps: 3\n  devices: 2: 3\n")
    listed.write_text("- trainer\n- model\n")
    with pytest.raises(ConfigError, match=r"config file '.*bad.yaml' is not valid YAML at line 3 .*: fix the file"):
        check_submission(1, 1, ["--config", str(bad)])
    with pytest.raises(ConfigError, match=r"config file '.*list.yaml' holds a list, not sections"):
        check_submission(1, 1, ["--config", str(listed)])


def test_submit_sh_takes_sbatch_style_options_and_refuses_leading_zeros(tmp_path):
    """`--nodes=2` fell through to gpt2dist fit's arguments: a 1-node job was queued, which then failed to
    start. A fake sbatch records what would be queued."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    (tmp_path / "sbatch").write_text('#!/bin/sh\necho "$@" > "$(dirname "$0")/queued"\necho 123\n')
    (tmp_path / "sbatch").chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path}:{Path(sys.executable).parent}:{os.environ['PATH']}", "PYTHON": sys.executable}

    def submit(*args):
        return subprocess.run(["bash", str(REPO / "slurm/submit.sh"), *args, "--config", str(REPO / "configs/gpt2-large.yaml"),
                               "--trainer.num_nodes=2"], env=env, capture_output=True, text=True, timeout=120)

    r = submit("--nodes=2", "--gpus-per-node=8", "--time=01:00:00")
    assert r.returncode == 0 and r.stdout.strip() == "123", r.stderr
    queued = (tmp_path / "queued").read_text().split()
    assert queued[:5] == ["--parsable", "--nodes=2", "--ntasks-per-node=8", "--gpus-per-node=8", "--cpus-per-task=8"]
    assert "--time=01:00:00" in queued and queued[queued.index(str(REPO / "slurm/fit.sbatch")) + 1:] == [
        "--config", str(REPO / "configs/gpt2-large.yaml"), "--trainer.num_nodes=2"]
    assert "= 256 seqs" in r.stderr  # 8 seqs x 2 accum x 2 nodes x 8
    r = submit("--nodes", "2", "--gpus-per-node", "08")  # bash arithmetic reads 08 as octal
    assert r.returncode == 2 and r.stderr.strip() == (
        "submit.sh: error: --gpus-per-node '08' is not a whole number (no sign, no leading zero)"), r.stderr


def test_a_job_array_is_checked_task_by_task_as_fit_sbatch_runs_it(tmp_path):
    """slurm/submit.sh --array 0-3: the check read `sweep-%a.yaml` as a file name and refused a valid sweep,
    and passed an array without %a, whose every task then waited in the queue to exit 2 in fit.sbatch. The
    array was left to sbatch's environment as SBATCH_ARRAY, which sbatch never reads (SBATCH_ARRAY_INX): one
    plain job was queued, with a literal %a. Now it is passed to sbatch as checked."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from gpt2dist.launch import array_task_ids

    assert array_task_ids("0-3") == [0, 1, 2, 3] and array_task_ids("1,3,5-7") == [1, 3, 5, 6, 7]
    assert array_task_ids("0-15:4") == [0, 4, 8, 12] and array_task_ids("0-99%10") == list(range(100))
    with pytest.raises(ConfigError, match="job array '0-x': '0-x' is not an id or range"):
        array_task_ids("0-x")
    for i, batch in enumerate((4, 8, 4)):
        (tmp_path / f"sweep-{i}.yaml").write_text(yaml.safe_dump({"data": {"batch_size": batch},
                                                                  "trainer": {"default_root_dir": f"runs/sweep-{i}"}}))
        (tmp_path / f"lr-{i}.yaml").write_text(yaml.safe_dump({"model": {"lr": 1e-4 * (i + 1)}}))
    (tmp_path / "sbatch").write_text('#!/bin/sh\necho "$@" > "$(dirname "$0")/queued"\necho 123\n')
    (tmp_path / "sbatch").chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path}:{Path(sys.executable).parent}:{os.environ['PATH']}", "PYTHON": sys.executable}

    def submit(array, *args, extra_env=None):
        return subprocess.run(["bash", str(REPO / "slurm/submit.sh"), "--config", str(REPO / "configs/gpt2-large.yaml"),
                               *(["--array", array] if array else []), *args], env={**env, **(extra_env or {})},
                              capture_output=True, text=True, timeout=120)

    sweep = ["--config", str(tmp_path / "sweep-%a.yaml")]
    for array, extra_env in (("0-2", None), (None, {"SBATCH_ARRAY_INX": "0-2"})):  # the flag, or sbatch's variable
        r = submit(array, *sweep, extra_env=extra_env)
        assert r.returncode == 0 and r.stdout.strip() == "123", r.stderr
        assert "array task(s) 0,2: global batch: 4 seqs" in r.stderr and "array task(s) 1: global batch: 8 seqs" in r.stderr
        queued = (tmp_path / "queued").read_text().split()
        assert "--array=0-2" in queued and queued[-1] == str(tmp_path / "sweep-%a.yaml")  # fit.sbatch fills in %a
        (tmp_path / "queued").unlink()
    r = submit(None, *sweep, extra_env={"SBATCH_ARRAY": "0-2"})
    assert r.returncode == 2 and r.stderr.strip() == (
        "submit.sh: error: SBATCH_ARRAY is not read by sbatch; pass --array 0-2 (or SBATCH_ARRAY_INX)"), r.stderr
    # Started by a relative path with CDPATH exported: `cd` printed the folder, and sbatch got a path of two lines.
    r = subprocess.run(["bash", "slurm/submit.sh", "--config", str(REPO / "configs/gpt2-large.yaml")], cwd=REPO,
                       env={**env, "CDPATH": "."}, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and str(REPO / "slurm/fit.sbatch") in (tmp_path / "queued").read_text().split(), r.stderr
    (tmp_path / "queued").unlink()
    for array, args, says in (("0-3", ["--config", str(tmp_path / "sweep-%a.yaml")], "array task 3: config file "),
                              ("0-3", [], "job array '0-3': every task would get the same arguments, so the same run folder"),
                              # %a in a learning rate or a seed only: one run folder, tasks resuming each other
                              ("0-2", ["--config", str(tmp_path / "lr-%a.yaml")], "job array '0-2': tasks 0,1,2 all train in "
                               "the run folder runs/gpt2-large (trainer.default_root_dir); put %a in it (--trainer.default_root_dir "
                               "runs/gpt2-large-%a), or set it in each task's --config file"),
                              ("0-1", ["--seed_everything", "%a"], "tasks 0,1 all train in the run folder runs/gpt2-large"),
                              ("0-1", ["--config", str(tmp_path / "sweep-%a.yaml"), "--trainer.default_root_dir", "runs/s"],
                               "tasks 0,1 all train in the run folder runs/s (")):
        r = submit(array, *args)
        assert r.returncode == 2 and says in r.stderr and not (tmp_path / "queued").exists(), r.stderr


@pytest.mark.parametrize("env, nodes, devices, needle", [
    ({"SLURM_STEP_NUM_TASKS": "2", "SLURM_STEP_NUM_NODES": "1"}, 1, 1,
     "srun started 2 task(s) on 1 node(s), but the trainer runs trainer.num_nodes=1 x trainer.devices=1 = 1 process(es): "
     "pass --trainer.num_nodes 1 --trainer.devices 2"),
    ({"SLURM_STEP_NUM_TASKS": "8", "SLURM_STEP_NUM_NODES": "2"}, 2, 2, "pass --trainer.num_nodes 2 --trainer.devices 4"),
    ({"SLURM_STEP_NUM_TASKS": "4", "SLURM_STEP_NUM_NODES": "2"}, 1, 4, "on 2 node(s), but the trainer runs trainer.num_nodes=1"),
])
def test_srun_task_count_must_match_the_trainer(env, nodes, devices, needle):
    with pytest.raises(ConfigError) as e:
        check_srun_world(nodes, devices, env=env)
    assert needle in str(e.value)


def test_srun_tasks_outside_any_detected_cluster_are_refused():
    from gpt2dist.launch import check_srun_seen

    with pytest.raises(ConfigError, match="srun started 4 tasks.*SLURM_JOB_NAME='bash'"):
        check_srun_seen("LightningEnvironment", env={"SLURM_STEP_NUM_TASKS": "4", "SLURM_JOB_NAME": "bash"})
    check_srun_seen("LightningEnvironment", env={"SLURM_STEP_NUM_TASKS": "1", "SLURM_JOB_NAME": "bash"})  # one task
    check_srun_seen("LightningEnvironment", env={})  # no srun
    check_srun_seen("TorchElasticEnvironment", env={"SLURM_STEP_NUM_TASKS": "2"})  # srun of torchrun: its own ranks


def test_srun_task_count_that_matches_or_no_srun_passes():
    check_srun_world(2, 4, env={"SLURM_STEP_NUM_TASKS": "8", "SLURM_STEP_NUM_NODES": "2"})
    check_srun_world(1, 1, env={"SLURM_NTASKS": "4", "SLURM_NNODES": "1"})  # batch shell, no srun: one process


@pytest.mark.parametrize("job_name, needles", [
    ("fit", ["srun started 2 task(s)", "--trainer.devices 2"]),
    # salloc's shell: Lightning takes an interactive job for no cluster at all, and each task ran alone.
    ("interactive", ["srun started 2 tasks", "SLURM_JOB_NAME='interactive'", "salloc --job-name"])])
def test_srun_mismatch_stops_the_cli_in_one_line(tmp_path, corpus_dir, tokenizer_dir, job_name, needles):
    """`srun -n 2 gpt2dist fit` without --trainer.devices 2: each task would train alone as rank 0 in one folder."""
    from conftest import run_cli
    from test_slurm import write_config

    config = write_config(tmp_path, corpus_dir, tokenizer_dir, max_steps=2)
    env = {"SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": "2", "SLURM_NNODES": "1", "SLURM_JOB_NAME": job_name,
           "SLURM_JOB_ID": "5", "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0",
           "SLURM_NODELIST": "n1", "SLURM_STEP_NUM_TASKS": "2", "SLURM_STEP_NUM_NODES": "1"}
    p = run_cli("fit", "--config", str(config), env=env, cwd=tmp_path, timeout=300)
    assert p.returncode == 2, p.stderr[-3000:]
    errors = [line for line in p.stderr.splitlines() if line.startswith("gpt2dist: error:")]
    assert len(errors) == 1 and all(n in errors[0] for n in needles), errors
    assert "Traceback" not in p.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()  # nothing trained


def test_torchrun_launch_without_slurm(tmp_path, corpus_dir, tokenizer_dir):
    """The documented torchrun command for clusters without SLURM: 2 processes, one process group."""
    import os
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    from test_slurm import write_config

    config = write_config(tmp_path, corpus_dir, tokenizer_dir, max_steps=4)
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
    r = subprocess.run([torchrun, "--nnodes", "1", "--nproc-per-node", "2", "--rdzv-backend", "c10d",
                        "--rdzv-endpoint", "127.0.0.1:0", "-m", "gpt2dist", "fit", "--config", str(config),
                        "--trainer.num_nodes", "1", "--trainer.devices", "2", "--ckpt_path", "auto"],
                       env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    assert "GLOBAL_RANK: 0, MEMBER: 1/2" in out and "GLOBAL_RANK: 1, MEMBER: 2/2" in out
    assert "cluster environment: TorchElasticEnvironment (world size 2)" in out
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()


@pytest.mark.parametrize("script", ["fit.sbatch", "eval.sbatch"])
def test_sbatch_scripts_keep_the_hugging_face_caches_where_the_libraries_look(tmp_path, script):
    """HF_HOME defaulted to ~/.cache/huggingface, not the libraries' own ${XDG_CACHE_HOME:-~/.cache}/huggingface:
    on a cluster that points XDG_CACHE_HOME at scratch, what the login node downloaded was not found (offline
    compute nodes failed) or was downloaded again into the home quota. A stub srun records what the job sees."""
    import os
    import subprocess

    (tmp_path / "srun").write_text('#!/bin/sh\necho "$HF_HOME $HF_DATASETS_CACHE" >> "$(dirname "$0")/seen"\n')
    (tmp_path / "srun").chmod(0o755)
    slurm = {"SLURM_JOB_NUM_NODES": "1", "SLURM_TASKS_PER_NODE": "2", "SLURM_CPUS_PER_TASK": "1", "SLURM_JOB_ID": "7",
             "SLURM_JOB_NODELIST": "n1", "PATH": f"{tmp_path}:/usr/bin:/bin", "HOME": str(tmp_path / "home")}
    args = ["--config", "x.yaml"] if script == "fit.sbatch" else ["test", "--config", "x.yaml"]
    for extra, expected in (({"XDG_CACHE_HOME": "/scratch/u/cache"}, "/scratch/u/cache/huggingface"),
                            ({}, f"{tmp_path}/home/.cache/huggingface"),
                            ({"HF_HOME": "/shared/hf", "XDG_CACHE_HOME": "/scratch/u/cache"}, "/shared/hf")):
        (tmp_path / "seen").unlink(missing_ok=True)
        r = subprocess.run(["bash", str(REPO / "slurm" / script), *args], env={**slurm, **extra}, capture_output=True,
                           text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        assert set((tmp_path / "seen").read_text().splitlines()) == {f"{expected} {expected}/datasets"}, extra


def test_fit_sbatch_takes_the_tasks_slurm_gave_the_job_and_its_own_ids_and_a_free_port(tmp_path):
    """Stub srun and scontrol record what the job's steps get. (1) A --ntasks 2 job keeps --ntasks-per-node=8 in
    SLURM_NTASKS_PER_NODE: the fit ran --trainer.devices 8 over 2 processes; now SLURM_TASKS_PER_NODE's 2, and an
    uneven layout (2,1) is one line. (2) Array ids and a restart count inherited from the submitting job (sbatch
    copies its environment) made the job refuse itself as an array task, or requeue its parent; SLURM's record
    (scontrol show job) wins. (3) Lightning's port, 15000 + the id's last 4 digits, taken by another job on the
    node: the next free one."""
    import os
    import socket
    import subprocess

    (tmp_path / "srun").write_text('#!/bin/bash\necho "array=${SLURM_ARRAY_JOB_ID:-}_${SLURM_ARRAY_TASK_ID:-} '
                                   'restarts=${SLURM_RESTART_COUNT:-} port=${MASTER_PORT:-} ${*: -4}" >> "$(dirname "$0")/seen"\n')
    (tmp_path / "scontrol").write_text('#!/bin/bash\ncase "$1 $2" in\n  "show hostnames") echo n1; echo n2 ;;\n'
                                       '  "show job") cat "$(dirname "$0")/record" ;;\nesac\n')
    for stub in ("srun", "scontrol"):
        (tmp_path / stub).chmod(0o755)
    slurm = {"SLURM_JOB_NUM_NODES": "1", "SLURM_NTASKS_PER_NODE": "8", "SLURM_TASKS_PER_NODE": "2", "SLURM_JOB_ID": "20007",
             "SLURM_CPUS_PER_TASK": "1", "SLURM_JOB_NODELIST": "n[1-2]", "SLURMD_NODENAME": "n1",
             "PATH": f"{tmp_path}:/usr/bin:/bin", "HOME": str(tmp_path)}
    inherited = {"SLURM_ARRAY_JOB_ID": "99", "SLURM_ARRAY_TASK_ID": "3", "SLURM_RESTART_COUNT": "2"}

    def job(record, env, *args):
        (tmp_path / "seen").unlink(missing_ok=True)
        (tmp_path / "record").write_text(record)
        r = subprocess.run(["bash", str(REPO / "slurm/fit.sbatch"), "--config", "x.yaml", *args], env={**slurm, **env},
                           capture_output=True, text=True, timeout=60)
        return r, (tmp_path / "seen").read_text().splitlines() if (tmp_path / "seen").exists() else []

    with socket.socket() as taken:  # another job's rendezvous on Lightning's port for this id
        taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        taken.bind(("127.0.0.1", 15007))
        taken.listen()
        r, seen = job("JobId=20007 JobName=gpt2dist UserId=u(0) Restarts=0 BatchFlag=1\n", inherited)
    assert r.returncode == 0, r.stderr
    assert seen == ["array=_ restarts=0 port=15008 --trainer.num_nodes 1 --trainer.devices 2"] * 2  # prepare, fit

    # A real array task keeps its ids (and its %a), and a requeue its count; the port is Lightning's when free.
    r, seen = job("JobId=20007 ArrayJobId=20005 ArrayTaskId=2 JobName=gpt2dist Restarts=1 BatchFlag=1\n", inherited,
                  "--trainer.default_root_dir", "runs/s-%a")
    assert r.returncode == 0, r.stderr
    assert seen[-1] == "array=20005_2 restarts=1 port=15007 --trainer.num_nodes 1 --trainer.devices 2", seen

    # Submitted from inside another fit job, whose port this script chose: that job's, still in use; a port the
    # user exported is kept.
    for env, port in (({"MASTER_PORT": "15003", "GPT2DIST_PORT_JOB": "20003"}, "15007"), ({"MASTER_PORT": "29500"}, "29500")):
        r, seen = job("JobId=20007 JobName=gpt2dist Restarts=0\n", env)
        assert r.returncode == 0 and seen[-1].split()[2] == f"port={port}", (env, seen, r.stderr)

    r, seen = job("", {"SLURM_JOB_NUM_NODES": "2", "SLURM_TASKS_PER_NODE": "2,1"})
    assert r.returncode == 2 and seen == [] and r.stderr.strip() == (
        "fit.sbatch: error: SLURM started 2,1 task(s) per node (uneven, from --ntasks?); every node needs the same "
        "number: submit with --ntasks-per-node=G (one per GPU) instead of --ntasks")


def test_submit_sh_does_not_pass_on_the_submitting_jobs_array_ids(tmp_path):
    """Run from inside an array task or a requeued job, sbatch copied SLURM_ARRAY_* and SLURM_RESTART_COUNT
    into the new job (SLURM sets them only where they apply). A stub sbatch records what it was given."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    (tmp_path / "sbatch").write_text('#!/bin/sh\necho "${SLURM_ARRAY_JOB_ID:-}_${SLURM_ARRAY_TASK_ID:-}_'
                                     '${SLURM_RESTART_COUNT:-}_${MASTER_PORT:-} $SLURM_JOB_ID" > "$(dirname "$0")/queued"\n'
                                     'echo 123\n')
    (tmp_path / "sbatch").chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path}:{Path(sys.executable).parent}:{os.environ['PATH']}", "PYTHON": sys.executable,
           "SLURM_ARRAY_JOB_ID": "99", "SLURM_ARRAY_TASK_ID": "3", "SLURM_RESTART_COUNT": "2", "SLURM_JOB_ID": "101",
           "MASTER_PORT": "15101", "GPT2DIST_PORT_JOB": "101"}  # fit.sbatch's port for job 101
    r = subprocess.run(["bash", str(REPO / "slurm/submit.sh"), "--config", str(REPO / "configs/gpt2-large.yaml")],
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "123", r.stderr
    assert (tmp_path / "queued").read_text().strip() == "___ 101"
