"""Step time of the tiny configs in 1 process x 2 devices vs 2 processes x 1 device (launch/local.sh):
what the cross-process collectives (gloo over loopback) cost here.

    .venv/bin/python bench/bench_processes.py                 # stage 1 and stage 2, ~6 minutes on 2 cores
    .venv/bin/python bench/bench_processes.py --stages pretrain --steps 400

Both layouts run the same config on the same 2 devices (mesh data=2, the same global batch); the
rate is the steps/s of the last logging window, after compilation, as the run logs it.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import machine  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RATE = re.compile(r"step (\d+)/(\d+) .* ([0-9.]+) steps/s")


def stage_flags(stage: str, steps: int) -> list[str]:
    if stage == "pretrain":
        return ["--config=configs/pretrain.py:tiny", f"--config.total_steps={steps}", f"--config.log_every_steps={steps // 2}",
                f"--config.eval_every_steps={steps}", "--config.eval_max_videos=1"]
    # stage 2 alone: a short stage 1 first (not timed), then `steps` of stage 2
    return ["--config=configs/finetune.py:tiny", "--config.pretrain.total_steps=20", "--config.pretrain.warmup_steps=2",
            "--config.pretrain.eval_every_steps=20", f"--config.total_steps={steps}", f"--config.log_every_steps={steps // 2}",
            "--config.eval_max_questions=1", "--config.demo_clips=16", "--config.demo_eval_clips=4"]


def last_rate(output: str, total: int) -> float:
    rates = [float(rate) for step, steps, rate in RATE.findall(output) if int(steps) == total]
    if not rates:
        raise SystemExit("no steps/s line in the run's output:\n" + output[-3000:])
    return rates[-1]


def run(command: list[str], env: dict) -> str:
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stdout[-2000:]}{result.stderr[-2000:]}")
    return result.stdout


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--stages", default="pretrain,finetune")
    p.add_argument("--steps", type=int, default=300, help="steps per run; the rate is the second half's")
    args = p.parse_args(argv)
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    rows = []
    with tempfile.TemporaryDirectory() as work:
        for stage in args.stages.split(","):
            flags = stage_flags(stage, args.steps)
            one = run([sys.executable, "-m", "cope_jax.main", *flags, f"--workdir={work}/{stage}-1"],
                      env | {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"})
            two = run(["bash", "launch/local.sh", "2", *flags, f"--workdir={work}/{stage}-2"], env)
            rows.append((stage, last_rate(one, args.steps), last_rate(two, args.steps)))
    print(f"machine: {machine()}; {args.steps} steps per run, rate over the last {args.steps // 2}")
    print("| stage | 1 process x 2 devices (steps/s) | 2 processes x 1 device (steps/s) | ratio |\n|---|---|---|---|")
    for stage, one, two in rows:
        print(f"| {stage} tiny | {one:.2f} | {two:.2f} | {two / one:.2f} |")


if __name__ == "__main__":
    main()
