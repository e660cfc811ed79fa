"""Small input files the tests write, and the results files they read back."""
from __future__ import annotations

import json
from pathlib import Path


def write_jsonl(path: Path, rows: list[dict]) -> str:
    """One JSON object a line; returns the path as a string, as configs take it."""
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def eval_results(out_dir: Path) -> list[dict]:
    """The records of <out_dir>/results.jsonl without what differs between runs (wall times, stamps, sample paths)."""
    rows = [json.loads(x) for x in (Path(out_dir) / "results.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in ("time", "time_s", "samples_path")} for r in rows]
