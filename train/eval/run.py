"""Evaluation of a checkpoint, a run or an exported Hugging Face directory: `python -m train.eval <config.yaml> [k=v]`.

Tasks (Phi-4 report §3 and §5), each giving one result record, on jsonl files of our schema or, with a task's
`source`, on a benchmark's own published files (MMLU, ARC, GSM8K, MATH, TriviaQA, MBPP, HumanEval in their Hugging
Face layouts; `data/benchmarks.py`):
- multiple choice by log-likelihood, k-shot (MMLU / ARC style): every choice is scored by the sum of its tokens'
  log-probs after the prompt; reported as lm-evaluation-harness's `acc` (sum) and `acc_norm` (sum per character of
  the choice), and as `acc_per_token` (sum per token, ours); `primary` picks which one `accuracy` repeats;
- generative few-shot (GSM8K / MATH style): greedy or sampled completions, plain few-shot text (base models) or the
  chat template (chat models), or a prompt completed as it is (HumanEval), checked by `data.verify.answers` (answer
  match; exact match with any alias for TriviaQA; unit tests in the sandbox for code items);
- perplexity per source (prepared shards or jsonl text), token-weighted, and aggregated per provenance
  (synthetic vs organic): each document is scored alone, in windows of seq_len, every token after its first once;
- long-context JSON key-value recall (HELMET's recall task): a JSON object of random UUID pairs filling exactly the
  target length in tokens, then the value of one key; scored by exact match and substring match (SubEM).
Results go to `<output_dir>/results.jsonl` (one record per task), per-item samples to `<output_dir>/samples/`, and
wandb under `eval/`. `evaluate(model, tokenizer, cfg, device)` is the in-loop entry point (flat metric dict).
The tasks are implemented in `train/eval/tasks.py` (multiple choice, generative), `train/eval/perplexity.py` and
`train/eval/recall.py`; this file holds model loading, running and results. With `--shard I/N` a process scores the
items n % N == I of every task (one Slurm array task) and `--merge N` joins them (`train/eval/shards.py`).

Distributed use: every rank runs every task on the same items, so forwards match rank for rank (ZeRO-3 safe). Under
ZeRO-3 (parameters carry `ds_id`) generation never stops early: it runs max_new_tokens steps on every rank and the
completions are cut at the first stop token afterwards, so no rank waits in a collective the others left.
"""
from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

from data.arrays import split_array_flags
from data.fileio import JsonlError, atomic_write, read_jsonl
from data.tokenizer import Phi4Tokenizer
from model.transformer import Transformer
from train.checkpoint import load_model
from train.config import ConfigError, load_config, to_dict
from train.distributed import DTYPES, resolve_device, resolve_precision
from train.eval.config import EvalConfig
from train.eval.recall import eval_recall
from train.eval.perplexity import eval_perplexity
from train.eval.shards import completed_shard, merge_shards, shard_path, write_shard
from train.eval.chat import chat_metrics, check_chat_inputs, eval_chat
from train.eval.helmet import check_long_context_inputs, eval_long_context, long_context_metrics
from train.eval.tasks import eval_generative, eval_multiple_choice, gen_metrics, mc_metrics, task_rows

log = logging.getLogger("eval")


# ---- running ----------------------------------------------------------------------------------------------------
KIND_PREFIX = {"multiple_choice": "mc", "generative": "gen", "perplexity": "ppl",
               "perplexity_by_provenance": "ppl_by_provenance", "recall": "recall", "chat": "chat",
               "long_context": "lc"}
# Config section -> (its task function, its metrics from samples). A task function takes (model, tok, task, cfg,
# device, shard) and returns {"task", "kind" (the section's name), "metrics", "samples"}; every sample carries
# "index", its item's position in the whole task, and the metrics are a function of the samples alone, so the merge
# of array shards (train/eval/shards.py) recomputes exactly what one process reports.
TASK_SECTIONS = {
    "multiple_choice": (eval_multiple_choice, mc_metrics),
    "generative": (eval_generative, gen_metrics),
    "chat": (eval_chat, chat_metrics),
    "long_context": (eval_long_context, long_context_metrics),
}
# Config section -> its check of one task's inputs, check(task, key) with key e.g. "chat[0] (mmlu)": raises ConfigError
# or BenchmarkError naming the missing file and the layout expected, before a model is loaded.
INPUT_CHECKS: dict = {
    "chat": check_chat_inputs,
    "long_context": check_long_context_inputs,
}


def run_tasks(model, tok, cfg: EvalConfig, device, shard: tuple[int, int] = (0, 1)) -> list[dict]:
    """Every configured task (only its items n % N == I for array shard (I, N)); one record each, with `samples`."""
    was_training = model.training
    model.eval()
    records = []
    try:
        for section, (fn, _) in TASK_SECTIONS.items():
            for task in getattr(cfg, section):
                t0 = time.perf_counter()
                record = {**fn(model, tok, task, cfg, device, shard), "time_s": time.perf_counter() - t0}
                # the paper's number for this protocol, for the recipe summary: a number (compared with `accuracy`),
                # or {metric: number} when the task function sets it itself
                if task.paper_score is not None and "paper_score" not in record:
                    record["paper_score"] = task.paper_score
                records.append(record)
        if cfg.perplexity:
            records += eval_perplexity(model, tok, cfg.perplexity, cfg, device, shard)
        if cfg.recall.lengths:
            t0 = time.perf_counter()
            records.append({**eval_recall(model, tok, cfg.recall, cfg, device, shard),
                            "time_s": time.perf_counter() - t0})
    finally:
        model.train(was_training)
    return records


def flatten(records: list[dict]) -> dict[str, float]:
    """eval/<kind>/<task>/<metric> -> value, the names logged to wandb and metrics.jsonl."""
    return {f"eval/{KIND_PREFIX[r['kind']]}/{r['task']}/{k}": v for r in records for k, v in r["metrics"].items()}


def evaluate(model: Transformer, tokenizer, cfg: EvalConfig, device) -> dict[str, float]:
    """In-loop entry point: every task of `cfg` on `model` (a plain Transformer, or the engine's module)."""
    return flatten(run_tasks(model, tokenizer, cfg, device))


def check_inputs(cfg: EvalConfig) -> None:
    """Fail before loading a model when an input is missing or a jsonl row is malformed (file and line named)."""
    if not cfg.model_path or not Path(cfg.model_path).exists():
        raise ConfigError(f"model_path={cfg.model_path!r} does not exist (a run dir, a checkpoint dir or an HF dir)")
    required = {"multiple_choice": ("question", "choices", "answer"), "generative": ("answer",), "perplexity": ()}
    for section, keys in required.items():
        for i, t in enumerate(getattr(cfg, section)):
            for key in ("path", "fewshot_path"):
                p = getattr(t, key, "")
                if p and not Path(p).exists() and getattr(t, "source", "jsonl") == "jsonl":  # else: the layout named
                    raise ConfigError(f"{section}[{i}] ({t.name}).{key}={p!r} does not exist")
            if section != "perplexity":  # every file read once, so a bad row or a missing split fails here
                task_rows(t, keys, shots=getattr(t, "k_shot", 0) > 0)
            elif not Path(t.path).is_dir():
                for _ in read_jsonl(t.path, (t.text_field,)):
                    pass
    for section, check in INPUT_CHECKS.items():
        for i, t in enumerate(getattr(cfg, section)):
            check(t, f"{section}[{i}] ({t.name})")


def write_results(cfg: EvalConfig, records: list[dict], info: dict, label: str) -> Path:
    """Append one line per task to results.jsonl (rewritten atomically); per-item samples beside it."""
    out = Path(cfg.output_dir)
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
    lines = []
    for r in records:
        record = {"label": label, "model": info["source"], "step": info["step"], "time": stamp,
                  **{k: v for k, v in r.items() if k != "samples"}}
        if r.get("samples"):
            sample_path = out / "samples" / f"{label.replace('/', '_')}.{KIND_PREFIX[r['kind']]}.{r['task']}.jsonl"
            atomic_write(sample_path, "".join(json.dumps(s) + "\n" for s in r["samples"]))
            record["samples_path"] = str(sample_path)
        lines.append(json.dumps(record) + "\n")
    results = out / "results.jsonl"
    previous = results.read_text() if results.exists() else ""
    atomic_write(results, previous + "".join(lines))
    return results


def _log_wandb(cfg: EvalConfig, metrics: dict, info: dict, label: str) -> None:
    import wandb

    w = cfg.wandb
    run = wandb.init(project=w.project, entity=w.entity or None, name=w.name or label, group=w.group or None,
                     tags=list(w.tags) or None, dir=w.dir or cfg.output_dir, mode=w.mode, job_type="eval",
                     config={**to_dict(cfg), "model_source": info["source"]})
    run.define_metric("step")
    run.define_metric("eval/*", step_metric="step")
    run.log({"step": info["step"] or 0, **metrics})
    run.finish()


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help"):
        print("usage: python -m train.eval <config.yaml> [key=value ...] [--shard I/N | --merge N]\n"
              "  (e.g. model_path=runs/smoke/sft; --shard/--merge: slurm/submit_data_array.sh train.eval ...)")
        return 0 if args else 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        args, shard, merge_n = split_array_flags(args)
        cfg = load_config(args[0], args[1:], schema=EvalConfig)
        if not cfg.output_dir:
            raise ConfigError(f"{args[0]}: output_dir is empty")
        if merge_n is None:
            check_inputs(cfg)
    except (ConfigError, JsonlError, ValueError) as e:  # BenchmarkError is a ValueError
        print(f"configuration error: {e}", file=sys.stderr)
        return 2
    if merge_n is not None:
        try:
            records, info, label = merge_shards(cfg, merge_n, TASK_SECTIONS)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
    else:
        if shard is not None and completed_shard(cfg, *shard):
            print(f"shard {shard[0]}/{shard[1]} already done: {shard_path(cfg, *shard)}")
            return 0
        device = resolve_device(cfg.device)
        model, info = load_model(cfg.model_path, device, DTYPES[resolve_precision(cfg.precision, device)])
        label = cfg.label or (f"{Path(info['source']).name}" if info["step"] is None else f"step_{info['step']}")
        records = run_tasks(model, Phi4Tokenizer(), cfg, device, shard or (0, 1))
        if shard is not None:
            path = write_shard(cfg, *shard, records, info, label)
            print(f"shard {shard[0]}/{shard[1]}: {len(records)} task parts -> {path}")
            return 0
    path = write_results(cfg, records, info, label)
    metrics = flatten(records)
    if cfg.wandb.mode != "disabled":
        _log_wandb(cfg, metrics, info, label)
    for key, value in metrics.items():
        log.info("%s = %s", key, f"{value:.4f}" if isinstance(value, float) else value)
    print(f"{len(records)} results -> {path}")
    return 0
