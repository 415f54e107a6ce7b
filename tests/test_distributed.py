"""Who-is-who resolution, SLURM layouts, disagreement messages and the watchdog (one process).
The multi-process runs over loopback are in test_multiprocess.py."""

import subprocess
import sys
import textwrap

import pytest

from cope_jax import distributed
from cope_jax.errors import UserError

SLURM = {"SLURM_JOB_ID": "4242", "SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_STEP_NODELIST": "gpu[007-010]",
         "SLURM_LOCALID": "1", "SLURM_NODEID": "2"}


def test_explicit_flags_and_their_mistakes():
    launch = distributed.resolve("10.0.0.1:1234", 2, 1, "0,1")
    assert launch == distributed.Launch("10.0.0.1:1234", 2, 1, (0, 1), "flags")
    assert distributed.resolve() is None  # a single-process run
    with pytest.raises(UserError, match="--num_processes, --process_id missing"):
        distributed.resolve("10.0.0.1:1234")
    with pytest.raises(UserError, match="expected HOST:PORT"):
        distributed.resolve("10.0.0.1", 2, 0)
    with pytest.raises(UserError, match="must be in 0..1"):
        distributed.resolve("h:1", 2, 2)
    with pytest.raises(UserError, match="expected 'all' or device numbers"):
        distributed.resolve("h:1", 2, 0, "gpu0")
    assert distributed.resolve("h:1", 2, 0, "all").local_device_ids is None
    with pytest.raises(UserError, match="loopback address cannot reach the other 3 node"):
        distributed.resolve("127.0.0.1:1234", 8, 0, environ={"SLURM_JOB_NUM_NODES": "4"})


def test_slurm_one_task_per_node_sees_every_gpu_several_see_one():
    # JAX's own detection would give this process only GPU SLURM_LOCALID, even alone on its node.
    alone = distributed.resolve(detect=True, environ=SLURM | {"SLURM_STEP_TASKS_PER_NODE": "1(x4)"})
    assert alone == distributed.Launch("gpu007:" + str(4242 % 4096 + 61440), 8, 5, None, "SLURM")
    shared = distributed.resolve(detect=True, environ=SLURM | {"SLURM_STEP_TASKS_PER_NODE": "1,1,2(x2)"})
    assert shared.local_device_ids == (1,)
    chosen = distributed.resolve(local_device_ids="all", detect=True, environ=SLURM | {"SLURM_STEP_TASKS_PER_NODE": "2(x4)"})
    assert chosen.local_device_ids is None  # said explicitly: every task sees every GPU
    explicit = distributed.resolve(local_device_ids="0,1,2,3", detect=True,
                                   environ=SLURM | {"SLURM_STEP_TASKS_PER_NODE": "2(x4)"})
    assert explicit.local_device_ids == (0, 1, 2, 3)
    assert distributed.resolve(detect=True, environ=SLURM | {"JAX_COORDINATOR_PORT": "9999"}).coordinator_address == "gpu007:9999"
    assert distributed.resolve(detect=True, environ={}).source == "auto"  # a TPU pod: JAX detects it


def test_tasks_per_node_forms():
    assert [distributed.tasks_on_this_node({"SLURM_TASKS_PER_NODE": "2(x3),1", "SLURM_NODEID": str(n)})
            for n in range(4)] == [2, 2, 2, 1]
    with pytest.raises(UserError, match="SLURM_TASKS_PER_NODE"):
        distributed.tasks_on_this_node({"SLURM_TASKS_PER_NODE": "two"})


def test_first_difference_names_the_field():
    a = {"config": {"batch_size": 8, "mesh": {"data": 2}}, "local_devices": 1}
    assert distributed.first_difference(a, a) is None
    b = {"config": {"batch_size": 8, "mesh": {"data": 4}}, "local_devices": 1}
    assert distributed.first_difference(a, b) == ("config.mesh.data", 2, 4)
    assert distributed.first_difference(a, {"config": a["config"]}) == ("local_devices", 1, None)


def test_join_failure_hints_at_loopback():
    launch = distributed.Launch("127.0.0.1:5", 2, 1, None, "flags")
    message = distributed.join_failure(launch, 30, RuntimeError("DEADLINE_EXCEEDED: Barrier timed out\nmore"))
    assert "process 1/2 could not join the run at 127.0.0.1:5 within 30s: DEADLINE_EXCEEDED" in message
    assert "only reaches processes on this machine" in message and "more" not in message


def test_watchdog_stops_a_run_whose_steps_stop():
    script = textwrap.dedent("""
        import time
        from cope_jax import distributed
        distributed.start_watchdog(1, "process 0/2")
        time.sleep(3)  # not armed yet: compilation before the first step does not count
        distributed.progress("step 1")
        time.sleep(30)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == distributed.WATCHDOG_EXIT_CODE
    assert "error: process 0/2: no progress for 1s after step 1" in result.stderr


def test_peer_failures_are_recognised():
    assert distributed.is_peer_failure(ValueError("UNKNOWN: Gloo all-reduce failed: Connection closed by peer"))
    assert not distributed.is_peer_failure(ValueError("operands could not be broadcast together"))
