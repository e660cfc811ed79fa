"""`python -m train.recipe <recipe.yaml> [key=value ...] [--stage NAME | --summary | --dry-run [--gpus N] [--strict]]`:
the whole recipe, stage after stage, from one command.

A recipe lists stages in order; each runs as its own process (torchrun when `nproc` > 1) in `<output_dir>/<name>/`,
and each training stage starts from the previous training stage's weights. A stage already complete is skipped on
re-run, and an interrupted training stage continues from its newest checkpoint (`train.resume=auto`). Paths inside
stage configs may use `${oc.env:PHI4_RECIPE_DIR,...}`: the runner sets it to the recipe's output_dir.
At the end `<output_dir>/summary.md` (+ .json) and `<output_dir>/plots/<stage>.png` say what happened.
`--stage NAME` runs that stage alone (wired as in the whole run), `--summary` only writes the summary from what is on
disk: slurm/submit_recipe.sh uses both, so a Slurm chain leaves the same records as a local run. `--dry-run` checks
the whole chain with no data and no GPU (train/recipe/dry_run.py) and prints its per-stage plan.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from data.fileio import atomic_write
from train.config import REPO_ROOT, ConfigError

KINDS = ("smoke_data", "synth", "post", "prepare", "train", "pts", "export", "eval")
# Slurm's --time formats: minutes, minutes:seconds, hours:minutes:seconds, days-hours[:minutes[:seconds]]
SLURM_TIME = re.compile(r"^(\d+(:\d{1,2}){0,2}|\d+-\d+(:\d{1,2}){0,2})$")


@dataclass
class RecipeStage:
    name: str = ""
    kind: str = "train"  # smoke_data | synth | post | prepare | train | pts | export | eval
    config: str = ""  # the stage's own config file (not for smoke_data / export)
    overrides: list[str] = field(default_factory=list)
    nproc: int = 0  # processes for a train stage; 0 = the recipe's nproc
    model_from: str = ""  # post / pts / export / eval: the stage whose model to use; default: the last train stage
    gguf: str = ""  # export: also write a GGUF of this type (f32 | f16 | bf16 | q8_0) for llama.cpp / Ollama; "" = none
    # Resources of the stage's Slurm job (slurm/submit_recipe.sh) and its world size in the dry run; 0 / "" = the
    # recipe's value. Only train stages run on several nodes; the others are one task on one node.
    nodes: int = 0
    gpus_per_node: int = 0
    time: str = ""  # Slurm time limit of one job (a training job requeues itself at the limit and resumes)

    def gguf_path(self, stage_dir: Path) -> Path | None:
        """Where this export stage writes its GGUF file (the Modelfile goes beside it); None without one."""
        return stage_dir / "gguf" / f"model-{self.gguf}.gguf" if self.gguf else None


@dataclass
class Recipe:
    output_dir: str = "runs/recipe"
    nproc: int = 1  # processes per training stage (torchrun when > 1)
    seed: int = 1234  # smoke_data
    # Defaults of the stages' resources (RecipeStage.nodes, ...); 0 / "" = the sbatch script's own #SBATCH value,
    # and for the dry run's world size: --gpus N, else nodes x gpus_per_node, else nproc.
    nodes: int = 0
    gpus_per_node: int = 0  # 0 = nproc
    time: str = ""
    gpu: str = "h100-80gb"  # the dry run's memory and time plan (train/plan.py GPUS)
    export_context: int = 0  # the context the final model must have (dry run); 0 = the longest context trained
    stages: list[RecipeStage] = field(default_factory=list)

    def validate(self) -> None:
        names = [s.name for s in self.stages]
        if not names or len(set(names)) != len(names) or not all(names):
            raise ConfigError(f"stages need unique, non-empty names; got {names}")
        for i, s in enumerate(self.stages):
            if s.kind not in KINDS:
                raise ConfigError(f"stages[{i}] ({s.name}).kind={s.kind!r}; expected one of {list(KINDS)}")
            if s.kind in ("synth", "post", "prepare", "train", "pts", "eval") and not s.config:
                raise ConfigError(f"stages[{i}] ({s.name}) of kind {s.kind} needs a config")
            if s.config and not (REPO_ROOT / s.config).is_file() and not Path(s.config).is_file():
                raise ConfigError(f"stages[{i}] ({s.name}).config={s.config!r} does not exist")
            if s.model_from and s.model_from not in names[:i]:
                raise ConfigError(f"stages[{i}] ({s.name}).model_from={s.model_from!r} is not an earlier stage")
            if s.gguf:
                from train.export.gguf import GGUF_TYPES

                if s.kind != "export":
                    raise ConfigError(f"stages[{i}] ({s.name}).gguf is for export stages, not kind {s.kind}")
                if s.gguf not in GGUF_TYPES:
                    raise ConfigError(f"stages[{i}] ({s.name}).gguf={s.gguf!r}; expected one of {sorted(GGUF_TYPES)} "
                                      "or \"\" for none")
            if s.nodes < 0 or s.gpus_per_node < 0 or (s.nodes > 1 and s.kind != "train"):
                raise ConfigError(f"stages[{i}] ({s.name}): nodes={s.nodes}, gpus_per_node={s.gpus_per_node}; "
                                  "expected >= 0 (0 = the recipe's), and nodes > 1 only for train stages")
            if s.time and not SLURM_TIME.match(s.time):
                raise ConfigError(f"stages[{i}] ({s.name}).time={s.time!r}; expected a Slurm time such as 48:00:00 "
                                  "or 2-00:00:00")
        from train.plan import GPUS

        if self.nodes < 0 or self.gpus_per_node < 0 or self.export_context < 0:
            raise ConfigError(f"nodes={self.nodes}, gpus_per_node={self.gpus_per_node}, export_context="
                              f"{self.export_context}: expected >= 0")
        if self.time and not SLURM_TIME.match(self.time):
            raise ConfigError(f"time={self.time!r}; expected a Slurm time such as 48:00:00 or 2-00:00:00")
        if self.gpu not in GPUS:
            raise ConfigError(f"gpu={self.gpu!r}; expected one of {sorted(GPUS)}")


def dead_run(run_dir: Path) -> str:
    """A trainer that recorded "running" on this host but whose process is gone (killed without a word: the OOM
    killer, SIGKILL, a lost node); "" when the run is not known to be dead."""
    path = run_dir / "exit_status.json"
    try:
        status = json.loads(path.read_text())
    except (OSError, ValueError):
        return ""
    if status.get("status") != "running" or status.get("host") != socket.gethostname() or not status.get("pid"):
        return ""
    try:
        os.kill(int(status["pid"]), 0)
        return ""  # alive (or another process took the pid: not provably dead)
    except ProcessLookupError:
        return (f"{path} says running, but process {status['pid']} on "
                f"{status['host']} is gone (it died without recording why)")
    except PermissionError:
        return ""


class StageFailed(RuntimeError):
    pass


class RecipeRunner:
    def __init__(self, recipe: Recipe, log=print):
        self.recipe = recipe
        self.out = Path(recipe.output_dir).resolve()
        self.log = log
        self.env = {**os.environ, "PHI4_RECIPE_DIR": str(self.out), "PYTHONPATH": str(REPO_ROOT)}
        self.last_train: Path | None = None

    def stage_dir(self, name: str) -> Path:
        return self.out / name

    def run(self, only: str | None = None) -> list[dict]:
        """Every stage in order, then the summary; or only the stage named `only` (no summary)."""
        if only is not None and only not in [s.name for s in self.recipe.stages]:
            raise ConfigError(f"--stage {only}: no such stage (stages: {[s.name for s in self.recipe.stages]})")
        self.out.mkdir(parents=True, exist_ok=True)
        results = []
        for stage in self.recipe.stages:
            if only is None or stage.name == only:
                results.append(self._run_stage(stage))
            if stage.kind == "train":
                self.last_train = self.stage_dir(stage.name)
        if only is None:
            self.summarize(results)
        return results

    def summarize(self, results: list[dict] | None = None) -> dict:
        """summary.md/.json and plots; without `results`, each stage's record as found on disk ("not run" if none)."""
        from train.recipe.summary import write_summary

        if results is None:
            results = [self._done(s) or {"name": s.name, "kind": s.kind, "status": "not run"}
                       for s in self.recipe.stages]
        return write_summary(self.out, self.recipe, results)

    def _model_dir(self, stage: RecipeStage) -> Path:
        if stage.model_from:
            src = next(s for s in self.recipe.stages if s.name == stage.model_from)
            return self.stage_dir(src.name) / ("hf" if src.kind == "export" else "")
        if self.last_train is None:
            raise StageFailed(f"stage {stage.name}: no earlier training stage to take the model from")
        return self.last_train

    def _command(self, stage: RecipeStage) -> list[str]:
        d, py = self.stage_dir(stage.name), sys.executable
        extra = list(stage.overrides)
        if stage.kind == "smoke_data":
            return [py, "-m", "data.smoke", str(self.out / "data" / "raw"), "--seed", str(self.recipe.seed)]
        if stage.kind == "synth":  # one process here; on Slurm, slurm/submit_synth.sh runs it as an array + merge
            return [py, "-m", "train.synth", stage.config, *extra]
        if stage.kind == "post":  # post-training data; the policy is the previous training stage's model
            policy = [f"policy_model={self._model_dir(stage)}"] if self.last_train or stage.model_from else []
            return [py, "-m", "train.post", stage.config, *policy, *extra]
        if stage.kind == "prepare":
            return [py, "-m", "data.prepare", stage.config, *extra]
        if stage.kind == "train":
            wiring = [f"output_dir={d}", "train.resume=auto"]
            if self.last_train is not None:
                wiring.append(f"train.init_from={self.last_train}")
            nproc = stage.nproc or self.recipe.nproc
            launcher = [py, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] \
                if nproc > 1 else [py]
            return [*launcher, "-m", "train", stage.config, *wiring, *extra]
        if stage.kind == "pts":
            return [py, "-m", "train.pts", stage.config, f"model={self._model_dir(stage)}",
                    f"output={d / 'pairs.jsonl'}", *extra]
        if stage.kind == "export":
            gguf = ["--gguf", str(stage.gguf_path(d)), "--gguf-type", stage.gguf] if stage.gguf else []
            return [py, "-m", "train.export", str(self._model_dir(stage)), str(d / "hf"), "--overwrite", *gguf,
                    *extra]
        return [py, "-m", "train.eval", stage.config, f"model_path={self._model_dir(stage)}", f"output_dir={d}",
                f"label={stage.name}", *extra]

    def _done(self, stage: RecipeStage) -> dict | None:
        marker = self.stage_dir(stage.name) / "stage.json"
        if marker.is_file():
            record = json.loads(marker.read_text())
            return record if record.get("status") == "completed" else None
        exit_status = self.stage_dir(stage.name) / "exit_status.json"
        if stage.kind == "train" and exit_status.is_file():  # run by a Slurm job: the trainer's own record
            status = json.loads(exit_status.read_text())
            if status.get("status") == "completed":
                return {"name": stage.name, "kind": stage.kind, "status": "completed", "seconds": None,
                        "step": status.get("step"), "source": str(exit_status)}
        return None

    def _run_stage(self, stage: RecipeStage) -> dict:
        done = self._done(stage)
        if done is not None:
            took = f"{done['seconds']:.0f} s" if done.get("seconds") is not None else done.get("source", "")
            self.log(f"[recipe] {stage.name}: already complete ({took}), skipped")
            return done
        dead = dead_run(self.stage_dir(stage.name))
        if dead:
            self.log(f"[recipe] {stage.name}: {dead}; running it again (it resumes from its newest checkpoint)")
        d = self.stage_dir(stage.name)
        d.mkdir(parents=True, exist_ok=True)
        cmd = self._command(stage)
        self.log(f"[recipe] {stage.name} ({stage.kind}): {shlex.join(cmd)}")
        t0 = time.time()
        with open(d / "stage.log", "a") as logf:
            proc = subprocess.run(cmd, cwd=REPO_ROOT, env=self.env, stdout=logf, stderr=subprocess.STDOUT)
        seconds = time.time() - t0
        record = {"name": stage.name, "kind": stage.kind, "command": cmd, "seconds": seconds,
                  "status": "completed" if proc.returncode == 0 else "failed", "returncode": proc.returncode}
        atomic_write(d / "stage.json", json.dumps(record, indent=2))
        if proc.returncode != 0:
            tail = (d / "stage.log").read_text()[-3000:]
            raise StageFailed(f"stage {stage.name} failed (exit {proc.returncode}); log {d / 'stage.log'}:\n{tail}")
        self.log(f"[recipe] {stage.name}: done in {seconds:.0f} s")
        return record
