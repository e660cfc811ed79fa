#!/usr/bin/env bash
# Submit a CPU data stage as a Slurm array of N shards and, after all of them succeeded, the merge.
#
#   slurm/submit_data_array.sh [--dry-run] [--throttle K] [--only LIST] <module> <config.yaml> <N> \
#                              [sbatch option ...] [-- key=value ...]
#
#   module      data.decontaminate or data.prepare (the stages with --shard I/N and --merge N; data.prepare splits
#               the input files over the tasks, one part per file under <output_dir>/.parts/, and its merge replays
#               them into the same shards one process writes), or train.pts (Pivotal Token Search: question k
#               goes to shard k % N, each into pairs.shard-<i>-of-<N>.jsonl; the merge writes the pairs in question
#               order, what one process writes; give GPUs as sbatch options, e.g. --gpus-per-node=1), or train.eval
#               (evaluation: items n % N == I of every task, into <output_dir>/shards/of-<NNNNN>/; the merge, which
#               needs no GPU, recomputes each task's metrics from the joined samples and writes results.jsonl)
#   array job   slurm/data_array.sbatch, --array=0-(N-1) (or LIST): task i runs
#               `python -m <module> <config> [key=value ...] --shard i/N` -> its part and completion marker
#               (data.decontaminate: <output_dir>/parts/of-<NNNNN>/part-<iiiii>.*). One CPU task each (#SBATCH defaults
#               in slurm/data_array.sbatch; add e.g. --cpus-per-task / --mem as sbatch options).
#   merge job   `python -m <module> <config> [key=value ...] --merge N`, one task, with
#               --dependency=afterok:<array job> --kill-on-invalid-dep=yes: it starts once every task completed and
#               is cancelled (DependencyNeverSatisfied) when one failed. It writes what one process would have,
#               byte for byte (data.decontaminate: the kept documents per input and decontamination_report.json).
# Both run in the directory you submit from (relative paths in the config and the overrides are from there) and log
# there: phi4-data-<array job>_<task>.out/.err and phi4-data-merge-<job>.out/.err. sbatch options apply to both jobs;
# DATA_MERGE_OPTS (word-split) are added to the merge job only. key=value overrides after `--` go to every shard and
# the merge alike. The config is loaded here first (python with this repo's requirements): a config error fails
# before anything is queued.
#   --throttle K   at most K tasks at once (--array=...%K); or DATA_THROTTLE=K
#   --only LIST    submit only these shards (a Slurm index list, e.g. 3,7,10-12): rerun failed shards, then merge.
#                  Resubmitting the whole array also works: a completed shard exits at once.
#   --dry-run      print the sbatch commands without submitting
# Prints `shards: array job <id> ...` and `merge: job <id> after <id> ...`.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
usage="usage: $0 [--dry-run] [--throttle K] [--only LIST] <module> <config.yaml> <N> [sbatch option ...] [-- key=value ...]"
dry_run=0
throttle="${DATA_THROTTLE:-}"
only=""
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) dry_run=1; shift ;;
        --throttle) throttle="${2:?--throttle needs a number}"; shift 2 ;;
        --throttle=*) throttle="${1#*=}"; shift ;;
        --only) only="${2:?--only needs a list of shards}"; shift 2 ;;
        --only=*) only="${1#*=}"; shift ;;
        -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}"; exit 0 ;;
        *) break ;;
    esac
done
[ $# -ge 3 ] || { echo "$usage" >&2; exit 2; }
module="$1"; config="$2"; n="$3"; shift 3
case "$module" in
    data.decontaminate) schema="data.decontaminate:DecontaminateConfig" ;;
    data.prepare) schema="data.prepare:PrepareConfig" ;;
    train.pts) schema="train.pts.config:PTSConfig" ;;
    train.eval) schema="train.eval.config:EvalConfig" ;;
    *) echo "module '$module': expected data.decontaminate, data.prepare, train.pts or train.eval" >&2; exit 2 ;;
esac
opts=()
while [ $# -gt 0 ] && [ "$1" != -- ]; do opts+=("$1"); shift; done
[ $# -gt 0 ] && shift  # the --
overrides=("$@")

[ -f "$config" ] || { echo "config not found: $config" >&2; exit 2; }
config="$(cd "$(dirname "$config")" && pwd)/$(basename "$config")"
[[ "$n" =~ ^[1-9][0-9]*$ ]] || { echo "N (the number of shards) must be a positive integer, got '$n'" >&2; exit 2; }
if [ -n "$throttle" ] && ! [[ "$throttle" =~ ^[1-9][0-9]*$ ]]; then
    echo "--throttle must be a positive integer, got '$throttle'" >&2; exit 2
fi
for o in "${opts[@]}"; do
    case "$o" in
        --array*|-a|--dependency*|-d) echo "submit_data_array.sh sets $o itself (use --only / --throttle)" >&2; exit 2 ;;
    esac
done
array="0-$((n - 1))"
if [ -n "$only" ]; then
    if ! [[ "$only" =~ ^[0-9]+(-[0-9]+)?(,[0-9]+(-[0-9]+)?)*$ ]]; then
        echo "--only $only: expected shard indices like 3,7,10-12" >&2; exit 2
    fi
    for idx in $(echo "$only" | tr ',-' '  '); do
        [ "$idx" -lt "$n" ] || { echo "--only $only: shard $idx is not a shard of $n (0..$((n - 1)))" >&2; exit 2; }
    done
    array="$only"
fi
[ -z "$throttle" ] || array="$array%$throttle"

# The config must load, with the overrides, before anything is queued; its output_dir is where the data goes.
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
output_dir="$("${PHI4_PYTHON:-python}" - "$schema" "$config" "${overrides[@]}" <<'PY'
import importlib
import sys
from data.configfile import ConfigError, load_typed
module, name = sys.argv[1].split(":")
try:
    cfg = load_typed(sys.argv[2], sys.argv[3:], schema=getattr(importlib.import_module(module), name))
    print(getattr(cfg, "output_dir", "") or cfg.output)  # train.pts: its pairs file
except (ConfigError, ValueError) as e:
    sys.exit(f"configuration error: {e}")
PY
)" || exit 2
output_dir="${output_dir##*$'\n'}"

where=(--chdir="$PWD")
array_cmd=(sbatch --parsable --array="$array" "${where[@]}" "${opts[@]}" "$REPO/slurm/data_array.sbatch"
           --module "$module" --num-shards "$n" "$config" "${overrides[@]}")
# shellcheck disable=SC2206  # DATA_MERGE_OPTS is word-split on purpose
merge_opts=(${DATA_MERGE_OPTS:-})
merge_py="\${PHI4_PYTHON:-python} -m $module $(printf '%q ' "$config" "${overrides[@]}" --merge "$n")"
wrap="{ [ -z \"\${PHI4_ENV_SETUP:-}\" ] || eval \"\$PHI4_ENV_SETUP\"; } && "
wrap+="export PYTHONPATH=$(printf '%q' "$REPO")\${PYTHONPATH:+:\$PYTHONPATH} && $merge_py"
merge_cmd() {
    cmd=(sbatch --parsable --job-name=phi4-data-merge --nodes=1 --ntasks=1 --time=04:00:00 --open-mode=append
         --output=%x-%j.out --error=%x-%j.err "${where[@]}" "--dependency=afterok:$1" --kill-on-invalid-dep=yes
         "${opts[@]}" "${merge_opts[@]}" --wrap="$wrap")
}

if [ "$dry_run" = 1 ]; then
    printf '%q ' "${array_cmd[@]}"; echo
    merge_cmd "<array job>"
    printf '%q ' "${cmd[@]}"; echo
    exit 0
fi
array_id="$("${array_cmd[@]}")"
array_id="${array_id%%;*}"
echo "shards: array job $array_id (tasks $array of $n) -> $output_dir/parts"
merge_cmd "$array_id"
merge_id="$("${cmd[@]}")" || {
    echo "the merge did not submit; the array $array_id runs on (scancel $array_id to stop it)" >&2; exit 1; }
merge_id="${merge_id%%;*}"
echo "merge: job $merge_id after $array_id -> $output_dir"
