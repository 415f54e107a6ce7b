#!/usr/bin/env bash
# One training run on every worker of a TPU VM pod, started from a workstation with gcloud
# (launch/README.md, "TPU VM pod"):
#
#   bash launch/tpu_pod.sh TPU_NAME ZONE [cope_jax.main flags...]
#   SETUP=1 REPO_URL=https://github.com/you/cope-jax.git bash launch/tpu_pod.sh my-v5p-64 us-east5-a \
#       --config=configs/finetune.py:paper --workdir /mnt/shared/cope-7b
#
# Every worker runs `cd $REPO && $VENV/bin/python -m cope_jax.main --distributed [flags]`; JAX finds
# the pod's workers, process ids and coordinator itself. First, on every worker, a process of an
# earlier run still holding the TPU is stopped and libtpu's stale lockfile removed.
#
# Environment: REPO (checkout on the workers, the same path on all; relative paths start at the
# home directory; default cope-jax), VENV (absolute or relative to REPO; default .venv), SETUP=1
# (clone or pull REPO_URL at BRANCH, then pip install -e . and jax[tpu] of the same version),
# GCLOUD_FLAGS (more flags for `gcloud compute tpus tpu-vm ssh`, e.g. "--project p --internal-ip").
set -euo pipefail

if [[ $# -lt 2 ]]; then
  echo "usage: bash launch/tpu_pod.sh TPU_NAME ZONE [cope_jax.main flags...]" >&2
  exit 2
fi
TPU_NAME=$1
ZONE=$2
shift 2
REPO=${REPO:-cope-jax}
VENV=${VENV:-.venv}
SETUP=${SETUP:-0}
REPO_URL=${REPO_URL:-$(git -C "$(dirname "$0")/.." remote get-url origin 2>/dev/null || true)}
BRANCH=${BRANCH:-main}
read -r -a gcloud_flags <<< "${GCLOUD_FLAGS:-}"

# Runs one line of bash on every worker at once. The script is kept to one line so that its %q form
# is plain backslash quoting, which the workers' login shell reads whatever it is.
on_all_workers() {
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all "${gcloud_flags[@]}" \
    --command "bash -c $(printf '%q' "set -euo pipefail; $1")"
}
# Variables the worker scripts read, quoted for the workers.
vars="REPO=$(printf '%q' "$REPO"); VENV=$(printf '%q' "$VENV"); REPO_URL=$(printf '%q' "$REPO_URL"); \
BRANCH=$(printf '%q' "$BRANCH"); cd; [[ \$VENV == /* ]] || VENV=\$(realpath -m \"\$REPO/\$VENV\")"

if [[ $SETUP == 1 ]]; then
  [[ -n $REPO_URL ]] || { echo "error: SETUP=1 needs REPO_URL (this checkout has no origin remote)" >&2; exit 2; }
  on_all_workers "$vars; \
if [[ -d \$REPO/.git ]]; then git -C \"\$REPO\" fetch -q origin \"\$BRANCH\"; git -C \"\$REPO\" checkout -q \"\$BRANCH\"; \
git -C \"\$REPO\" pull -q --ff-only origin \"\$BRANCH\"; else git clone -q -b \"\$BRANCH\" \"\$REPO_URL\" \"\$REPO\"; fi; \
[[ -x \$VENV/bin/python ]] || python3 -m venv \"\$VENV\"; cd \"\$REPO\"; \
\"\$VENV/bin/pip\" install -q -U pip; \"\$VENV/bin/pip\" install -q -e .; \
\"\$VENV/bin/pip\" install -q \"jax[tpu]==\$(\"\$VENV/bin/python\" -c 'import jax; print(jax.__version__)')\"; \
echo \"\$(hostname): setup done\""
fi

# A run that was interrupted (Ctrl-C here does not always stop the workers) keeps the TPU: stop it
# (TERM first: jax's preemption service may save a checkpoint; KILL after 60 s), then remove
# libtpu's lockfile. The pattern's [c] keeps pkill from matching this very command.
on_all_workers "if pkill -f '[c]ope_jax[.]main'; then for i in \$(seq 60); do pgrep -f '[c]ope_jax[.]main' >/dev/null || break; sleep 1; done; pkill -KILL -f '[c]ope_jax[.]main' || true; sleep 1; fi; sudo rm -f /tmp/libtpu_lockfile"

main_args=""
(( $# == 0 )) || main_args=$(printf '%q ' "$@")  # (printf with no arguments would give '')
on_all_workers "$vars; cd \"\$REPO\"; export PYTHONUNBUFFERED=1; \
\"\$VENV/bin/python\" -m cope_jax.main --distributed $main_args 2>&1 | sed -u \"s/^/[\$(hostname)] /\""
