"""`python -m train.recipe <recipe.yaml> [key=value ...] [--stage NAME | --summary | --dry-run [--gpus N] [--strict]]`:
the command line of the recipe runner (train/recipe/runner.py) and its dry run (train/recipe/dry_run.py)."""
from __future__ import annotations

import sys
from pathlib import Path

from train.config import ConfigError, load_config
from train.recipe.dry_run import dry_run
from train.recipe.runner import Recipe, RecipeRunner, StageFailed


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    usage = ("usage: python -m train.recipe <recipe.yaml> [key=value ...] "
             "[--stage NAME | --summary | --dry-run [--gpus N] [--strict]]")
    if not args or args[0] in ("-h", "--help"):
        print(usage)
        return 0 if args else 2
    only, summary_only, dry, strict, gpus, overrides = None, False, False, False, 0, []
    rest = iter(args[1:])
    for a in rest:
        if a == "--stage":
            only = next(rest, None)
            if not only:
                print(f"--stage needs a stage name\n{usage}", file=sys.stderr)
                return 2
        elif a == "--summary":
            summary_only = True
        elif a == "--dry-run":
            dry = True
        elif a == "--strict":
            strict = True
        elif a == "--gpus":
            value = next(rest, "")
            if not value.isdigit() or int(value) < 1:
                print(f"--gpus needs a positive number of GPUs, got {value!r}\n{usage}", file=sys.stderr)
                return 2
            gpus = int(value)
        else:
            overrides.append(a)
    if sum((only is not None, summary_only, dry)) > 1 or ((gpus or strict) and not dry):
        print(f"--stage, --summary and --dry-run are exclusive; --gpus and --strict go with --dry-run\n{usage}",
              file=sys.stderr)
        return 2
    try:
        recipe = load_config(args[0], overrides, schema=Recipe)
        if dry:
            return dry_run(recipe, args[0], gpus=gpus, strict=strict)
        runner = RecipeRunner(recipe)
        if summary_only:
            runner.summarize()
        else:
            runner.run(only)
    except ConfigError as e:
        print(f"configuration error: {e}", file=sys.stderr)
        return 2
    except StageFailed as e:
        print(f"recipe failed: {e}", file=sys.stderr)
        return 1
    if only is None:
        print(f"[recipe] {'summary' if summary_only else 'complete'}: {Path(recipe.output_dir) / 'summary.md'}")
    return 0
