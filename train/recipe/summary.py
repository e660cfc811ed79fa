"""The recipe's summary: a table per stage (steps, tokens, losses, time, exported path, eval scores) and loss plots."""
from __future__ import annotations

import json
from pathlib import Path

from data.fileio import atomic_write


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def train_stage_summary(run_dir: Path) -> dict:
    records = _read_jsonl(run_dir / "metrics.jsonl")
    steps = [r for r in records if "loss" in r]
    evals = [r for r in records if any(k.startswith("eval/loss/") for k in r)]
    held_out = {k.removeprefix("eval/loss/"): v for k, v in (evals[-1] if evals else {}).items()
                if k.startswith("eval/loss/")}
    return {
        "steps": steps[-1]["step"] if steps else 0,
        "tokens": steps[-1].get("tokens_seen", 0) if steps else 0,
        "first_loss": steps[0]["loss"] if steps else None,
        "final_loss": steps[-1]["loss"] if steps else None,
        "held_out_loss": sum(held_out.values()) / len(held_out) if held_out else None,
        "held_out_by_source": held_out,
        "curve": [(r["step"], r["loss"], r.get("lr")) for r in steps],
        "extra": {k: v for k, v in (steps[-1] if steps else {}).items() if k.startswith("dpo/")},
        # SFT/DPO mixtures (data/post_batches.py): the last drawn share per source, and the DPO share warning
        "shares": {k.removeprefix("data/share/"): v for k, v in (steps[-1] if steps else {}).items()
                   if k.startswith("data/share/")},
        "safety_share": (steps[-1].get("data/safety_share") if steps else None),
        "safety_share_warning": bool(steps and steps[-1].get("data/safety_share_outside_paper_range")),
    }


def _stage_config(out: Path, stage, load):
    """A stage's config with its paths resolved as the runner resolved them (PHI4_RECIPE_DIR = the recipe's dir)."""
    import os

    from train.config import REPO_ROOT

    before = os.environ.get("PHI4_RECIPE_DIR")
    os.environ["PHI4_RECIPE_DIR"] = str(out)
    try:
        return load(REPO_ROOT / stage.config, [o for o in stage.overrides if "=" in o])
    finally:
        if before is None:
            os.environ.pop("PHI4_RECIPE_DIR")
        else:
            os.environ["PHI4_RECIPE_DIR"] = before


def post_stage_summary(out: Path, stage) -> dict:
    """Counts of a post-training data stage: records per file, kept/in per builder."""
    from data.post.config import load_post_config

    path = Path(_stage_config(out, stage, load_post_config).output_dir) / "manifest.json"
    if not path.is_file():
        return {}
    m = json.loads(path.read_text())
    return {"manifest": str(path), "files": m["files"],
            "steps": {k: f"{e['kept']}/{e['in']}" for k, e in m["steps"].items()}}


def synth_stage_summary(out: Path, stage) -> dict:
    """Counts of a synth stage from its merged manifest: kept/in per step, records per dataset type."""
    from data.synth.config import load_synth_config

    path = Path(_stage_config(out, stage, load_synth_config).output_dir) / "manifest.json"
    if not path.is_file():
        return {}
    m = json.loads(path.read_text())
    return {"manifest": str(path), "records": {t: f["records"] for t, f in m["dataset_types"].items()},
            "steps": {k: f"{e['kept']}/{e['in']}" for k, e in m["steps"].items()}}


def plot_curve(name: str, curve: list, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [c[0] for c in curve]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, [c[1] for c in curve], color="tab:blue", label="loss")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss", color="tab:blue")
    ax2 = ax.twinx()
    ax2.plot(steps, [c[2] for c in curve], color="tab:orange", linestyle="--", label="learning rate")
    ax2.set_ylabel("learning rate", color="tab:orange")
    ax.set_title(f"{name}: loss and learning rate")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _fmt(v, digits=4) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}g}"
    return f"{v:,}" if isinstance(v, int) else str(v)


def _paper_metrics(record: dict) -> dict:
    """A result's paper numbers per metric: `paper_score` as a number is the paper's `accuracy`; as a dict it names
    the metrics (SimpleQA's f1, HELMET's score/<length>)."""
    paper = record.get("paper_score")
    if isinstance(paper, (int, float)):
        return {"accuracy": paper}
    return {k: v for k, v in paper.items() if isinstance(v, (int, float))} if isinstance(paper, dict) else {}


def _eval_scores(stage_dir: Path) -> dict:
    scores = {}
    for r in _read_jsonl(stage_dir / "results.jsonl"):  # one record per task (train/eval/run.py)
        metrics = r.get("metrics", {})
        for key in ("accuracy", "perplexity", "exact_match", *_paper_metrics(r)):
            if isinstance(metrics.get(key), (int, float)):
                scores[f"{r.get('task', '?')}/{key}"] = metrics[key]
    return scores


def _paper_scores(stage_dir: Path) -> dict:
    """<task>/<metric> -> the paper's number for that task's protocol (the task's `paper_score`, in the paper's
    units), for the tasks that carry one."""
    return {f"{r.get('task', '?')}/{k}": v for r in _read_jsonl(stage_dir / "results.jsonl")
            for k, v in _paper_metrics(r).items()}


def _score_text(key: str, value, paper: dict) -> str:
    return f"{key} {_fmt(value, 3)}" + (f" (paper {paper[key]:g})" if key in paper else "")


def write_summary(out: Path, recipe, results: list[dict]) -> dict:
    rows, summary = [], {"output_dir": str(out), "stages": []}
    for stage, result in zip(recipe.stages, results):
        d = out / stage.name
        entry = {"name": stage.name, "kind": stage.kind, "seconds": result.get("seconds"),
                 "status": result.get("status")}
        if stage.kind == "train":
            s = train_stage_summary(d)
            if s["curve"]:
                plot_curve(stage.name, s["curve"], out / "plots" / f"{stage.name}.png")
                entry["plot"] = str(out / "plots" / f"{stage.name}.png")
            entry.update({k: v for k, v in s.items() if k != "curve"})
        elif stage.kind == "export":
            entry["exported"] = str(d / "hf")
            gguf = stage.gguf_path(d)
            if gguf is not None and gguf.is_file():
                entry["gguf"] = str(gguf)
                entry["modelfile"] = str(gguf.parent / "Modelfile")  # written beside it by train.export.gguf
        elif stage.kind == "eval":
            entry["scores"] = _eval_scores(d)
            if paper := _paper_scores(d):
                entry["paper_scores"] = paper
        elif stage.kind == "synth":
            entry["synth"] = synth_stage_summary(out, stage)
        elif stage.kind == "post":
            entry["post"] = post_stage_summary(out, stage)
        elif stage.kind == "pts":
            summ = d / "pairs.summary.json"
            entry["pts"] = json.loads(summ.read_text()) if summ.is_file() else {}
        summary["stages"].append(entry)
        details = [] if entry.get("status") == "completed" else [f"status: {entry.get('status') or 'unknown'}"]
        if entry.get("scores"):
            details.append(", ".join(_score_text(k, v, entry.get("paper_scores", {}))
                                     for k, v in entry["scores"].items()))
        if entry.get("exported"):
            details.append(entry["exported"])
        if entry.get("gguf"):
            details.append(f"GGUF {entry['gguf']} (llama.cpp; Ollama: `ollama create NAME -f {entry['modelfile']}`)")
        if entry.get("pts"):
            details.append(", ".join(f"{k} {v}" for k, v in entry["pts"].items() if isinstance(v, (int, float))))
        if entry.get("post"):
            details.append("files " + ", ".join(f"{k} {v}" for k, v in entry["post"]["files"].items()) + "; kept/in "
                           + ", ".join(f"{k} {v}" for k, v in entry["post"]["steps"].items()))
        if entry.get("synth"):
            syn = entry["synth"]
            details.append("records " + ", ".join(f"{k} {v}" for k, v in syn["records"].items()) + "; kept/in "
                           + ", ".join(f"{k} {v}" for k, v in syn["steps"].items()))
        if entry.get("extra"):
            details.append(", ".join(f"{k} {_fmt(v, 3)}" for k, v in entry["extra"].items()))
        if entry.get("shares"):
            details.append("drawn shares " + ", ".join(f"{k} {100 * v:.1f}%" for k, v in entry["shares"].items()))
        if entry.get("safety_share_warning"):
            details.append(f"WARNING: safety + hallucination share {100 * entry['safety_share']:.3g}% is outside "
                           "the Phi-4 report's 1-5% per DPO round (Table 9 caption)")
        rows.append(f"| {stage.name} | {stage.kind} | {_fmt(entry.get('steps'))} | {_fmt(entry.get('tokens'))} | "
                    f"{_fmt(entry.get('first_loss'))} -> {_fmt(entry.get('final_loss'))} | "
                    f"{_fmt(entry.get('held_out_loss'))} | {_fmt(entry.get('seconds'), 3)} | {'; '.join(details)} |")
    lines = [f"# Recipe summary: {out}", "",
             "| stage | kind | steps | tokens | loss first -> final | held-out loss | time (s) | details |",
             "|---|---|---|---|---|---|---|---|", *rows, ""]
    lines += [f"![{e['name']}](plots/{e['name']}.png)" for e in summary["stages"] if e.get("plot")]
    atomic_write(out / "summary.md", "\n".join(lines) + "\n")
    atomic_write(out / "summary.json", json.dumps(summary, indent=2))
    return summary
