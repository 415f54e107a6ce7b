"""Train or evaluate CoPE-VideoLM: `python -m cope_jax.main --config=configs/<stage>.py[:variant] --workdir DIR`.

Two stages, one config file each, both with the variants `tiny` (a 2-core CPU, minutes, built-in
demo clips) and `paper` (the paper's sizes and settings):

    configs/pretrain.py   stage 1: align the Δ-encoder with the frozen SigLIP tower
    configs/finetune.py   stage 2: instruction-tune the whole VideoLM (`tiny` runs stage 1 first)

    python -m cope_jax.main --config=configs/finetune.py:tiny --workdir /tmp/cope-tiny
    python -m cope_jax.main --config=configs/pretrain.py:tiny --workdir /tmp/pretrain --config.total_steps=600
    python -m cope_jax.main --config=configs/pretrain.py:tiny --workdir /tmp/pretrain --mode=eval
    python -m cope_jax.main --config=configs/finetune.py:paper --mode=print_config --config.batch_size=64

--mode=train (default) trains and evaluates; --mode=eval only evaluates the latest checkpoint in
--workdir (and refuses when there is none); --mode=print_config prints every field of the resolved
config, overrides applied, and needs no --workdir. --mode=compile --target=NAME compiles the train
step for an accelerator that is not here (TPU v4/v5p/v5e/v6e, H100/H200) with its own compiler and
reports memory per device, whether it fits, the attention kernels and the FLOPs; exit 1 when it does
not fit. It needs the compile environment (`make compile-env`):

    .venv-compile/bin/python -m cope_jax.main --config=configs/finetune.py:paper --mode=compile --target=h100-8

Any config field can be overridden after --config: --config.<field>=<value>, nested fields with
dots (--config.mesh.data=2, --config.pretrain.total_steps=100), tuples as --config.x='(1, 2)'.
Every mistyped field or bad value is reported at once, before anything runs.

Rerunning with the same --workdir resumes from its latest committed checkpoint; SIGTERM saves and
stops cleanly. The console shows progress and metrics (pass --verbosity=0 for library INFO logs).
Several processes (hosts, or several on one machine) form one run through jax.distributed
(launch/README.md): `bash launch/local.sh 2 --config=... --workdir DIR` here;
--coordinator_address/--num_processes/--process_id by hand; --distributed under SLURM's srun or on
a TPU VM pod. Processes that disagree (config, devices, data) stop with one line naming the
difference; a dead peer or a hung collective stops the others (--heartbeat_timeout, --watchdog).
"""

from __future__ import annotations

import copy
import difflib
import importlib.util
import os
import re
import sys
import traceback

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_dict, config_flags

from cope_jax import accelerators, distributed
from cope_jax.errors import ConfigError, UserError

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "config file and variant: configs/pretrain.py:tiny|paper or configs/finetune.py:tiny|paper",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "directory for checkpoints/, tensorboard/ and demo data (resumes if present)")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "eval", "print_config", "compile"],
                          "train (and evaluate); eval: only evaluate the latest checkpoint; print_config: print the "
                          "resolved config and exit; compile: compile the train step for --target and report whether "
                          "it fits (no workdir, nothing written)")
_TARGET = flags.DEFINE_string("target", None, "--mode=compile: the accelerator to compile for, as Cloud TPU names it "
                              "(v5p-16, v4-8: TensorCores; v5litepod-4, v6e-64: chips) or h100-N / h200-N (GPUs, 8 "
                              "per host); needs the compile environment (make compile-env)")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False, "join a multi-process run whose processes are described by the "
                                  "environment: SLURM (srun) or a TPU VM pod (see launch/README.md)")
_COORDINATOR = flags.DEFINE_string("coordinator_address", "", "HOST:PORT of process 0, reachable from every process "
                                   "(with --num_processes and --process_id)")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "how many processes form the run")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "this process's number, 0..num_processes-1")
_LOCAL_DEVICES = flags.DEFINE_string("local_device_ids", "", "the local accelerators this process uses: 'all' or "
                                     "numbers like 0,1 (default: all; under SLURM with several tasks per node, the "
                                     "one numbered SLURM_LOCALID)")
_INIT_TIMEOUT = flags.DEFINE_integer("init_timeout", 300, "seconds processes wait for each other at the start")
_HEARTBEAT_TIMEOUT = flags.DEFINE_integer("heartbeat_timeout", 100, "seconds of silence after which a process is "
                                          "declared dead and the others stop")
_WATCHDOG = flags.DEFINE_integer("watchdog", 1800, "multi-process runs stop when no training step finishes for this "
                                 "many seconds after the first (a hung collective); 0: off")

USAGE_EXIT_CODE = 2  # a bad command line or config: nothing ran
_OVERRIDE = re.compile(r"^--?(no)?config\.([^=]*)(?:=(.*))?$", re.DOTALL)
_CONFIG_ARG = re.compile(r"^--?config(?:=(.*))?$", re.DOTALL)


def run(config, workdir: str, mode: str = "train") -> dict:
    """Trains (or with mode "eval" evaluates) the config's stage with the evaluators it names; stage 2
    with config.run_pretrain runs stage 1 first."""
    from cope_jax import evaluation  # here, not above: --help and a bad command line answer without importing JAX
    from cope_jax.training import finetune, pretrain  # (same reason)

    stages = {"pretrain": pretrain, "finetune": finetune}
    if config.stage not in stages:
        raise ConfigError(f"config.stage {config.stage!r} is not one of {sorted(stages)}")
    stage, evaluators = stages[config.stage], evaluation.for_config(config)
    if mode != "train":
        return stage.evaluate_only(config, workdir, evaluators)
    if stage is finetune:
        return finetune.train(config, workdir, evaluators, evaluation.for_config(config.pretrain))
    return pretrain.train(config, workdir, evaluators)


# Command-line checks. config_flags loads the config and applies overrides while absl parses flags,
# stopping at the first problem with a traceback; these checks run first and report all of them.


def command_line_problems(argv: list[str]) -> list[str]:
    """Every problem with --config and its --config.<field> overrides in `argv`, one message each."""
    try:
        args = flags.FLAGS.read_flags_from_files(argv[1:], force_gnu=False)
    except flags.Error:
        return []  # absl reports a bad --flagfile itself
    if "--" in args:
        args = args[: args.index("--")]
    spec, spec_index, overrides = None, -1, []
    for i, arg in enumerate(args):
        if match := _CONFIG_ARG.match(arg):
            spec, spec_index = match.group(1) if match.group(1) is not None else _next(args, i), i
        elif match := _OVERRIDE.match(arg):
            overrides.append((i, arg, match.group(2), match.group(3)))
    if spec is None:
        return [f"{arg.split('=')[0]} needs --config=configs/<stage>.py[:variant] before it" for _, arg, _, _ in overrides[:1]]
    config, problem = load_config(spec)
    if problem:
        return [problem]
    problems = []
    for i, arg, path, value in overrides:
        name = arg.split("=", 1)[0]
        if i < spec_index:
            problems.append(f"{name} comes before --config; put overrides after it")
            continue
        problem = _field_problem(config, spec, name, path)
        if problem is None:
            given = [arg] if value is not None or _is_boolean(config, path) else [arg, *args[i + 1 : i + 2]]
            problem = _value_problem(config, spec, name, path, given)
        if problem:
            problems.append(problem)
    return problems


def load_config(spec: str):
    """(config, None) from `path[:variant]`, or (None, a one-line message) when it cannot load."""
    path, _, variant = spec.partition(":")
    if not path:
        return None, "--config: empty; give a config file, e.g. --config=configs/pretrain.py:tiny"
    if not os.path.isfile(path):
        return None, f"--config: no config file {path}{_file_hint(path)}"
    try:
        module_spec = importlib.util.spec_from_file_location("_cope_cli_config", path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
        if not callable(getattr(module, "get_config", None)):
            return None, f"--config: {path} defines no get_config()"
        config = module.get_config(*([variant] if ":" in spec else []))
    except Exception as e:  # the config file's own error (unknown variant, a typo in it): one line
        message = _one_line(str(e))
        if message.startswith(path + ":"):
            message = message[len(path) + 1 :].strip()
        if not isinstance(e, ValueError) or not message:
            lines = [frame.lineno for frame in traceback.extract_tb(e.__traceback__)
                     if os.path.abspath(frame.filename) == os.path.abspath(path)]
            where = f" ({path} line {lines[-1]})" if lines else ""
            message = f"{type(e).__name__}: {message}{where}"
        return None, f"--config={spec}: {message}"
    if not isinstance(config, config_dict.ConfigDict):
        return None, f"--config={spec}: get_config() returned {type(config).__name__}, not a ConfigDict"
    return config, None


def _file_hint(path: str) -> str:
    folder = os.path.dirname(path) or "."
    if not os.path.isdir(folder):
        return ""
    names = sorted(n for n in os.listdir(folder) if n.endswith(".py") and _is_config_file(os.path.join(folder, n)))
    close = difflib.get_close_matches(os.path.basename(path), names, n=1)
    if close:
        return f" (did you mean {os.path.join(os.path.dirname(path), close[0])}?)"
    return f" ({folder}/ holds {', '.join(names)})" if names else ""


def _is_config_file(path: str) -> bool:
    """A config file defines get_config (configs/common.py only holds the fields both stages share)."""
    with open(path) as f:
        return "\ndef get_config(" in f.read()


def _field_problem(config, source: str, name: str, path: str) -> str | None:
    """Why `path` ("a.b.c") names no field of `config`, with the closest field; None if it does."""
    node, walked = config, []
    for key in path.split("."):
        if "[" in key:
            return None  # indexing (a[0]): config_flags checks it
        if not isinstance(node, config_dict.ConfigDict):
            return f"{name}: {'.'.join(walked)} is {_a(type(node).__name__)}, not a group of fields"
        keys = sorted(node.keys())
        if key not in keys:
            close = difflib.get_close_matches(key, keys, n=1)
            if close:
                hint = f"did you mean {'.'.join([*walked, close[0]])}?"
            elif walked and len(keys) <= 12:
                hint = f"{'.'.join(walked)} has {', '.join(keys)}"
            else:
                hint = "--mode=print_config lists every field"
            return f"{name}: no such field in {source} ({hint})"
        node, walked = node[key], [*walked, key]
    return None


def _value_problem(config, source: str, name: str, path: str, given: list[str]) -> str | None:
    """Parses the override alone on a copy of the config, exactly as config_flags will."""
    values = flags.FlagValues()
    argv = ["main", *given]
    try:
        config_flags.DEFINE_config_dict("config", copy.deepcopy(config), flag_values=values, sys_argv=argv)
        values(argv, known_only=True)
    except flags.Error as e:
        current = _get(config, path)
        raw = given[0].split("=", 1)[1] if "=" in given[0] else " ".join(given[1:])
        if isinstance(current, config_dict.ConfigDict):
            fields = sorted(current.keys())
            return f"{name}: a group of fields ({', '.join(fields)}); set one at a time, e.g. {name}.{fields[0]}=..."
        if type(current) in (int, float, bool):
            expected = "a bool (true or false)" if isinstance(current, bool) else _a(type(current).__name__)
            return f"{name}: expected {expected}, got {raw!r}" if raw else f"{name}: missing value ({expected})"
        if isinstance(current, (list, dict)):  # config_flags overrides scalars, tuples and groups only
            kind = type(current).__name__
            return f"{name}: {_a(kind)} field cannot be set from the command line; change it in {source.partition(':')[0]}"
        reason = re.sub(r"^flag \S+: ", "", _one_line(str(e)))
        return f"{name}: {reason}"
    return None


def _is_boolean(config, path: str) -> bool:
    # config_flags reads `--config.x` alone as True for bool and None fields, else takes the next argument.
    try:
        value = _get(config, path)
    except (KeyError, AttributeError, TypeError):
        return True
    return value is None or isinstance(value, bool)


def _get(config, path: str):
    for key in path.split("."):
        config = config[key]
    return config


def _next(args: list[str], i: int) -> str | None:
    return args[i + 1] if i + 1 < len(args) else None


def _a(noun: str) -> str:
    return f"an {noun}" if noun[:1] in "aeiou" else f"a {noun}"


def _one_line(text: str) -> str:
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


def _usage_error(*messages: str) -> None:
    for message in messages:
        print(f"error: {message}", file=sys.stderr)
    sys.exit(USAGE_EXIT_CODE)


def parse_flags(argv: list[str]) -> list[str]:
    """app.run's flag parser: the config checks above, then absl's parse, each error one line."""
    problems = command_line_problems(argv)
    if problems:
        _usage_error(*problems)
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        _usage_error(f"{_one_line(str(e))} (see --help)")


def format_config(config, source: str, overridden=()) -> str:
    """Every field as `dotted.path: value`, sorted: what --config.dotted.path=... would change."""
    lines = [f"# {source}" + (f", overridden: {', '.join(sorted(overridden))}" if overridden else "")]

    def walk(node, prefix: str) -> None:
        for key in sorted(node.keys()):
            value = node[key]
            if isinstance(value, config_dict.ConfigDict) and len(value):
                walk(value, f"{prefix}{key}.")
            else:
                shown = value.to_dict() if isinstance(value, config_dict.ConfigDict) else value
                lines.append(f"{prefix}{key}: {shown!r}")

    walk(config, "")
    return "\n".join(lines)


def _quiet_library_logs() -> None:
    # orbax and jax log through absl/python logging at INFO (a dozen lines a checkpoint); the
    # console is for our own progress lines. An explicit --verbosity / -v keeps its choice.
    if not flags.FLAGS["verbosity"].present:
        absl_logging.set_verbosity(absl_logging.WARNING)


def main(argv) -> None:
    if len(argv) > 1:
        hint = " (the config goes in --config=...)" if any(".py" in a for a in argv[1:]) else ""
        _usage_error(f"unexpected arguments {' '.join(argv[1:])}{hint}")
    if _CONFIG.value is None:
        _usage_error("--config is required, e.g. --config=configs/pretrain.py:tiny (see --help)")
    if _MODE.value == "print_config":
        overridden = config_flags.get_override_values(flags.FLAGS["config"])
        print(format_config(_CONFIG.value, config_flags.get_config_filename(flags.FLAGS["config"]), overridden))
        return
    if _MODE.value == "compile":
        sys.exit(compile_for_target(_CONFIG.value, _TARGET.value))
    if _TARGET.value:
        _usage_error("--target only applies to --mode=compile")
    if not _WORKDIR.value:
        _usage_error(f"--workdir is required for --mode={_MODE.value} (see --help)")
    _quiet_library_logs()
    try:
        launch = distributed.resolve(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value, _LOCAL_DEVICES.value,
                                     detect=_DISTRIBUTED.value)
    except UserError as e:
        _usage_error(str(e))
    workdir = os.path.abspath(_WORKDIR.value)
    if launch is None:
        try:
            run(_CONFIG.value, workdir, _MODE.value)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(1)
        return
    sys.exit(run_distributed(launch, workdir))


def compile_for_target(config, target: str | None) -> int:
    """--mode=compile: 0 when every program fits the target, 1 (one line) when one does not."""
    if not target:
        _usage_error(f"--mode=compile needs --target, one of: {accelerators.FORMS}")
    try:
        accelerators.parse(target)
    except accelerators.TargetError as e:
        _usage_error(str(e))
    accelerators.compile_environment()  # before anything starts a JAX backend
    _quiet_library_logs()
    from cope_jax import compile as compile_mode  # here: it imports JAX's backends, which compile_environment() sets up

    try:
        return compile_mode.run(config, target)
    except (UserError, accelerators.TargetError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


def run_distributed(launch, workdir: str) -> int:
    """One process of a multi-process run. Every failure ends the process at once (distributed.exit_now)."""
    import jax  # here, as in run(): --help must not import JAX

    who = "this process"
    try:
        distributed.initialize(launch, _INIT_TIMEOUT.value, _HEARTBEAT_TIMEOUT.value)
        who = f"process {jax.process_index()}/{jax.process_count()}"
        if jax.process_index() == 0:
            print(f"{jax.process_count()} processes, {jax.device_count()} devices ({jax.local_device_count()} here); "
                  f"{launch.describe()}", flush=True)
        distributed.agree("command", {"config": _CONFIG.value.to_dict(), "mode": _MODE.value, "workdir": workdir,
                                      "local_devices": jax.local_device_count(), "platform": jax.default_backend(),
                                      "jax": jax.__version__}, timeout_s=_INIT_TIMEOUT.value)
        distributed.start_watchdog(_WATCHDOG.value, who)
        run(_CONFIG.value, workdir, _MODE.value)
    except UserError as e:
        distributed.exit_now(f"error: {who}: {e}")
    except Exception as e:  # noqa: BLE001
        if distributed.is_peer_failure(e):
            distributed.exit_now(f"error: {who}: the collectives failed, most likely because another process died or "
                                 f"stopped (see its log): {distributed.first_line(e)}")
        traceback.print_exc()
        distributed.exit_now(f"error: {who}: {type(e).__name__}: {distributed.first_line(e)}")
    jax.distributed.shutdown()
    return 0

if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
