#!/usr/bin/env bash
# Submit the training stages of a recipe as a chain of Slurm jobs, each starting after the previous one succeeded.
#
#   slurm/submit_recipe.sh [--dry-run] [--from NAME] <recipe.yaml> [sbatch option ...]
#
# The recipe (configs/recipes/*.yaml) has `output_dir` and a list `stages:` of {name, config, overrides: [..], ...}.
# Training stages (kind pretrain, midtrain, sft, dpo) are submitted in order with slurm/<kind>.sbatch and the
# overrides  output_dir=<recipe output_dir>/<name>  and, from the second one on,  train.init_from=<previous stage's
# output_dir>; the stage's own overrides come after these and win. Other stages (prepare, pts, export, eval, ...)
# are not jobs here: they are listed so you can run them yourself.
#   kind     the stage's `kind`, else its `stage`, else its name when that is a kind, else the config's `stage:`
#   sbatch   optional per-stage list of sbatch options (e.g. ["--nodes=4", "--time=48:00:00"])
# The sbatch options given on the command line apply to every job (per-stage ones come after them and win).
# Each job runs with --dependency=afterok:<previous job> --kill-on-invalid-dep=yes: if a stage fails, the rest of
# the chain is cancelled instead of waiting forever. A stage requeued after preemption keeps its successors waiting.
# --from NAME starts the chain at stage NAME (its init_from is still the previous stage's output_dir).
# --dry-run prints the sbatch commands without submitting.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dry_run=0
from=""
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) dry_run=1; shift ;;
        --from) from="${2:?--from needs a stage name}"; shift 2 ;;
        -h|--help) sed -n '2,20p' "${BASH_SOURCE[0]}"; exit 0 ;;
        *) break ;;
    esac
done
[ $# -ge 1 ] || { echo "usage: $0 [--dry-run] [--from NAME] <recipe.yaml> [sbatch option ...]" >&2; exit 2; }
recipe="$1"; shift
common_opts=("$@")

# One line per training stage, shell-quoted: kind name output_dir n_sbatch sbatch... config overrides...
plan="$(PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" "${PHI4_PYTHON:-python}" - "$recipe" "$REPO" "$from" <<'PY'
import os, shlex, sys
import yaml

path, repo, start = sys.argv[1], sys.argv[2], sys.argv[3]
TRAIN = ("pretrain", "midtrain", "sft", "dpo")
def fail(msg):
    print(f"{path}: {msg}", file=sys.stderr); sys.exit(2)
if not os.path.isfile(path):
    fail("recipe file not found")
try:
    recipe = yaml.safe_load(open(path))
except yaml.YAMLError as e:
    mark = getattr(e, "problem_mark", None)
    fail(f"{'line %d: ' % (mark.line + 1) if mark else ''}invalid YAML: {getattr(e, 'problem', e)}")
if not isinstance(recipe, dict) or not isinstance(recipe.get("stages"), list) or not recipe["stages"]:
    fail("expected a mapping with a non-empty list 'stages'")
if not isinstance(recipe.get("output_dir"), str) or not recipe["output_dir"]:
    fail("expected 'output_dir' (a path string)")
root = os.path.abspath(recipe["output_dir"])

def find(p):  # config paths: from the current directory, else from the repo root
    for cand in (p, os.path.join(repo, p)):
        if os.path.isfile(cand):
            return os.path.abspath(cand)
    return None

lines, prev_out, seen, started, skipped = [], None, set(), not start, []
for i, st in enumerate(recipe["stages"]):
    where = f"stages[{i}]"
    if not isinstance(st, dict) or not isinstance(st.get("name"), str) or not st["name"]:
        fail(f"{where}: expected a mapping with a 'name'")
    name = st["name"]
    where = f"stage '{name}' ({where})"
    if name in seen:
        fail(f"{where}: duplicate stage name")
    seen.add(name)
    config = st.get("config")
    cfg_path = find(config) if isinstance(config, str) else None
    kind = st.get("kind") or st.get("stage") or (name if name in TRAIN else None)
    if kind is None and cfg_path:
        raw = yaml.safe_load(open(cfg_path)) or {}
        kind = raw.get("stage") if isinstance(raw, dict) else None
    if kind not in TRAIN:
        skipped.append(f"{name} ({kind or 'unknown kind'})")
        continue
    if cfg_path is None:
        fail(f"{where}: config {config!r} not found (from {os.getcwd()} or {repo})")
    overrides = st.get("overrides") or []
    if not isinstance(overrides, list) or not all(isinstance(o, str) and "=" in o for o in overrides):
        fail(f"{where}: 'overrides' must be a list of 'key=value' strings")
    opts = st.get("sbatch") or []
    if not isinstance(opts, list) or not all(isinstance(o, str) for o in opts):
        fail(f"{where}: 'sbatch' must be a list of sbatch option strings")
    out = os.path.abspath(st["output_dir"]) if st.get("output_dir") else os.path.join(root, name)
    gen = [f"output_dir={out}"] + ([f"train.init_from={prev_out}"] if prev_out else [])
    started = started or name == start
    if started:
        lines.append(" ".join(shlex.quote(x) for x in [kind, name, out, str(len(opts)), *opts, cfg_path, *gen, *overrides]))
    prev_out = out
if start and not started:
    fail(f"--from {start}: no training stage of that name")
if not lines:
    fail("no training stage (pretrain, midtrain, sft, dpo) to submit")
for s in skipped:
    print(f"# not submitted (not a training stage): {s}", file=sys.stderr)
print("\n".join(lines))
PY
)"

prev=""
while IFS= read -r line; do
    eval "f=($line)"
    kind="${f[0]}"; name="${f[1]}"; out="${f[2]}"; n="${f[3]}"
    stage_opts=("${f[@]:4:$n}")
    args=("${f[@]:$((4 + n))}")
    dep=()
    [ -n "$prev" ] && dep=("--dependency=afterok:$prev" "--kill-on-invalid-dep=yes")
    cmd=(sbatch --parsable --job-name="phi4-$name" "${dep[@]}" "${common_opts[@]}" "${stage_opts[@]}"
         "$REPO/slurm/$kind.sbatch" "${args[@]}")
    if [ "$dry_run" = 1 ]; then
        printf '%q ' "${cmd[@]}"; echo
        prev="<$name>"
        continue
    fi
    id="$("${cmd[@]}")"
    id="${id%%;*}"
    echo "$name: $kind job $id${prev:+ after $prev} -> $out"
    prev="$id"
done <<< "$plan"
