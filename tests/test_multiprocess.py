"""Several processes of one run over loopback (launch/local.sh, gloo): they train exactly as one
process with as many devices, each reads a disjoint slice of every global batch, their checkpoint
resumes in one process, and a dead, missing or disagreeing peer is one clear line, never a hang."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# configs/finetune.py:tiny at test size: 12 demo clips, 10 steps of stage 1, then 6 of stage 2.
FINETUNE = ["--config=configs/finetune.py:tiny", "--config.demo_clips=8", "--config.demo_eval_clips=4",
            "--config.pretrain.total_steps=10", "--config.pretrain.warmup_steps=2",
            "--config.pretrain.checkpoint_every_steps=10", "--config.pretrain.eval_every_steps=10",
            "--config.pretrain.log_every_steps=1", "--config.pretrain.eval_max_videos=1", "--config.total_steps=6",
            "--config.batch_size=4", "--config.log_every_steps=1", "--config.checkpoint_every_steps=2",
            "--config.eval_max_questions=2", "--config.record_data_order=True"]
PRETRAIN = ["--config=configs/pretrain.py:tiny", "--config.total_steps=100000", "--config.log_every_steps=1",
            "--config.checkpoint_every_steps=100000"]
LOSS = re.compile(r"step (\d+)/(\d+)\s+loss ([0-9.]+)")


def environment(devices: int | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # conftest's 8 devices
    env["JAX_PLATFORMS"] = "cpu"
    if devices:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    return env


def local(n: int, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "launch/local.sh", str(n), *flags], cwd=REPO, env=environment(), capture_output=True,
                          text=True, timeout=900)


def single(devices: int, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cope_jax.main", *flags], cwd=REPO, env=environment(devices),
                          capture_output=True, text=True, timeout=900)


def losses(output: str) -> dict:
    """{(total steps, step): loss as printed} of process 0 (stage 1 and stage 2 lines)."""
    return {(int(total), int(step)): loss for step, total, loss in LOSS.findall(output)}


def data_order(workdir: str, name: str = "data_order.jsonl") -> dict:
    with open(os.path.join(workdir, name)) as f:
        return {row["step"]: row["examples"] for row in map(json.loads, f)}


def test_two_processes_train_as_one_process_with_two_devices_and_resume_in_one(tmp_path):
    two, one = str(tmp_path / "two"), str(tmp_path / "one")
    run_two = local(2, *FINETUNE, f"--workdir={two}")
    assert run_two.returncode == 0, run_two.stdout[-3000:] + run_two.stderr[-3000:]
    run_one = single(2, *FINETUNE, f"--workdir={one}")
    assert run_one.returncode == 0, run_one.stderr[-3000:]
    curve = losses(run_one.stdout)
    assert len(curve) == 16  # 10 steps of stage 1, 6 of stage 2, each logged
    assert losses(run_two.stdout) == curve  # every logged loss, to the printed 5 decimals
    assert "[1] step" not in run_two.stdout  # only process 0 logs
    # Each process read its own half of every global batch; together, the batch one process read.
    whole, first, second = data_order(one), data_order(two), data_order(two, "data_order.process1.jsonl")
    assert sorted(whole) == sorted(first) == sorted(second) == list(range(6))
    for step in whole:
        assert first[step] + second[step] == whole[step] and not set(first[step]) & set(second[step])
    # Shared files written once, by process 0: the same as one process writes.
    assert json.load(open(os.path.join(two, "demo_accuracy.json"))) == json.load(open(os.path.join(one, "demo_accuracy.json")))
    assert sorted(os.listdir(os.path.join(two, "model"))) == sorted(os.listdir(os.path.join(one, "model")))
    assert len(os.listdir(os.path.join(two, "tensorboard"))) == 1

    # The 2-process checkpoint resumes in one process, at the same data as a 1-process checkpoint.
    longer = ["--config.total_steps=8"]
    resumed_two = single(2, *FINETUNE, *longer, f"--workdir={two}")
    resumed_one = single(2, *FINETUNE, *longer, f"--workdir={one}")
    for run in (resumed_two, resumed_one):
        assert run.returncode == 0, run.stderr[-3000:]
        assert "resumed from step 6" in run.stdout
    assert "the data continues at global batch 6 (the checkpoint was written by 2 processes)" in resumed_two.stdout
    assert {k: v for k, v in losses(resumed_two.stdout).items() if k[0] == 8} == \
        {k: v for k, v in losses(resumed_one.stdout).items() if k[0] == 8} != {}
    assert {s: e for s, e in data_order(two).items() if s >= 6} == {s: e for s, e in data_order(one).items() if s >= 6}


def start(process_id: int, workdir: str, *flags: str, port: int) -> subprocess.Popen:
    """One process of a 2-process stage-1 run; its stderr goes to <workdir>.stderr<id> (a pipe
    nobody reads could fill and block it). Heartbeats may pause 30 s: with the cores busy (a
    compile beside the suite), 10 s once declared both healthy processes dead during start-up."""
    stderr = open(f"{workdir}.stderr{process_id}", "w")
    return subprocess.Popen([sys.executable, "-m", "cope_jax.main", *PRETRAIN, f"--workdir={workdir}",
                             f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={process_id}",
                             "--heartbeat_timeout=30", "--watchdog=60", "--init_timeout=60", *flags],
                            cwd=REPO, env=environment(1), stdout=subprocess.PIPE, stderr=stderr, text=True)


def stderr_of(workdir: str, process_id: int) -> str:
    with open(f"{workdir}.stderr{process_id}") as f:
        return f.read()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_killed_peer_stops_the_other_with_one_line(tmp_path):
    port, workdir = free_port(), str(tmp_path / "work")
    first, second = start(0, workdir, port=port), start(1, workdir, port=port)
    try:
        for line in first.stdout:  # train until process 0 has logged a few steps
            if re.search(r"step 5/", line):
                break
        else:
            pytest.fail("process 0 never reached step 5: " + stderr_of(workdir, 0)[-3000:])
        second.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        first.communicate(timeout=120)
        stderr = stderr_of(workdir, 0)
        assert first.returncode != 0
        assert time.monotonic() - killed < 60
        assert re.search(r"error: process 0/2: (the collectives failed|no progress)", stderr), stderr[-3000:]
    finally:
        for process in (first, second):
            process.kill()
            process.wait()


def test_processes_that_disagree_or_never_arrive_say_so(tmp_path):
    port, workdir = free_port(), str(tmp_path / "work")
    # Both arrive, so a generous limit costs nothing: with the cores and memory busy (two TPU compiles
    # beside the suite) process 0 once took over 60 s from joining to reporting its command.
    patient = "--init_timeout=300"
    first = start(0, workdir, patient, port=port)
    second = start(1, workdir, patient, "--config.batch_size=16", port=port)
    try:
        for process in (first, second):
            process.communicate(timeout=420)
    finally:
        for process in (first, second):
            process.kill()
    assert first.returncode == second.returncode == 1
    for stderr in (stderr_of(workdir, 0), stderr_of(workdir, 1)):
        assert "processes disagree on their command: config.batch_size is 8 on process 0 but 16 on process 1" in stderr
    alone_dir = str(tmp_path / "alone")
    alone = start(0, alone_dir, "--init_timeout=3", port=free_port())
    alone.communicate(timeout=120)
    stderr = stderr_of(alone_dir, 0)
    assert alone.returncode == 1
    assert "error: process 0/2 could not join the run at 127.0.0.1:" in stderr and "within 3s" in stderr


def test_sigterm_saves_every_process_at_one_step(tmp_path):
    workdir = str(tmp_path / "work")
    run = subprocess.Popen(["bash", "launch/local.sh", "2", *PRETRAIN, f"--workdir={workdir}"], cwd=REPO,
                           env=environment(), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        lines = []
        for line in run.stdout:
            lines.append(line)
            if "[0] step 5/" in line:
                run.send_signal(signal.SIGTERM)  # the script forwards it to both processes
                break
        lines += run.stdout.readlines()
        run.wait(timeout=120)
    finally:
        run.kill()
    output = "".join(lines)
    saved = re.findall(r"SIGTERM: saving step (\d+) and stopping", output)
    assert run.returncode == 0, output[-3000:]
    assert len(saved) == 1 and os.listdir(os.path.join(workdir, "checkpoints")) == [saved[0]]
