#!/usr/bin/env bash
# Submit a recipe (configs/recipes/*.yaml, the same file `python -m train.recipe` runs) as a chain of Slurm jobs,
# each starting only after the previous one succeeded.
#
#   slurm/submit_recipe.sh [--dry-run] [--from NAME] <recipe.yaml> [sbatch option ...]
#
# Every stage becomes one job, in the recipe's order, running exactly what `python -m train.recipe` would run for it
# (train/recipe.py builds the commands), in <output_dir>/<name>/:
#   kind train   slurm/<stage>.sbatch (pretrain, midtrain, sft or dpo: the `stage:` of its config) with the runner's
#                wiring: output_dir=<output_dir>/<name> train.resume=auto train.init_from=<previous training stage>,
#                then the stage's overrides. Multi-node, requeued on preemption (see slurm/README.md).
#   other kinds  (smoke_data, prepare, pts, export, eval) one task on one node with one GPU, run through
#                `python -m train.recipe <recipe> --stage NAME` (the runner's own stage.json and stage.log).
# A last job, after the final stage, writes <output_dir>/summary.md (+ .json, plots) as `python -m train.recipe`
# does at its end (`--summary`). Training stages are recorded by the trainer's exit_status.json, which the
# runner also reads: a later local `python -m train.recipe` skips every stage the chain completed.
# Jobs run from the repo root (relative paths in stage configs mean what they mean to the runner); their logs,
# <job name>-<id>.out/.err, land in the directory you submit from.
# The recipe's and stages' `nproc` (the local runner's process count) is not used: the Slurm allocation decides.
# Each job's --nodes, --gpus-per-node and --time are the ones its stage states in the recipe (a stage's `nodes`,
# `gpus_per_node`, `time`, else the recipe's; one-task jobs always --nodes=1); what the recipe does not state comes
# from the sbatch script (or, for one-task jobs, 1 GPU and 24:00:00). `python -m train.recipe <recipe> --dry-run`
# checks every stage's batch against those resources: change them in the recipe, not here.
# sbatch options given after the recipe apply to every job (e.g. --partition=gpu --account=me); the recipe's
# resources come after them and win.
# Jobs run with --dependency=afterok:<previous> --kill-on-invalid-dep=yes: a failed stage cancels the rest of the
# chain instead of leaving it pending forever; a stage requeued after preemption keeps its successors waiting.
# PHI4_RECIPE_DIR is exported to the jobs (stage configs use ${oc.env:PHI4_RECIPE_DIR,...}), as the runner does.
#   --from NAME  start at stage NAME (earlier stages are taken as done: init_from still points at them)
#   --dry-run    print the sbatch commands without submitting
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dry_run=0
from=""
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) dry_run=1; shift ;;
        --from) from="${2:?--from needs a stage name}"; shift 2 ;;
        -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}"; exit 0 ;;
        *) break ;;
    esac
done
[ $# -ge 1 ] || { echo "usage: $0 [--dry-run] [--from NAME] <recipe.yaml> [sbatch option ...]" >&2; exit 2; }
recipe="$1"; shift
common_opts=("$@")
[ -f "$recipe" ] || { echo "recipe not found: $recipe" >&2; exit 2; }
recipe="$(cd "$(dirname "$recipe")" && pwd)/$(basename "$recipe")"

# Line 1: the recipe's output_dir. Then one line per stage, shell-quoted: name, "train" <resources> <sbatch script>
# <args...> or "cmd" <resources> <shell command>; <resources> is one word of sbatch options, maybe empty.
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
plan="$("${PHI4_PYTHON:-python}" - "$recipe" "$from" <<'PY'
import os, shlex, sys
from pathlib import Path

from train.config import REPO_ROOT, ConfigError, load_config
from train.recipe.dry_run import sbatch_options
from train.recipe.runner import Recipe, RecipeRunner

path, start = sys.argv[1], sys.argv[2]
try:
    recipe = load_config(path, [], schema=Recipe)
except ConfigError as e:
    sys.exit(f"configuration error: {e}")
runner = RecipeRunner(recipe, log=lambda *_: None)
os.environ["PHI4_RECIPE_DIR"] = str(runner.out)  # stage configs resolve their paths against it
if start and start not in [s.name for s in recipe.stages]:
    sys.exit(f"{path}: --from {start}: no such stage (stages: {[s.name for s in recipe.stages]})")
lines, started = [str(runner.out)], not start
for stage in recipe.stages:
    started = started or stage.name == start
    if started:
        cmd = runner._command(stage)
        resources = " ".join(sbatch_options(recipe, stage))  # e.g. "--nodes=240 --gpus-per-node=8 --time=48:00:00"
        if stage.kind == "train":
            args = cmd[cmd.index("train") + 1:]  # <config> <runner wiring> <stage overrides>
            config = args[0] if (REPO_ROOT / args[0]).is_file() else str(Path(args[0]).resolve())
            config = str(REPO_ROOT / config)  # the runner runs from the repo root; an absolute path stays as it is
            try:
                kind = load_config(config, args[1:]).stage
            except ConfigError as e:
                sys.exit(f"{path}: stage {stage.name}: {e}")
            lines.append(shlex.join([stage.name, "train", resources, f"{kind}.sbatch", config, *args[1:]]))
        else:  # through the runner, so the stage leaves the runner's records
            lines.append(shlex.join([stage.name, "cmd", resources, "${PHI4_PYTHON:-python} -m train.recipe "
                                     + " ".join(shlex.quote(c) for c in (path, "--stage", stage.name))]))
    if stage.kind == "train":
        runner.last_train = runner.stage_dir(stage.name)
print("\n".join(lines))
PY
)"

export PHI4_RECIPE_DIR="${plan%%$'\n'*}"
# Jobs run from the repo root, as under the local runner; their logs land in the directory you submit from.
where=(--chdir="$REPO" --output="$PWD/%x-%j.out" --error="$PWD/%x-%j.err")
prev=""
while IFS= read -r line; do
    eval "f=($line)"
    name="${f[0]}"
    dep=()
    [ -n "$prev" ] && dep=("--dependency=afterok:$prev" "--kill-on-invalid-dep=yes")
    read -r -a res <<< "${f[2]}"  # the recipe's resources for this stage: after your options, so they win
    if [ "${f[1]}" = train ]; then
        cmd=(sbatch --parsable --job-name="phi4-$name" "${where[@]}" "${dep[@]}" "${common_opts[@]}" "${res[@]}"
             "$REPO/slurm/${f[3]}" "${f[@]:4}")
        what="${f[3]%.sbatch}"
    else
        wrap="{ [ -z \"\${PHI4_ENV_SETUP:-}\" ] || eval \"\$PHI4_ENV_SETUP\"; } && ${f[3]}"
        cmd=(sbatch --parsable --job-name="phi4-$name" --nodes=1 --ntasks=1 --gpus-per-node=1 --exclusive --mem=0
             --time=24:00:00 --open-mode=append "${where[@]}" "${dep[@]}" "${common_opts[@]}" "${res[@]}"
             --wrap="$wrap")
        what="command"
    fi
    if [ "$dry_run" = 1 ]; then
        printf '%q ' "${cmd[@]}"; echo
        prev="<$name>"
        continue
    fi
    id="$("${cmd[@]}")"
    id="${id%%;*}"
    echo "$name: $what job $id${prev:+ after $prev} -> $PHI4_RECIPE_DIR/$name"
    prev="$id"
done <<< "${plan#*$'\n'}"

# The summary, once the last stage succeeded: CPU work on one node.
wrap="{ [ -z \"\${PHI4_ENV_SETUP:-}\" ] || eval \"\$PHI4_ENV_SETUP\"; } && \${PHI4_PYTHON:-python} -m train.recipe $(printf '%q' "$recipe") --summary"
cmd=(sbatch --parsable --job-name="phi4-summary" --nodes=1 --ntasks=1 --time=01:00:00 --open-mode=append
     "${where[@]}" --dependency="afterok:$prev" --kill-on-invalid-dep=yes "${common_opts[@]}" --nodes=1 --wrap="$wrap")
if [ "$dry_run" = 1 ]; then
    printf '%q ' "${cmd[@]}"; echo
    exit 0
fi
id="$("${cmd[@]}")"
id="${id%%;*}"
echo "summary: command job ${id} after $prev -> $PHI4_RECIPE_DIR/summary.md"
