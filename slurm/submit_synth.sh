#!/usr/bin/env bash
# Submit a synthetic-data run (a data/synth config, as `python -m train.synth` runs it) as a Slurm array of N shards
# and, after all of them succeeded, the merge.
#
#   slurm/submit_synth.sh [--dry-run] [--throttle K] [--only LIST] <config.yaml> <N> [sbatch option ...] \
#                         [-- key=value ...]
#
#   array job   slurm/synth.sbatch, --array=0-(N-1) (or LIST): task i runs
#               `python -m train.synth <config> --shard i/N [key=value ...]` -> <output_dir>/shards/<iiiii>-of-<NNNNN>/
#               and its DONE marker. One node per task (#SBATCH defaults in slurm/synth.sbatch: 8 GPUs, exclusive).
#   merge job   `python -m train.synth <config> --merge N [key=value ...]`, one task, with
#               --dependency=afterok:<array job> --kill-on-invalid-dep=yes: it starts once every task completed, and
#               is cancelled (DependencyNeverSatisfied) when one failed. -> <output_dir>/<name>.<type>.jsonl and
#               <output_dir>/manifest.json.
# Both run in the directory you submit from (relative paths in the config and the overrides are from there) and log
# there: phi4-synth-<array job>_<task>.out/.err and phi4-synth-merge-<job>.out/.err.
# sbatch options apply to both jobs (e.g. --partition=gpu --account=me --time=48:00:00); SYNTH_MERGE_OPTS (word-split)
# are added to the merge job only (default: --gpus-per-node=0, the merge is CPU work). key=value overrides after `--`
# go to every shard and the merge alike.
# The config is loaded here first (python with this repo's requirements): a config error fails before anything is
# queued. Set SYNTH_SERVER_CMD (and friends, see slurm/synth.sbatch) in your environment to give each task its own
# server; sbatch passes your environment on.
#   --throttle K   at most K tasks at once (--array=...%K); or SYNTH_THROTTLE=K
#   --only LIST    submit only these shards (a Slurm index list, e.g. 3,7,10-12): rerun failed shards, then merge.
#                  Resubmitting the whole array also works: a DONE shard exits at once.
#   --dry-run      print the sbatch commands without submitting
# Prints `shards: array job <id> ...` and `merge: job <id> after <id> ...`.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
usage="usage: $0 [--dry-run] [--throttle K] [--only LIST] <config.yaml> <N> [sbatch option ...] [-- key=value ...]"
dry_run=0
throttle="${SYNTH_THROTTLE:-}"
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
[ $# -ge 2 ] || { echo "$usage" >&2; exit 2; }
config="$1"; n="$2"; shift 2
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
        --array*|-a|--dependency*|-d) echo "submit_synth.sh sets $o itself (use --only / --throttle)" >&2; exit 2 ;;
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
output_dir="$("${PHI4_PYTHON:-python}" - "$config" "${overrides[@]}" <<'PY'
import sys
from data.configfile import ConfigError
from data.synth.config import load_synth_config
try:
    print(load_synth_config(sys.argv[1], sys.argv[2:]).output_dir)
except ConfigError as e:
    sys.exit(f"configuration error: {e}")
PY
)" || exit 2
output_dir="${output_dir##*$'\n'}"

where=(--chdir="$PWD")
array_cmd=(sbatch --parsable --array="$array" "${where[@]}" "${opts[@]}" "$REPO/slurm/synth.sbatch"
           --num-shards "$n" "$config" "${overrides[@]}")
# shellcheck disable=SC2206  # SYNTH_MERGE_OPTS is word-split on purpose
merge_opts=(${SYNTH_MERGE_OPTS:---gpus-per-node=0})
merge_py="\${PHI4_PYTHON:-python} -m train.synth $(printf '%q ' "$config" --merge "$n" "${overrides[@]}")"
wrap="{ [ -z \"\${PHI4_ENV_SETUP:-}\" ] || eval \"\$PHI4_ENV_SETUP\"; } && "
wrap+="export PYTHONPATH=$(printf '%q' "$REPO")\${PYTHONPATH:+:\$PYTHONPATH} && $merge_py"
merge_cmd() {
    cmd=(sbatch --parsable --job-name=phi4-synth-merge --nodes=1 --ntasks=1 --time=04:00:00 --open-mode=append
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
echo "shards: array job $array_id (tasks $array of $n) -> $output_dir/shards"
merge_cmd "$array_id"
merge_id="$("${cmd[@]}")" || {
    echo "the merge did not submit; the array $array_id runs on (scancel $array_id to stop it)" >&2; exit 1; }
merge_id="${merge_id%%;*}"
echo "merge: job $merge_id after $array_id -> $output_dir"
