"""`python -m train.recipe <recipe.yaml> --dry-run [--gpus N] [--strict]`: the whole chain checked with no data and
no GPU, in seconds, before any compute is booked; then the per-stage plan (GPUs, tokens, steps, days).

Each stage's config is loaded with the runner's own wiring (the commands RecipeRunner builds), and:
- Inputs. Every path a stage reads (mixture sources, sft_path / dpo_path, the first stage's init_from, PTS questions,
  eval task files) is produced by an earlier stage (prepare: <output_dir>/<source>; smoke_data: <recipe>/data/raw;
  train: its run dir; pts: <recipe>/<name>/pairs.jsonl; export: <recipe>/<name>/hf) or exists on disk. A mixture
  source, or any path inside the recipe's output_dir, that is neither is a problem (the chain is mis-wired); any
  other missing path is a dataset you supply (raw corpora, SFT data, judge pairs, benchmarks): listed as "supplied by
  you", a problem only with --strict.
- Batch arithmetic: train.global_batch % (train.micro_batch x the stage's GPUs) == 0, where the stage's GPUs are its
  `nodes` x `gpus_per_node` when the stage sets `nodes`, else --gpus N, else the recipe's nodes x gpus_per_node, else
  nproc (gpus_per_node 0 = nproc).
- Memory: train/plan.py's per-GPU total of the configured layout fits the recipe's `gpu` on those GPUs.
- Transitions. Rule: only a stage whose config says `stage: midtrain` (the context-extension stage) may change
  model.rope_theta from the stage it starts from, or set a model.max_seq_len above the longest train.seq_len trained
  so far; anywhere else either is a problem. A shorter context is allowed and listed. The architecture (width, depth,
  heads, vocabulary) never changes. The last training stage (what export writes) must have model.max_seq_len equal to
  the longest context trained, and to the recipe's export_context when set. Eval recall lengths the model's context
  cannot hold (they would be skipped) are problems too.
Exit 0 when clean, 2 with every problem listed.
"""
from __future__ import annotations

import dataclasses

import os
import time
from contextlib import contextmanager
from pathlib import Path

from data.configfile import ConfigError
from data.prepare import PrepareConfig
from data.post.config import PostDataConfig
from data.post.run import post_outputs
from data.post_mixture import dpo_share_warning
from data.synth.config import SynthConfig
from data.synth.pipeline import DATASET_TYPES
from train.config import REPO_ROOT, RunConfig, grad_accum_steps, load_config
from train.eval.config import EvalConfig
from train.plan import GIB, Hardware, plan_stage
from train.pts.config import PTSConfig
from train.recipe.runner import Recipe, RecipeRunner, RecipeStage, StageFailed

RECALL_ANSWER_TOKENS = 32  # room the recall probe needs after its prompt: the quoted value plus a few tokens
ARCHITECTURE = ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim")
MFU = 0.40  # train/plan.py's default


def stage_resources(recipe: Recipe, stage: RecipeStage) -> dict:
    """The stage's Slurm resources as the recipe states them (a stage's own value wins over the recipe's); 0 / "" =
    not stated. One-task stages always run on one node, with the GPUs of their own `gpus_per_node` (the recipe's is
    the training nodes' size)."""
    t = stage.time or recipe.time
    if stage.kind != "train":
        return {"nodes": 1, "gpus_per_node": stage.gpus_per_node, "time": t}
    return {"nodes": stage.nodes or recipe.nodes, "gpus_per_node": stage.gpus_per_node or recipe.gpus_per_node,
            "time": t}


def sbatch_options(recipe: Recipe, stage: RecipeStage) -> list[str]:
    """--nodes / --gpus-per-node / --time for the stage's job, only those the recipe states (slurm/submit_recipe.sh)."""
    r = stage_resources(recipe, stage)
    return [f"--{k.replace('_', '-')}={v}" for k, v in r.items() if v]


def stage_gpus(recipe: Recipe, stage: RecipeStage, gpus: int = 0) -> int:
    """Data-parallel ranks of a training stage: its own nodes, else --gpus, else the recipe's nodes, else nproc."""
    gpn = stage.gpus_per_node or recipe.gpus_per_node or stage.nproc or recipe.nproc
    if stage.nodes:
        return stage.nodes * gpn
    if gpus:
        return gpus
    return recipe.nodes * gpn if recipe.nodes else (stage.nproc or recipe.nproc)


def _abs(path: str) -> Path:
    p = Path(path)
    return (p if p.is_absolute() else REPO_ROOT / p).resolve()  # the runner runs every stage from the repo root


@contextmanager
def _recipe_env(out: Path):
    """PHI4_RECIPE_DIR as the runner sets it for its stages, so `${oc.env:PHI4_RECIPE_DIR,...}` resolves the same."""
    old = os.environ.get("PHI4_RECIPE_DIR")
    os.environ["PHI4_RECIPE_DIR"] = str(out)
    try:
        yield
    finally:
        if old is None:
            del os.environ["PHI4_RECIPE_DIR"]
        else:
            os.environ["PHI4_RECIPE_DIR"] = old


class DryRun:
    def __init__(self, recipe: Recipe, gpus: int = 0):
        self.recipe, self.gpus = recipe, gpus
        self.runner = RecipeRunner(recipe, log=lambda *_: None)
        self.out = self.runner.out
        self.produced: list[Path] = []
        self.problems: list[str] = []
        self.supplied: list[str] = []
        self.notes: list[str] = []
        self.rows: list[dict] = []
        self.train_cfgs: list[tuple[str, RunConfig]] = []
        self.longest = 0  # the longest train.seq_len trained so far

    def problem(self, stage: str, key: str, message: str) -> None:
        self.problems.append(f"{stage}: {key}: {message}" if key else f"{stage}: {message}")

    def _made(self, p: Path) -> bool:
        return any(p == q or q in p.parents for q in self.produced)

    def need(self, stage: str, key: str, path: str, wired: bool = False) -> None:
        """`path` must come from an earlier stage or exist; `wired`: only an earlier stage may make it (else a problem
        rather than a dataset you supply)."""
        if not path:
            self.problem(stage, key, "is empty: the stage has nothing to read")
            return
        p = _abs(path)
        if self._made(p) or p.exists():
            return
        if wired or self.out == p or self.out in p.parents:
            self.problem(stage, key, f"{path}: no earlier stage produces it and it does not exist")
        else:
            self.supplied.append(f"{stage}: {key}: supplied by you: {path} (not found)")

    def _args(self, stage: RecipeStage, module: str) -> list[str]:
        """The stage's config and its overrides exactly as the runner passes them (config first)."""
        cmd = self.runner._command(stage)
        return cmd[cmd.index(module) + 1:]

    def run(self) -> None:
        for stage in self.recipe.stages:
            try:
                getattr(self, f"_{stage.kind}")(stage)
            except (ConfigError, StageFailed, ValueError) as e:  # ValueError: PrepareConfig.validate's messages
                self.problem(stage.name, "config", str(e))
                self.rows.append({"name": stage.name, "kind": stage.kind})
            if stage.kind == "train":
                self.runner.last_train = self.runner.stage_dir(stage.name)
        self._final_context()

    def _smoke_data(self, stage: RecipeStage) -> None:
        self.produced.append(self.out / "data" / "raw")  # data.smoke writes every smoke input there
        self.rows.append({"name": stage.name, "kind": stage.kind})

    def _synth(self, stage: RecipeStage) -> None:
        args = self._args(stage, "train.synth")
        cfg = load_config(args[0], args[1:], schema=SynthConfig)
        s = cfg.seeds
        for key, paths in (("seeds.inputs", s.inputs), ("questions.organic", cfg.questions.organic),
                           ("reversal.inputs", cfg.reversal.inputs)):
            for i, path in enumerate(paths):
                self.need(stage.name, f"{key}[{i}]", path)
        for i, b in enumerate(cfg.decontaminate.benchmarks):
            self.need(stage.name, f"decontaminate.benchmarks[{i}] ({b.name}).path", b.path)
        for t in DATASET_TYPES:
            self.produced.append(_abs(cfg.output_dir) / f"{cfg.name}.{t}.jsonl")
        self.rows.append({"name": stage.name, "kind": stage.kind, **stage_resources(self.recipe, stage)})

    def _post(self, stage: RecipeStage) -> None:
        args = [a for a in self._args(stage, "train.post") if not a.startswith("policy_model=")]
        cfg = load_config(args[0], args[1:], schema=PostDataConfig)
        inputs = {"sft": [("sft.prompts", cfg.sft.prompts, cfg.sft.enabled)],
                  "dpo": [("judge_pairs.prompts", cfg.judge_pairs.prompts, cfg.judge_pairs.enabled)]}
        common = [("hallucination.questions", cfg.hallucination.questions, cfg.hallucination.enabled),
                  ("safety.prompts", cfg.safety.prompts, cfg.safety.enabled)]
        for make in cfg.make:
            for key, paths, enabled in inputs[make] + common:
                for i, path in enumerate(paths if enabled else []):
                    self.need(stage.name, f"{key}[{i}]", path)
        for name in post_outputs(cfg):
            self.produced.append(_abs(cfg.output_dir) / name)
        self.rows.append({"name": stage.name, "kind": stage.kind, **stage_resources(self.recipe, stage)})

    def _prepare(self, stage: RecipeStage) -> None:
        args = self._args(stage, "data.prepare")
        cfg = load_config(args[0], args[1:], schema=PrepareConfig)
        for i, src in enumerate(cfg.sources):
            for path in src.input_paths():
                self.need(stage.name, f"sources[{i}] ({src.name}).path", path)
            self.produced.append(_abs(cfg.output_dir) / src.name)
        self.rows.append({"name": stage.name, "kind": stage.kind})

    def _train(self, stage: RecipeStage) -> None:
        args = self._args(stage, "train")
        cfg = load_config(args[0], args[1:])
        n, d, t = stage.name, cfg.data, cfg.train
        if cfg.stage in ("pretrain", "midtrain"):
            if not d.sources:
                self.problem(n, "data.sources", "is empty: a pretrain/midtrain stage reads a mixture")
            for i, src in enumerate(d.sources):
                self.need(n, f"data.sources[{i}] ({src.name}).path", src.path, wired=True)
        else:
            kind = "sft" if cfg.stage == "sft" else "dpo"
            if getattr(d, f"{kind}_sources"):
                for i, src in enumerate(d.sft_sources if kind == "sft" else d.dpo_sources):
                    self.need(n, f"data.{kind}_sources[{i}] ({src.name}).path", src.path)
            else:
                self.need(n, f"data.{kind}_path", getattr(d, f"{kind}_path"))
            warning = dpo_share_warning(d) if kind == "dpo" else None
            if warning:
                self.notes.append(f"{n}: {warning}")
        if t.init_from and not self.train_cfgs:  # later stages are wired to the previous one by the runner
            self.need(n, "train.init_from", t.init_from)
        if t.eval_config:
            self.need(n, "train.eval_config", t.eval_config)
        gpus = stage_gpus(self.recipe, stage, self.gpus)
        try:
            grad_accum_steps(cfg, gpus)
        except ConfigError as e:
            self.problem(n, "batch", f"{e} (the stage's GPUs: nodes x gpus_per_node in the recipe)")
        hw = Hardware(self.recipe.gpu, gpus, MFU, 4.0)
        p = plan_stage(cfg, hw)
        need = p["total_bytes"][p["configured"]]
        if not p["fits"][p["configured"]]:
            self.problem(n, "memory", f"needs {need / GIB:.1f} GiB per GPU on {p['gpus_used']:,} x {hw.gpu}, which "
                                      f"has {hw.capacity_bytes / GIB:.1f} GiB (python -m train.plan {args[0]} "
                                      f"--gpus {gpus})")
        self._transition(n, cfg)
        self.train_cfgs.append((n, cfg))
        self.produced.append(self.runner.stage_dir(n))
        self.rows.append({"name": n, "kind": f"{stage.kind}:{cfg.stage}", "gpus": gpus, "tokens": t.total_tokens,
                          "steps": t.max_steps, "days": p["days"], "days_comm": p["days_with_comm"],
                          "memory": need / GIB,
                          "fits": p["fits"][p["configured"]], "seq_len": t.seq_len,
                          "context": cfg.model.max_seq_len, "rope_theta": cfg.model.rope_theta,
                          **stage_resources(self.recipe, stage)})

    def _transition(self, name: str, cfg: RunConfig) -> None:
        """The rule of the module docstring, between this stage and the training stage it starts from."""
        m = cfg.model
        if not self.train_cfgs:
            self.longest = cfg.train.seq_len
            return
        prev_name, prev = self.train_cfgs[-1]
        for key in ARCHITECTURE:
            if getattr(m, key) != getattr(prev.model, key):
                self.problem(name, f"model.{key}", f"{getattr(prev.model, key)} in {prev_name}, {getattr(m, key)} "
                                                   "here: the weights it starts from do not fit")
        extends = cfg.stage == "midtrain"
        changes = []
        if m.rope_theta != prev.model.rope_theta:
            changes.append(f"rope_theta {prev.model.rope_theta:g} -> {m.rope_theta:g}")
            if not extends:
                self.problem(name, "model.rope_theta", f"{m.rope_theta:g} after {prev.model.rope_theta:g} in "
                             f"{prev_name}: only a midtrain (context-extension) stage may change RoPE theta; keep "
                             f"{prev.model.rope_theta:g}")
        if m.max_seq_len != prev.model.max_seq_len:
            changes.append(f"max_seq_len {prev.model.max_seq_len:,} -> {m.max_seq_len:,}")
        if m.max_seq_len > self.longest and not extends:
            self.problem(name, "model.max_seq_len", f"{m.max_seq_len:,} exceeds the longest context trained so far "
                         f"({self.longest:,}): only a midtrain (context-extension) stage may grow the context")
        if changes:
            shorter_only = m.max_seq_len <= self.longest and len(changes) == 1
            why = "declared: a midtrain stage" if extends else (
                f"within the longest context trained, {self.longest:,}: allowed" if shorter_only else "refused")
            self.notes.append(f"{name}: {', '.join(changes)} from {prev_name} ({why})")
        self.longest = max(self.longest, cfg.train.seq_len)

    def _final_context(self) -> None:
        if not self.train_cfgs:
            return
        name, cfg = self.train_cfgs[-1]
        want = self.recipe.export_context or self.longest
        ctx = cfg.model.max_seq_len
        if ctx != self.longest or ctx != want:
            self.problem(name, "model.max_seq_len", f"{ctx:,} in the last training stage (what export writes as "
                         f"max_position_embeddings); the longest context trained is {self.longest:,}"
                         + (f" and the recipe's export_context is {want:,}" if self.recipe.export_context else ""))
        else:
            self.notes.append(f"export: a {ctx:,}-token model (max_seq_len of {name}, the longest context trained)")

    def _model_context(self, stage: RecipeStage) -> int:
        """max_seq_len of the model a pts/export/eval stage uses: its model_from's, else the last training stage's."""
        src = stage.model_from
        while src:
            s = next(x for x in self.recipe.stages if x.name == src)
            if s.kind == "train":
                return dict(self.train_cfgs)[s.name].model.max_seq_len
            src = s.model_from
        return self.train_cfgs[-1][1].model.max_seq_len if self.train_cfgs else 0

    def _pts(self, stage: RecipeStage) -> None:
        args = self._args(stage, "train.pts")
        cfg = load_config(args[0], args[1:], schema=PTSConfig)
        self.need(stage.name, "questions", cfg.questions)
        self.produced.append(_abs(cfg.output))
        self.rows.append({"name": stage.name, "kind": stage.kind, **stage_resources(self.recipe, stage)})

    def _export(self, stage: RecipeStage) -> None:
        self.runner._model_dir(stage)  # StageFailed when there is no model to export
        self.produced.append(self.runner.stage_dir(stage.name))
        self.rows.append({"name": stage.name, "kind": stage.kind, "context": self._model_context(stage),
                          **stage_resources(self.recipe, stage)})

    def _eval(self, stage: RecipeStage) -> None:
        args = self._args(stage, "train.eval")
        cfg = load_config(args[0], args[1:], schema=EvalConfig)
        sections = [f.name for f in dataclasses.fields(cfg) if isinstance(getattr(cfg, f.name), list)]
        for section in sections:  # every task list (multiple_choice, generative, chat, long_context, perplexity)
            for i, task in enumerate(getattr(cfg, section)):
                self.need(stage.name, f"{section}[{i}] ({task.name}).path", task.path)
                if getattr(task, "fewshot_path", ""):
                    self.need(stage.name, f"{section}[{i}] ({task.name}).fewshot_path", task.fewshot_path)
        ctx = self._model_context(stage)
        for i, length in enumerate(cfg.recall.lengths):
            if ctx and length + RECALL_ANSWER_TOKENS > ctx and not cfg.recall.allow_beyond_context:
                self.problem(stage.name, f"recall.lengths[{i}]", f"{length:,}: the probe needs {length:,} + its "
                             f"answer (~{RECALL_ANSWER_TOKENS} tokens) within the model's context {ctx:,}; it would "
                             "be skipped")
        self.rows.append({"name": stage.name, "kind": stage.kind, "context": ctx,
                          **stage_resources(self.recipe, stage)})


def format_rows(rows: list[dict]) -> str:
    head = (f"{'stage':11s} {'kind':15s} {'nodes':>5s} {'GPUs':>6s} {'tokens':>19s} {'steps':>8s} {'days':>6s} "
            f"{'+comm':>6s} {'seq':>6s} {'context':>7s} {'theta':>7s}  memory/GPU")
    lines = [head]
    for r in rows:
        if "steps" not in r:
            ctx = f"{r['context']:7,d}" if r.get("context") else f"{'':7s}"
            lines.append(f"{r['name']:11s} {r['kind']:15s} {r.get('nodes', '') or '':>5} {'':6s} {'':19s} {'':8s} "
                         f"{'':6s} {'':6s} {'':6s} {ctx}")
            continue
        lines.append(f"{r['name']:11s} {r['kind']:15s} {r['nodes'] or '':>5} {r['gpus']:6,d} {r['tokens']:19,d} "
                     f"{r['steps']:8,d} {r['days']:6.2f} {r['days_comm']:6.2f} {r['seq_len']:6,d} {r['context']:7,d} "
                     f"{r['rope_theta']:7g}  "
                     f"{r['memory']:.1f} GiB {'fits' if r['fits'] else 'DOES NOT FIT'}")
    days, days_comm = sum(r.get("days", 0.0) for r in rows), sum(r.get("days_comm", 0.0) for r in rows)
    lines.append(f"{'total':11s} {'':15s} {'':5s} {'':6s} {sum(r.get('tokens', 0) for r in rows):19,d} {'':8s} "
                 f"{days:6.2f} {days_comm:6.2f}")
    lines.append("days: compute only at the MFU above; +comm: with the communication overlap_comm cannot hide "
                 "(train/plan.py INTERCONNECT: its bandwidths are ASSUMPTIONs)")
    return "\n".join(lines)


def dry_run(recipe: Recipe, path: str, gpus: int = 0, strict: bool = False, log=print) -> int:
    """Check the whole chain and print the plan; 0 when clean, 2 with every problem listed."""
    t0 = time.perf_counter()
    check = DryRun(recipe, gpus)
    with _recipe_env(check.out):
        check.run()
    log(f"[dry-run] {path}: {len(recipe.stages)} stages in {check.out}, planned on {recipe.gpu} at {MFU:.0%} MFU")
    log(format_rows(check.rows))
    for note in check.notes:
        log(f"transition: {note}")
    for line in check.supplied:
        log(line)
    problems = check.problems + (check.supplied if strict else [])
    for line in problems:
        log(f"problem: {line}")
    verdict = f"{len(problems)} problem(s)" if problems else "no problems"
    log(f"[dry-run] {verdict}; {len(check.supplied)} dataset(s) you supply not found; "
        f"checked in {time.perf_counter() - t0:.1f} s")
    return 2 if problems else 0
