#!/usr/bin/env bash
# The one Slurm launcher behind slurm/{pretrain,midtrain,sft,dpo}.sbatch. See slurm/README.md.
#
#   batch mode (what the sbatch wrappers run, inside the job's batch step):
#       launch.sh <stage> <config.yaml> [key=value ...]
#   node mode (what srun runs, one task per node):
#       launch.sh --node <config.yaml> [key=value ...]
#
# Batch mode checks the config, finds the head node's address with scontrol (NodeAddr, so it works where node names
# do not resolve in DNS), and runs `srun` with one task per node. Each task runs one torchrun with a c10d rendezvous
# hosted by the head node's torchrun; torchrun starts one trainer per GPU (`python -m train <config> [overrides]`).
#
# Preemption and time limits. Slurm delivers a step signal (the `--signal=USR1@secs` warning, `scancel --signal=USR1`,
# and SIGTERM on preemption, scancel or the time limit) to every process of the step. The trainers catch USR1/TERM,
# save a checkpoint, record {"status": "preempted"} in <output_dir>/exit_status.json and exit 75. torchrun is
# shielded from both signals (they are ignored in it): its own handler would SIGKILL the trainers 30 s later, in the
# middle of a large save. When srun fails and exit_status.json says "preempted" (written during this attempt), the
# batch step requeues the job (`scontrol requeue`, needs --requeue) if the job is still running (the USR1 warning)
# or hit its time limit, and the restarted job continues with `train.resume=auto`; after `scancel` it does not.
# A signal sent to the batch shell only (`--signal=B:USR1@secs`, `scancel --batch --signal=USR1`) is forwarded to
# the step. Any other failure (a bad config among them) fails the job, without requeue.
#
# Environment (all optional):
#   PHI4_REPO             repo root, read by the sbatch wrappers to find this script (default: the submitted
#                         script's repo, else the submit directory); exported here as this script's repo
#   PHI4_ENV_SETUP        shell code run before anything else, e.g. "module load cuda/12.4; source ~/venv/bin/activate"
#   PHI4_PYTHON           python executable (default: python)
#   PHI4_RDZV_PORT        c10d rendezvous port on the head node (default: 20000 + job id % 20000)
#   PHI4_NPROC_PER_NODE   trainer processes per node (default: GPUs allocated on the node, 1 without GPUs)
#   PHI4_MODULE           python module torchrun starts (default: train)
#   PHI4_SRUN_ARGS        extra srun arguments, word-split (e.g. "--cpu-bind=none")
#   PHI4_SRUN_WAIT        seconds srun waits for the other nodes once one node's task ended (default 600)
#   NCCL / torch defaults set here when unset: TORCH_NCCL_ASYNC_ERROR_HANDLING=1 (a failed collective aborts the job
#   instead of hanging it), NCCL_DEBUG=WARN. Site specific ones (NCCL_SOCKET_IFNAME, NCCL_IB_HCA, ...) belong in
#   PHI4_ENV_SETUP.
set -euo pipefail

REQUEUE_EXIT=75  # the trainer's "checkpoint saved after a signal, requeue me" exit code

say() { echo "[launch $(date +%H:%M:%S)] $*"; }
die() { echo "[launch] error: $*" >&2; exit 2; }

# Address of a Slurm node as the cluster knows it (NodeAddr), falling back to the name itself.
node_addr() {
    local addr
    addr="$(scontrol show node "$1" 2>/dev/null | grep -o 'NodeAddr=[^ ]*' | head -n1 | cut -d= -f2)" || true
    echo "${addr:-$1}"
}

# Trainer processes for this node: override, else GPUs Slurm gave this node, else visible GPUs, else 1 (CPU).
local_nproc() {
    local n=""
    if [ -n "${PHI4_NPROC_PER_NODE:-}" ]; then
        n="$PHI4_NPROC_PER_NODE"
    elif [ -n "${SLURM_GPUS_ON_NODE:-}" ] && [ "${SLURM_GPUS_ON_NODE}" != 0 ]; then
        n="$SLURM_GPUS_ON_NODE"
    elif [ -n "${SLURM_GPUS_PER_NODE:-}" ] && [ "${SLURM_GPUS_PER_NODE##*:}" != 0 ]; then
        n="${SLURM_GPUS_PER_NODE##*:}"  # "8" or "h100:8"
    elif [ -n "${CUDA_VISIBLE_DEVICES:-}" ] && [ "$CUDA_VISIBLE_DEVICES" != "NoDevFiles" ]; then
        n="$(echo "$CUDA_VISIBLE_DEVICES" | tr ',' '\n' | grep -c .)"
    else
        n=1
    fi
    [[ "$n" =~ ^[1-9][0-9]*$ ]] || die "processes per node must be a positive integer, got '$n' (PHI4_NPROC_PER_NODE)"
    echo "$n"
}

# Wait for background process $1 and set WAIT_RC to its exit status. A trapped signal interrupts `wait` with a status
# above 128 while the process runs on, so wait again; if it ended just then, a second `wait` gives its real status.
wait_status() {
    local pid="$1" rc rc2
    while :; do
        rc=0; wait "$pid" || rc=$?
        if [ "$rc" -gt 128 ] && kill -0 "$pid" 2>/dev/null; then continue; fi
        if [ "$rc" -gt 128 ]; then
            rc2=0; wait "$pid" 2>/dev/null || rc2=$?
            [ "$rc2" != 127 ] && rc=$rc2
        fi
        WAIT_RC=$rc
        return 0
    done
}

# ---- node mode: one torchrun on this node ---------------------------------------------------------------------------
node_main() {
    local config="$1"; shift
    local nproc addr is_host
    nproc="$(local_nproc)"
    addr="$(node_addr "${SLURMD_NODENAME:-$(hostname -s)}")"
    is_host=0; [ "${SLURM_NODEID:-0}" = 0 ] && is_host=1
    say "node ${SLURMD_NODENAME:-?} (id ${SLURM_NODEID:-0}, addr $addr): torchrun with $nproc process(es)," \
        "rendezvous $PHI4_RDZV_ENDPOINT (store host: $is_host)"
    # Slurm signals every process of the step. Ignored signals stay ignored across exec, so neither this task nor
    # torchrun dies on USR1 (whose default action is to terminate) and torchrun does not act on TERM (its handler
    # would SIGKILL the trainers 30 s later, mid-save); TORCHELASTIC_SIGNALS_TO_HANDLE keeps it from re-arming TERM.
    # The trainers install their own USR1/TERM handlers.
    trap '' USR1 TERM
    export TORCHELASTIC_SIGNALS_TO_HANDLE="SIGINT,SIGHUP,SIGQUIT"
    exec "${PHI4_PYTHON:-python}" -m torch.distributed.run \
        --nnodes="${SLURM_JOB_NUM_NODES:-1}" \
        --nproc-per-node="$nproc" \
        --rdzv-backend=c10d \
        --rdzv-endpoint="$PHI4_RDZV_ENDPOINT" \
        --rdzv-id="${SLURM_JOB_ID:-0}-${SLURM_RESTART_COUNT:-0}" \
        --rdzv-conf="is_host=$is_host" \
        --local-addr="$addr" \
        --max-restarts=0 \
        -m "${PHI4_MODULE:-train}" "$config" "$@"
}

# "<status> <step> <time>" from <output_dir>/exit_status.json, which the trainer keeps up to date (running, completed,
# preempted, failed); "none 0 0" when absent. torchrun turns every failing worker's exit code into 1, so the trainer's
# 75 ("saved after a signal, requeue me") is read from there.
run_status() {
    "${PHI4_PYTHON:-python}" - "$1/exit_status.json" <<'PY'
import json, sys
try:
    rec = json.load(open(sys.argv[1]))
    print(rec.get("status", "none"), int(rec.get("step", 0)), float(rec.get("time", 0)))
except (OSError, ValueError):
    print("none 0 0")
PY
}

# ---- batch mode: check, rendezvous, srun, requeue -----------------------------------------------------------------
batch_main() {
    [ $# -ge 2 ] || die "usage: launch.sh <stage> <config.yaml> [key=value ...]"
    local stage="$1" config="$2"; shift 2
    local overrides=("$@") output_dir="" started start_step=0
    started="$(date +%s)"
    [ -n "${SLURM_JOB_ID:-}" ] || die "not inside a Slurm job: submit with sbatch slurm/$stage.sbatch <config> [key=value ...]"

    if [ -n "${PHI4_ENV_SETUP:-}" ]; then
        say "PHI4_ENV_SETUP: $PHI4_ENV_SETUP"
        # Module and venv scripts often read unset variables: run them without -u/-e, then check the status.
        local setup_rc=0
        set +eu
        eval "$PHI4_ENV_SETUP" || setup_rc=$?
        set -eu
        [ "$setup_rc" = 0 ] || die "PHI4_ENV_SETUP failed with status $setup_rc"
    fi
    local repo
    repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
    export PHI4_REPO="$repo"
    export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
    [ -f "$config" ] || die "config file not found: $config (relative paths are from the submit directory $PWD)"
    config="$(cd "$(dirname "$config")" && pwd)/$(basename "$config")"

    # Resume is the default so a requeued job continues; a restarted job always resumes, whatever was asked.
    if [ "${SLURM_RESTART_COUNT:-0}" != 0 ] && [[ " ${overrides[*]} " == *" train.resume="* ]]; then
        overrides+=("train.resume=auto")
    fi
    overrides=("train.resume=auto" "${overrides[@]}")

    # Fail before any node starts: the config must load and be for this stage.
    if [ "${PHI4_MODULE:-train}" = train ]; then
        local got
        got="$("${PHI4_PYTHON:-python}" - "$config" "${overrides[@]}" <<'PY'
import sys
from train.config import ConfigError, load_config
try:
    cfg = load_config(sys.argv[1], sys.argv[2:])
    print(cfg.stage, cfg.output_dir, sep="\t")
except ConfigError as e:
    print(f"[launch] config error: {e}", file=sys.stderr)
    sys.exit(2)
PY
)" || { echo "[launch] error: the config check failed for $config: job not started" >&2; exit 2; }
        got="${got##*$'\n'}"  # the last line, should the import print anything
        output_dir="${got#*$'\t'}"
        got="${got%%$'\t'*}"
        [ "$got" = "$stage" ] || die "$config is a '$got' config but was submitted with slurm/$stage.sbatch (use slurm/$got.sbatch)"
        # A restart resumes from where the last attempt stopped; it must get further before it may requeue again.
        if [ "${SLURM_RESTART_COUNT:-0}" != 0 ]; then
            read -r _ start_step _ <<< "$(run_status "$output_dir")"
        fi
    fi

    : "${TORCH_NCCL_ASYNC_ERROR_HANDLING:=1}"
    : "${NCCL_DEBUG:=WARN}"
    export TORCH_NCCL_ASYNC_ERROR_HANDLING NCCL_DEBUG

    local head head_addr port
    head="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)"
    head_addr="$(node_addr "$head")"
    port="${PHI4_RDZV_PORT:-$((20000 + SLURM_JOB_ID % 20000))}"
    export PHI4_RDZV_ENDPOINT="$head_addr:$port"
    say "job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) stage $stage on $SLURM_JOB_NUM_NODES node(s)" \
        "[$SLURM_JOB_NODELIST], head $head at $PHI4_RDZV_ENDPOINT"
    say "config $config overrides: ${overrides[*]}"

    # A signal meant for the trainers that reached only this shell is passed on to the step; SIGTERM reaches the
    # step from Slurm itself, so this shell just keeps waiting for the trainers to save.
    trap 'say "batch shell got SIGUSR1: forwarding to the step"; scancel --signal=USR1 "$SLURM_JOB_ID" || true' USR1
    trap 'say "batch shell got SIGTERM: waiting for the trainers to save"' TERM

    local rc
    # shellcheck disable=SC2086  # PHI4_SRUN_ARGS is word-split on purpose
    srun --nodes="$SLURM_JOB_NUM_NODES" --ntasks-per-node=1 --kill-on-bad-exit=0 --wait="${PHI4_SRUN_WAIT:-600}" \
        ${PHI4_SRUN_ARGS:-} bash "$repo/slurm/launch.sh" --node "$config" "${overrides[@]}" &
    wait_status $!
    rc=$WAIT_RC

    if [ "$rc" = 0 ]; then
        say "done"
        exit 0
    fi
    local status="none" step=0 when=0
    if [ -n "$output_dir" ]; then
        read -r status step when <<< "$(run_status "$output_dir")"
    fi
    if [ "$status" = preempted ] && [ "${when%.*}" -ge "$started" ]; then
        # Requeue after the USR1 warning (job still RUNNING) or the time limit's SIGTERM (Reason=TimeLimit); not after
        # scancel (COMPLETING, Reason=None): that stop is the user's. Preemption with PreemptMode=REQUEUE is Slurm's.
        local state reason
        read -r state reason <<< "$(scontrol show job "$SLURM_JOB_ID" 2>/dev/null \
            | grep -o 'JobState=[A-Z_]*\|Reason=[A-Za-z_]*' | cut -d= -f2 | head -n2 | tr '\n' ' ')" || true
        if [ "$state" != RUNNING ] && [ "$reason" != TimeLimit ]; then
            say "job ending (state ${state:-?}, reason ${reason:-?}: cancelled or preempted): checkpoint saved at step" \
                "$step; not requeueing. Submit the same command again to continue."
            exit "$REQUEUE_EXIT"
        fi
        if [ "$step" -le "$start_step" ]; then
            say "error: stopped by a signal at step $step without progress since the start of this attempt:" \
                "not requeueing (is --time shorter than the --signal lead time?)"
            exit "$REQUEUE_EXIT"
        fi
        say "the trainers saved a checkpoint at step $step and stopped (exit $REQUEUE_EXIT): requeueing job $SLURM_JOB_ID"
        say "(torchrun reports the trainers' exit $REQUEUE_EXIT as a failure above: expected)"
        trap - TERM USR1
        # On success Slurm ends this script here and runs the job again later.
        scontrol requeue "$SLURM_JOB_ID" && sleep 300
        say "error: scontrol requeue failed (was the job submitted with --requeue?); resubmit to continue"
        exit "$REQUEUE_EXIT"
    fi
    say "failed: srun exit $rc"
    exit "$rc"
}

if [ "${1:-}" = "--node" ]; then
    shift
    node_main "$@"
else
    batch_main "$@"
fi
