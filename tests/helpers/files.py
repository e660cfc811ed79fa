"""Small input files the tests write."""
from __future__ import annotations

import json
from pathlib import Path


def write_jsonl(path: Path, rows: list[dict]) -> str:
    """One JSON object a line; returns the path as a string, as configs take it."""
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)
