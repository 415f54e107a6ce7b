#!/usr/bin/env bash
# N processes of one run on this machine, over loopback (launch/README.md):
#
#   bash launch/local.sh 2 --config=configs/finetune.py:tiny --workdir /tmp/cope-2proc
#
# Each process gets its share of the devices: on a CPU-only machine DEVICES_PER_PROCESS emulated
# CPU devices (default 1) and gloo collectives; with NVIDIA GPUs, GPUS/N of them each through
# --local_device_ids. Output lines are prefixed with the process number. When one process fails
# the others are killed, and the script exits with the first failure's status. Ctrl-C or a TERM
# reaches every process: they save at one agreed step, exit 0, and so does the script.
#
# Environment: PYTHON (default .venv/bin/python, else python3), PORT (default: a free one),
# DEVICES_PER_PROCESS (CPU only, default 1).
set -euo pipefail

if [[ $# -lt 1 || ! "$1" =~ ^[1-9][0-9]*$ ]]; then
  echo "usage: bash launch/local.sh N [cope_jax.main flags...]   (N >= 1 processes on this machine)" >&2
  exit 2
fi
N=$1
shift
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$([[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3)}
PORT=${PORT:-$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}

GPUS=0
if command -v nvidia-smi >/dev/null 2>&1; then
  GPUS=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
fi
if (( GPUS > 0 && GPUS % N != 0 )); then
  echo "error: $GPUS GPUs do not split evenly over $N processes" >&2
  exit 2
fi

pids=()
stop_all() {  # $1: the signal
  for pid in "${pids[@]}"; do kill "-${1:-TERM}" "$pid" 2>/dev/null || true; done
}
# Ctrl-C or a TERM from a scheduler goes to every process; they save at one agreed step and exit.
trap stop_all INT TERM

if (( GPUS == 0 )); then
  export JAX_PLATFORMS=${JAX_PLATFORMS:-cpu}
  export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=${DEVICES_PER_PROCESS:-1}"
fi
for (( i = 0; i < N; i++ )); do
  devices=()
  if (( GPUS > 0 )); then
    per=$(( GPUS / N ))
    devices=(--local_device_ids="$(seq -s, $(( i * per )) $(( i * per + per - 1 )))")
  fi
  PYTHONUNBUFFERED=1 "$PYTHON" -m cope_jax.main --coordinator_address="127.0.0.1:$PORT" --num_processes="$N" \
    --process_id="$i" "${devices[@]}" "$@" > >(sed -u "s/^/[$i] /") 2>&1 &
  pids+=($!)
done

# Poll rather than `wait -n`: a trapped signal interrupts `wait`, and the processes must be waited
# for while they save. After the first failure the others are killed: a TERM would only ask them to
# save at a step every process reaches, which the failed one never will.
status=0
declare -A ended=()
while (( ${#ended[@]} < N )); do
  for pid in "${pids[@]}"; do
    [[ -n "${ended[$pid]:-}" ]] && continue
    kill -0 "$pid" 2>/dev/null && continue
    set +e
    wait "$pid"
    code=$?
    set -e
    ended[$pid]=$code
    if (( code != 0 && status == 0 )); then
      status=$code
      echo "launch/local.sh: a process exited with status $code; killing the others" >&2
      stop_all KILL
    fi
  done
  sleep 0.5
done
sleep 0.2  # the output filters (children of the processes' substitutions) flush their last lines
exit "$status"
