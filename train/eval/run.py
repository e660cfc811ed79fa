"""Evaluation of a checkpoint, a run or an exported Hugging Face directory: `python -m train.eval <config.yaml> [k=v]`.

Tasks (spec section 8), each on jsonl files, each giving one result record:
- multiple choice by log-likelihood, k-shot (MMLU / ARC style): every choice is scored by the sum of its tokens'
  log-probs after the prompt, and by their mean (length-normalised); `primary` picks which one `accuracy` reports;
- generative few-shot (GSM8K / MATH style): greedy or sampled completions, plain few-shot text (base models) or the
  chat template (chat models), checked by `data.verify.answers` (answer match; unit tests in the sandbox for code items);
- perplexity per source (prepared shards or jsonl text), token-weighted, and aggregated per provenance
  (synthetic vs organic): each document is scored alone, in windows of seq_len, every token after its first once;
- long-context JSON key-value recall (HELMET's recall task): a JSON object of random UUID pairs filling exactly the
  target length in tokens, then the value of one key; scored by exact match and substring match (SubEM).
Results go to `<output_dir>/results.jsonl` (one record per task), per-item samples to `<output_dir>/samples/`, and
wandb under `eval/`. `evaluate(model, tokenizer, cfg, device)` is the in-loop entry point (flat metric dict).
The tasks are implemented in `train/eval_tasks.py` (multiple choice, generative, perplexity) and
`train/eval_recall.py` (recall); this file holds the configuration, model loading, running and results.

Distributed use: every rank runs every task on the same items, so forwards match rank for rank (ZeRO-3 safe). Under
ZeRO-3 (parameters carry `ds_id`) generation never stops early: it runs max_new_tokens steps on every rank and the
completions are cut at the first stop token afterwards, so no rank waits in a collective the others left.
"""
from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from data.config import PROVENANCES
from data.fileio import atomic_write
from data.tokenizer import Phi4Tokenizer
from model.config import ModelConfig
from model.transformer import Transformer
from train.config import ConfigError, WandbConfig, from_dict, load_config, to_dict
# The tasks live beside this file; their public names are re-exported here (tests and callers use train.eval.run).
from train.eval.recall import build_recall_prompt, eval_recall, recall_scores  # noqa: F401
from train.eval.tasks import (continuation_logprobs, document_nll, eval_generative,  # noqa: F401
                              eval_multiple_choice, eval_perplexity, generate_texts, generative_prompt,
                              labelled_nll, mc_prompt, perplexity_documents, read_jsonl)

log = logging.getLogger("eval")


@dataclass
class MultipleChoiceTask:
    name: str = ""
    path: str = ""  # jsonl rows {"question", "choices": [...], "answer": index}
    k_shot: int = 0
    fewshot_path: str = ""  # shots = its first k rows; empty = the first k rows of `path` (then not scored)
    format: str = "text"  # text: score each choice's text (ARC) | letters: list choices as A-D, score the letter (MMLU)
    primary: str = "mean"  # the score `accuracy` uses: mean (per-token, length-normalised) | sum
    limit: int = 0  # 0 = every item


@dataclass
class GenerativeTask:
    name: str = ""
    path: str = ""  # jsonl rows {"question" or "messages", "answer", "oracle"?: math|code, "tests"?}
    k_shot: int = 0
    fewshot_path: str = ""  # rows with "question" and "solution" (or "answer"); empty = first k rows of `path`
    prompt: str = "plain"  # plain few-shot text (base models) | chat (the chat template; chat models)
    temperature: float = 0.0  # 0 = greedy; simple-evals use 0.5
    top_p: float = 1.0
    max_new_tokens: int = 256
    num_samples: int = 1  # completions per item; accuracy is averaged over them
    limit: int = 0


@dataclass
class PerplexitySource:
    name: str = ""
    path: str = ""  # prepared shard directory (manifest.json) or a .jsonl file
    provenance: str = ""  # synthetic | organic; shards: read from the manifest (must agree when given)
    text_field: str = "text"  # jsonl only
    held_out_fraction: float = 0.0  # shards: score only the documents the loader holds out (same seed); 0 = all
    seed: int = 1234  # the run's data.seed, so the held-out documents are the loader's
    max_docs: int = 0  # 0 = no cap
    max_tokens: int = 0  # 0 = no cap


@dataclass
class RecallProbe:
    lengths: list[int] = field(default_factory=lambda: [4096, 8192, 16384])  # prompt tokens; empty = off
    samples: int = 5  # probes per length
    prompt: str = "plain"  # plain | chat
    seed: int = 0
    allow_beyond_context: bool = False  # probe lengths above the model's max_seq_len too (else they are skipped)


@dataclass
class EvalConfig:
    model_path: str = ""  # run dir, checkpoint step dir, or Hugging Face directory (CLI only)
    output_dir: str = ""  # results.jsonl and samples/ (CLI only)
    label: str = ""  # recorded with every result, e.g. "after-sft"; default: the model path and step
    device: str = "auto"  # auto | cpu | cuda
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | bf16 | fp32
    batch_size: int = 8  # sequences per forward / prompts per generate call
    seq_len: int = 0  # perplexity window and multiple-choice context cap; 0 = the model's max_seq_len
    seed: int = 0  # sampling
    multiple_choice: list[MultipleChoiceTask] = field(default_factory=list)
    generative: list[GenerativeTask] = field(default_factory=list)
    perplexity: list[PerplexitySource] = field(default_factory=list)
    recall: RecallProbe = field(default_factory=RecallProbe)
    wandb: WandbConfig = field(default_factory=lambda: WandbConfig(mode="disabled"))

    def validate(self) -> None:
        """Raise ConfigError naming the key of the first bad value."""
        mc, gen, ppl = self.multiple_choice, self.generative, self.perplexity
        choices = [("device", self.device, ("auto", "cpu", "cuda")),
                   ("precision", self.precision, ("auto", "bf16", "fp32")),
                   ("wandb.mode", self.wandb.mode, ("online", "offline", "disabled")),
                   ("recall.prompt", self.recall.prompt, ("plain", "chat"))]
        choices += [(f"multiple_choice[{i}].format", t.format, ("text", "letters")) for i, t in enumerate(mc)]
        choices += [(f"multiple_choice[{i}].primary", t.primary, ("mean", "sum")) for i, t in enumerate(mc)]
        choices += [(f"generative[{i}].prompt", t.prompt, ("plain", "chat")) for i, t in enumerate(gen)]
        choices += [(f"perplexity[{i}].provenance", t.provenance, ("",) + PROVENANCES) for i, t in enumerate(ppl)]
        for key, value, allowed in choices:
            if value not in allowed:
                raise ConfigError(f"eval config: {key}={value!r}; expected one of {list(allowed)}")
        positive = [("batch_size", self.batch_size), ("recall.samples", self.recall.samples)]
        positive += [(f"recall.lengths[{i}]", n) for i, n in enumerate(self.recall.lengths)]
        positive += [(f"generative[{i}].{k}", getattr(t, k)) for i, t in enumerate(gen)
                     for k in ("max_new_tokens", "num_samples", "top_p")]
        for key, value in positive:
            if value <= 0:
                raise ConfigError(f"eval config: {key}={value} must be > 0")
        for section, tasks in (("multiple_choice", mc), ("generative", gen), ("perplexity", ppl)):
            names = [t.name for t in tasks]
            if len(set(names)) != len(names) or not all(names) or not all(t.path for t in tasks):
                raise ConfigError(f"eval config: every {section} entry needs a unique name and a path; got {names}")
        for i, t in enumerate(gen):
            if t.temperature < 0 or t.top_p > 1:
                raise ConfigError(f"eval config: generative[{i}]: temperature={t.temperature} must be >= 0 and "
                                  f"top_p={t.top_p} at most 1")


# ---- loading ---------------------------------------------------------------------------------------------------
def load_model(path: str | Path, device: torch.device, dtype: torch.dtype) -> tuple[Transformer, dict]:
    """A Transformer from a Hugging Face directory, a checkpoint step dir or a run dir; plus {source, step}."""
    path = Path(path)
    if (path / "config.json").is_file():
        from train.export.hf import from_hf

        return from_hf(path, dtype=dtype, device=device).eval(), {"source": str(path), "step": None}
    from train.checkpoint import consolidated_state_dict, resolve_checkpoint_dir

    tag_dir, meta = resolve_checkpoint_dir(path)
    if "model" not in meta.get("config", {}):
        raise ConfigError(f"{tag_dir}/meta.json: no config.model; cannot rebuild the model")
    cfg = from_dict(meta["config"]["model"], schema=ModelConfig)
    with torch.device("meta"):
        model = Transformer(cfg)  # no allocation: the checkpoint's tensors are assigned below
    model.load_state_dict(consolidated_state_dict(tag_dir), strict=True, assign=True)
    return model.to(device=device, dtype=dtype).eval(), {"source": str(tag_dir), "step": meta.get("step")}


# ---- running ----------------------------------------------------------------------------------------------------
KIND_PREFIX = {"multiple_choice": "mc", "generative": "gen", "perplexity": "ppl",
               "perplexity_by_provenance": "ppl_by_provenance", "recall": "recall"}


def run_tasks(model, tok, cfg: EvalConfig, device) -> list[dict]:
    """Every configured task; one record each (with per-item `samples` where they exist)."""
    was_training = model.training
    model.eval()
    records = []
    try:
        jobs = [(eval_multiple_choice, t) for t in cfg.multiple_choice] + \
               [(eval_generative, t) for t in cfg.generative]
        for fn, task in jobs:
            t0 = time.perf_counter()
            records.append({**fn(model, tok, task, cfg, device), "time_s": time.perf_counter() - t0})
        if cfg.perplexity:
            records += eval_perplexity(model, tok, cfg.perplexity, cfg, device)
        if cfg.recall.lengths:
            t0 = time.perf_counter()
            records.append({**eval_recall(model, tok, cfg.recall, cfg, device), "time_s": time.perf_counter() - t0})
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
                if p and not Path(p).exists():
                    raise ConfigError(f"{section}[{i}] ({t.name}).{key}={p!r} does not exist")
            if section != "perplexity":
                read_jsonl(t.path, keys)
            elif not Path(t.path).is_dir():
                read_jsonl(t.path, (t.text_field,))


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
        print("usage: python -m train.eval <config.yaml> [key=value ...]   (e.g. model_path=runs/smoke/sft)")
        return 0 if args else 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        cfg = load_config(args[0], args[1:], schema=EvalConfig)
        if not cfg.output_dir:
            raise ConfigError(f"{args[0]}: output_dir is empty")
        check_inputs(cfg)
    except (ConfigError, ValueError) as e:
        print(f"configuration error: {e}", file=sys.stderr)
        return 2
    cuda = torch.cuda.is_available() and cfg.device != "cpu"
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cfg.precision == "bf16" or (cfg.precision == "auto" and cuda) else torch.float32
    model, info = load_model(cfg.model_path, device, dtype)
    label = cfg.label or (f"{Path(info['source']).name}" if info["step"] is None else f"step_{info['step']}")
    records = run_tasks(model, Phi4Tokenizer(), cfg, device)
    path = write_results(cfg, records, info, label)
    metrics = flatten(records)
    if cfg.wandb.mode != "disabled":
        _log_wandb(cfg, metrics, info, label)
    for key, value in metrics.items():
        log.info("%s = %s", key, f"{value:.4f}" if isinstance(value, float) else value)
    print(f"{len(records)} results -> {path}")
    return 0
