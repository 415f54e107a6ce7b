"""One process of a multi-process run: joining it, agreeing with the others, and never hanging.

`jax.distributed` does the work (docs/architecture.md §10); this module decides its arguments and turns its
failures into one line. Three ways to say who is who:

- flags: `--coordinator_address --num_processes --process_id` (what `launch/local.sh` passes);
- SLURM (`--distributed` inside `srun`): read from SLURM's variables here, because JAX's own SLURM
  detection gives every process only the GPU numbered SLURM_LOCALID, which is wrong when one
  process per node should drive all of its GPUs. One task on a node: all of its devices; several:
  device SLURM_LOCALID. `--local_device_ids` overrides either;
- anything else with `--distributed` (a TPU VM pod): JAX's own detection.

On CPU the processes talk through gloo. After joining, `agree()` compares what every process
believes (config, device counts, data) and names the first difference; a `Watchdog` ends a run
whose steps stop advancing (a hung collective) instead of letting it hang until the job's
time limit.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
import threading
import time
from collections.abc import Mapping

from cope_jax.errors import UserError

WATCHDOG_EXIT_CODE = 3
_LOOPBACK = re.compile(r"^(localhost|127\.\d+\.\d+\.\d+|\[?::1\]?)$")


@dataclasses.dataclass(frozen=True)
class Launch:
    """Who this process is. None fields are left to JAX's detection (source "auto")."""

    coordinator_address: str | None
    num_processes: int | None
    process_id: int | None
    local_device_ids: tuple[int, ...] | None  # None: every device this process can see
    source: str  # "flags", "SLURM" or "auto"

    def describe(self) -> str:
        if self.source == "auto":
            return "process identity detected by JAX (TPU VM or another cluster JAX knows)"
        devices = "all local devices" if self.local_device_ids is None else f"local devices {list(self.local_device_ids)}"
        return (f"process {self.process_id} of {self.num_processes} (from {self.source}), coordinator "
                f"{self.coordinator_address}, {devices}")


# ---------------------------------------------------------------------------- who is who


def parse_device_ids(text: str) -> tuple[int, ...] | None:
    """`--local_device_ids`: "" or "all" -> None (every device), "0,1" -> (0, 1)."""
    if text in ("", "all"):
        return None
    try:
        ids = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise UserError(f"--local_device_ids={text!r}: expected 'all' or device numbers like 0,1") from None
    if any(i < 0 for i in ids) or len(set(ids)) != len(ids):
        raise UserError(f"--local_device_ids={text!r}: device numbers must be distinct and >= 0")
    return ids


def resolve(coordinator_address: str = "", num_processes: int | None = None, process_id: int | None = None,
            local_device_ids: str = "", detect: bool = False, environ: Mapping[str, str] = os.environ) -> Launch | None:
    """The flags (and, with `detect`, the environment) -> this process's Launch, or None for a
    single-process run."""
    given = {"--coordinator_address": coordinator_address or None, "--num_processes": num_processes,
             "--process_id": process_id}
    devices = parse_device_ids(local_device_ids)
    if any(v is not None for v in given.values()):
        missing = [name for name, value in given.items() if value is None]
        if missing:
            raise UserError(f"{', '.join(missing)} missing: a multi-process run needs --coordinator_address, "
                            "--num_processes and --process_id together (or --distributed under SLURM / on a TPU pod)")
        _check_identity(coordinator_address, num_processes, process_id)
        nodes = int(environ.get("SLURM_JOB_NUM_NODES") or environ.get("SLURM_NNODES") or 1)
        if nodes > 1 and _LOOPBACK.match(coordinator_address.rpartition(":")[0]):
            raise UserError(f"--coordinator_address={coordinator_address}: a loopback address cannot reach the other "
                            f"{nodes - 1} node(s) of this SLURM job; give process 0's hostname")
        return Launch(coordinator_address, num_processes, process_id, devices, "flags")
    if not detect:
        return None
    if all(k in environ for k in ("SLURM_JOB_ID", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_STEP_NODELIST")):
        return _from_slurm(environ, devices, chosen=bool(local_device_ids))
    return Launch(None, None, None, devices, "auto")


def _check_identity(address: str, count: int, index: int) -> None:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UserError(f"--coordinator_address={address!r}: expected HOST:PORT, e.g. node001:12345")
    if count < 1:
        raise UserError(f"--num_processes={count}: must be >= 1")
    if not 0 <= index < count:
        raise UserError(f"--process_id={index}: must be in 0..{count - 1} for --num_processes={count}")


def _from_slurm(environ: Mapping[str, str], devices: tuple[int, ...] | None, chosen: bool) -> Launch:
    from jax._src.clusters.slurm_cluster import SlurmCluster  # JAX's parser of SLURM's node lists

    saved = {k: os.environ.get(k) for k in ("SLURM_JOB_ID", "SLURM_STEP_NODELIST")}
    try:  # SlurmCluster reads os.environ; `environ` may be a test's dictionary
        os.environ.update({k: environ[k] for k in saved})
        address = SlurmCluster.get_coordinator_address(None, environ.get("JAX_COORDINATOR_PORT"))
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    count, index = int(environ["SLURM_NTASKS"]), int(environ["SLURM_PROCID"])
    if not chosen and tasks_on_this_node(environ) > 1:
        devices = (int(environ.get("SLURM_LOCALID", "0")),)
    return Launch(address, count, index, devices, "SLURM")


def tasks_on_this_node(environ: Mapping[str, str]) -> int:
    """SLURM_STEP_TASKS_PER_NODE (or SLURM_TASKS_PER_NODE), e.g. "2(x3),1", at SLURM_NODEID."""
    spec = environ.get("SLURM_STEP_TASKS_PER_NODE") or environ.get("SLURM_TASKS_PER_NODE") or "1"
    counts = []
    for part in spec.split(","):
        match = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if not match:
            raise UserError(f"SLURM_TASKS_PER_NODE={spec!r}: not SLURM's N(xM),... form")
        counts += [int(match.group(1))] * int(match.group(2) or 1)
    node = int(environ.get("SLURM_NODEID", "0"))
    return counts[min(node, len(counts) - 1)]


# ---------------------------------------------------------------------------- joining


def initialize(launch: Launch, init_timeout: int = 300, heartbeat_timeout: int = 100) -> None:
    """Joins the run; a coordinator or peer that does not come within `init_timeout` seconds is one
    UserError, not a hang."""
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU collectives across processes
    # At its own timeout JAX aborts the process with a C++ stack trace; this timer says why first.
    timer = threading.Timer(init_timeout, lambda: exit_now(
        "error: " + join_failure(launch, init_timeout, TimeoutError("not every process arrived"))))
    timer.daemon = True
    kwargs = dict(initialization_timeout=init_timeout + 60, heartbeat_timeout_seconds=heartbeat_timeout)
    if launch.source != "auto":  # every argument decided here: JAX must not guess local devices
        kwargs.update(coordinator_address=launch.coordinator_address, num_processes=launch.num_processes,
                      process_id=launch.process_id, cluster_detection_method="deactivate",
                      local_device_ids=None if launch.local_device_ids is None else list(launch.local_device_ids))
    timer.start()
    try:
        jax.distributed.initialize(**kwargs)
    except Exception as e:  # noqa: BLE001 - JAX raises several types; all mean the same to the user
        raise UserError(join_failure(launch, init_timeout, e)) from None
    finally:
        timer.cancel()


def exit_now(line: str, code: int = 1) -> None:
    """Prints `line` and ends the process at once: a normal exit would wait in jax.distributed's
    shutdown barrier for peers that may never come."""
    sys.stdout.flush()
    print(line, file=sys.stderr, flush=True)
    os._exit(code)


def join_failure(launch: Launch, init_timeout: int, error: Exception) -> str:
    who = "this process" if launch.process_id is None else f"process {launch.process_id}/{launch.num_processes}"
    hint = ""
    host = (launch.coordinator_address or "").rpartition(":")[0]
    if _LOOPBACK.match(host):
        hint = f" ({host} only reaches processes on this machine; give a routable address for several machines)"
    return (f"{who} could not join the run at {launch.coordinator_address or 'the detected coordinator'} within "
            f"{init_timeout}s: {first_line(error)}. Are all {launch.num_processes or ''} processes started, with the "
            f"same --coordinator_address and --num_processes?{hint} (--init_timeout waits longer)").replace("  ", " ")


def first_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0][:300]


# ---------------------------------------------------------------------------- agreeing

_rounds: dict[str, int] = {}


def agree(what: str, facts: dict, timeout_s: int = 300) -> None:
    """Every process publishes `facts` (JSON-able) and compares them with every other process's;
    the first difference, or a process that never reports, is one UserError on every process."""
    import jax

    if jax.process_count() == 1:
        return
    from jax._src import distributed as jax_distributed  # the coordination service's key-value store

    client = jax_distributed.global_state.client
    _rounds[what] = _rounds.get(what, 0) + 1
    key = f"cope_jax/agree/{what}/{_rounds[what]}"
    mine = json.loads(json.dumps(facts, sort_keys=True, default=str))
    client.key_value_set(f"{key}/{jax.process_index()}", json.dumps(mine))
    for other in range(jax.process_count()):
        try:
            theirs = json.loads(client.blocking_key_value_get(f"{key}/{other}", timeout_s * 1000))
        except Exception:  # noqa: BLE001
            raise UserError(f"process {other} did not report its {what} within {timeout_s}s "
                            "(it died, or it is stuck before this point; see its log)") from None
        low, high = sorted([(other, theirs), (jax.process_index(), mine)], key=lambda pair: pair[0])
        difference = first_difference(low[1], high[1])
        if difference:
            field, low_value, high_value = difference
            raise UserError(f"processes disagree on their {what}: {field} is {low_value!r} on process {low[0]} but "
                            f"{high_value!r} on process {high[0]} (every process must run the same command on the "
                            "same data)")


def first_difference(a, b, path: str = "") -> tuple[str, object, object] | None:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            found = first_difference(a.get(k), b.get(k), f"{path}.{k}" if path else k)
            if found:
                return found
        return None
    return None if a == b else (path or "value", a, b)


# ---------------------------------------------------------------------------- not hanging


class Watchdog:
    """Ends the process when `progress()` has not been called for `seconds` since it was last
    called (the first call arms it, so compilation before the first step does not count)."""

    def __init__(self, seconds: float, describe_process: str, poll_s: float = 1.0):
        self.seconds, self.who, self.poll_s = seconds, describe_process, poll_s
        self.last: float | None = None
        self.label = ""
        self._thread = threading.Thread(target=self._watch, name="cope-watchdog", daemon=True)
        self._thread.start()

    def progress(self, label: str) -> None:
        self.last, self.label = time.monotonic(), label

    def disarm(self) -> None:
        self.last = None

    def _watch(self) -> None:
        while True:
            time.sleep(self.poll_s)
            if self.last is not None and time.monotonic() - self.last > self.seconds:
                exit_now(f"error: {self.who}: no progress for {self.seconds:.0f}s after {self.label} (a peer died "
                           "or a collective hung); stopping (--watchdog sets the limit)", WATCHDOG_EXIT_CODE)


_watchdog: Watchdog | None = None


def start_watchdog(seconds: float, describe_process: str) -> None:
    global _watchdog
    _watchdog = Watchdog(seconds, describe_process) if seconds > 0 else None


def progress(label: str) -> None:
    """Training (or evaluation) advanced: called after every step."""
    if _watchdog is not None:
        _watchdog.progress(label)


def new_phase() -> None:
    """A phase whose first step compiles (a stage starting, the final evaluation) begins: the
    watchdog waits for its first progress again."""
    if _watchdog is not None:
        _watchdog.disarm()


def wait_for_process_0(what: str) -> None:
    """Multi-process runs: the others wait here until process 0 has written `what` (demo data,
    shared files); only process 0 ever writes them."""
    import jax

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"cope_jax: {what}")


# ---------------------------------------------------------------------------- failing

_PEER_FAILURE = re.compile(r"gloo .*failed|nccl|coordination service|heartbeat|connection (closed|reset) by peer|"
                           r"barrier (timed out|failed)", re.IGNORECASE)


def is_peer_failure(error: BaseException) -> bool:
    """An error that says another process died or the collectives broke (not a bug here)."""
    return bool(_PEER_FAILURE.search(str(error)))
