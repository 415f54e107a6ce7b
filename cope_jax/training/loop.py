"""The one training loop both stages run (docs/architecture.md §5).

A stage (`pretrain.Stage`, `finetune.Stage`) is built from a config and supplies only what is its
own: the trainable parameters, the optimizer, the grain loader, a jitted step and what to do when
the run ends (stage 2 exports a CoPE checkpoint). The loop owns resuming (parameters and optimizer
state from the checkpoint; the data from global batch = step), checkpoints, SIGTERM, logged window
means, TensorBoard, throughput, and running the evaluators it is given (`cope_jax.evaluation`:
`evaluator(stage, params) -> {name: scalar}`) every config.eval_every_steps and at the end.
"""

from __future__ import annotations

import json
import os
import signal
from typing import Any, Protocol

import jax
import numpy as np
from jax.experimental import multihost_utils

from cope_jax import checkpoints, distributed
from cope_jax.errors import ConfigError
from cope_jax.training import metrics, optimization
from data_pipeline import loaders


def log(message: str) -> None:
    if jax.process_index() == 0:
        print(message, flush=True)


class Stage(Protocol):
    config: Any
    workdir: str
    mesh: jax.sharding.Mesh
    params: Any  # the trainable parameters: what the optimizer updates and checkpoints hold
    tx: Any
    schedule: Any
    loader: Any  # grain DataLoader over a loaders.GlobalBatchSampler (resumes at batch = step)
    source: Any  # the loader's data source (its length is compared across processes)

    def describe(self) -> str: ...  # the run's opening log line

    def step(self, params, opt_state, local_batch: dict) -> tuple[Any, Any, dict]: ...

    def format_metrics(self, values: dict) -> str: ...  # the stage's part of a log line

    def data_order(self, local_batch: dict) -> list: ...  # what config.record_data_order logs per step

    def finish(self, params, step: int) -> None: ...  # after the last step, before the final evaluation


def run_evaluators(stage: Stage, params, evaluators: dict) -> dict:
    """{evaluator name: its result} for `params`."""
    return {name: evaluate(stage, params) for name, evaluate in evaluators.items()}


def _scalars(results: dict) -> dict:
    """The evaluators' scalars as TensorBoard tags eval/<scalar>."""
    return {f"eval/{k}": v for result in results.values() for k, v in result.items() if isinstance(v, (int, float))}


def train(stage: Stage, evaluators: dict | None = None) -> dict:
    """Runs (or resumes) `stage` to config.total_steps -> {"step", "loss_history", "params", and each
    evaluator's final result under its name}. `evaluators`: {name: evaluator(stage, params)}."""
    evaluators = evaluators or {}
    config, workdir = stage.config, stage.workdir
    log(stage.describe())
    distributed.new_phase()
    # Processes that see other data (another data_dir content, a stale copy) would train on
    # mismatched batches without any error: compare what each one read.
    distributed.agree("data", {"examples": len(stage.source)})
    opt_state = optimization.init_optimizer_state(stage.tx, stage.params, stage.mesh)
    ckpt = checkpoints.Checkpoints.of(config, workdir)
    step = 0
    if (latest := ckpt.latest_step()) is not None:
        stage.params, opt_state = ckpt.restore(latest, stage.params, opt_state)
        step = latest
        writers = ckpt.written_by(latest)
        log(f"resumed from step {latest} ({ckpt.directory}); the data continues at global batch {latest}"
            + (f" (the checkpoint was written by {writers} processes)" if writers not in (None, jax.process_count()) else ""))
    # The data position is a function of the step (loaders.GlobalBatchSampler), whatever the number
    # of processes or grain workers that wrote the checkpoint: batch `step` comes next.
    loaders.start_at_batch(stage.loader, step)
    iterator = iter(stage.loader)
    writer = metrics.MetricWriter(os.path.join(workdir, "tensorboard"), enabled=jax.process_index() == 0)
    order_log = open(data_order_path(workdir), "a") if config.get("record_data_order") else None
    stop = StopRequest()
    meter, history, window = None, [], []
    try:
        while step < config.total_steps:
            local = next(iterator)
            if order_log:
                order_log.write(json.dumps({"step": step, "examples": stage.data_order(local)}) + "\n")
                order_log.flush()
            with jax.set_mesh(stage.mesh):  # kernels that run per shard (splash attention) find the mesh here
                stage.params, opt_state, step_metrics = stage.step(stage.params, opt_state, local)
            window.append(step_metrics)  # device arrays: no host sync until the log line
            step += 1
            distributed.progress(f"step {step}")
            if meter is None:  # throughput and ETA start after the first step, which compiles
                jax.block_until_ready(step_metrics)
                meter = metrics.Throughput(step, config.total_steps, config.batch_size)
            if step % config.log_every_steps == 0 or step == config.total_steps:
                history.append((step, _log_window(stage, writer, step, window, meter)))
                window = []
            ckpt.save(step, stage.params, opt_state)
            if config.eval_every_steps and step % config.eval_every_steps == 0 and step < config.total_steps:
                writer.write(step, _scalars(run_evaluators(stage, stage.params, evaluators)))
            if stop.stop_at(step):
                log(f"SIGTERM: saving step {step} and stopping")
                ckpt.save(step, stage.params, opt_state, force=True)
                break
        else:
            ckpt.save(step, stage.params, opt_state, force=True)
        ckpt.close()
    finally:
        stop.restore()
        if order_log:
            order_log.close()
    result = {"step": step, "loss_history": history, "params": stage.params}
    if step >= config.total_steps:
        distributed.new_phase()
        stage.finish(stage.params, step)
        final = run_evaluators(stage, stage.params, evaluators)
        writer.write(step, _scalars(final))
        _write_results(workdir, final)
        result.update(final)
        if history:
            log(f"loss {history[0][1]:.5f} at step {history[0][0]} -> {history[-1][1]:.5f} at step {history[-1][0]}")
    writer.close()
    return result


def _write_results(workdir: str, results: dict) -> None:
    """<workdir>/<evaluator>.json: each evaluator's final result (process 0)."""
    if jax.process_index() != 0:
        return
    for name, values in results.items():
        if values:
            with open(os.path.join(workdir, f"{name}.json"), "w") as f:
                json.dump(values, f, indent=1)


def data_order_path(workdir: str) -> str:
    """Each process logs the examples of its own slice of every batch (process 0: data_order.jsonl)."""
    index = jax.process_index()
    return os.path.join(workdir, "data_order.jsonl" if index == 0 else f"data_order.process{index}.jsonl")


def _log_window(stage: Stage, writer: metrics.MetricWriter, step: int, window: list[dict], meter) -> float:
    """Window means of the step metrics -> TensorBoard and one console line; returns the loss."""
    values = {k: float(np.mean([float(m[k]) for m in window])) for k in window[0]}
    values["learning_rate"] = float(stage.schedule(step))
    values.update(meter.update(step))
    writer.write(step, {f"train/{k}": v for k, v in values.items()})
    speed = (f"  {values['steps_per_second']:.2f} steps/s  {values['examples_per_second']:.1f} examples/s  "
             f"ETA {metrics.format_eta(values['eta_seconds'])}") if "steps_per_second" in values else ""
    log(f"step {step}/{stage.config.total_steps}  {stage.format_metrics(values)}  lr {values['learning_rate']:.2e}  "
        f"grad_norm {values['grad_norm']:.3f}{speed}")
    return values["loss"]


def require_checkpoint(config, workdir: str) -> None:
    """--mode=eval: refuses before anything is built or written when the workdir has no checkpoint."""
    directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    latest = None
    if os.path.isdir(directory):
        ckpt = checkpoints.Checkpoints.of(config, workdir)
        latest = ckpt.latest_step()
        ckpt.close()
    if latest is None:
        raise ConfigError(f"{directory}: no checkpoint to evaluate (train first, or point --workdir at a trained run)")


def evaluate_latest(stage: Stage, evaluators: dict) -> dict:
    """--mode=eval: the evaluators on the workdir's latest committed parameters."""
    restore_latest(stage)
    return run_evaluators(stage, stage.params, evaluators)


def restore_latest(stage: Stage) -> int:
    """The latest committed parameters of the workdir into `stage.params` (for --mode=eval);
    refuses when there is none rather than evaluating freshly initialised weights."""
    ckpt = checkpoints.Checkpoints.of(stage.config, stage.workdir)
    latest = ckpt.latest_step()
    if latest is None:
        ckpt.close()
        raise ConfigError(f"{ckpt.directory}: no checkpoint to evaluate (train first, or point --workdir at a trained run)")
    stage.params = ckpt.restore_params(latest, stage.params)
    ckpt.close()
    log(f"evaluating step {latest} ({ckpt.directory})")
    return latest


class StopRequest:
    """SIGTERM (preemption, scancel) -> finish the step, save, exit cleanly.

    Several processes get their SIGTERMs at different steps, and a process that stops alone leaves
    the others waiting in a collective. There jax.distributed's preemption service takes the
    signal and names one step at which every process stops together."""

    def __init__(self):
        self.requested = False
        self.multi_process = jax.process_count() > 1
        if not self.multi_process:  # a Python handler would replace the preemption service's
            self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        self.requested = True

    def stop_at(self, step: int) -> bool:
        """Whether to save and stop after `step` (call after every step, on every process)."""
        if self.multi_process:
            self.requested = multihost_utils.reached_preemption_sync_point(step)
        return self.requested

    def restore(self):
        if not self.multi_process:
            signal.signal(signal.SIGTERM, self._previous)
