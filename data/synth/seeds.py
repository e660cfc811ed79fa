"""Seeds from organic text: files split into passages (whole paragraphs packed up to `passage_chars`), each with its
file, line span, character offset and sha256, then scored for educational value and reasoning content.

Inputs are .txt/.md files (the file is the document; lines are its lines), jsonl (each line a document in
`text_field`; lines are the jsonl line, offsets are inside its text), or prepared shard directories of data.prepare
(holding manifest.json: each document decoded with the Phi-4 tokenizer; the location names the document index). Passages are numbered in input order; shard i of
N takes passage k when k % N == i, so every shard sees the same numbering whatever N is (each task reads the inputs,
which costs seconds against hours of generation).

The small-classifier scorer is a linear model over hashed word unigrams and bigrams, stored as .npz (loaded with
allow_pickle=False: nothing in it can run): w_educational (dim,), w_reasoning (dim,), b (2,); a score is
1 + 4 * sigmoid(w . x + b), x the passage's L2-normalised hashed counts. Train it on LLM rubric labels (phi-1 did
this with a random forest on embeddings; the report's seed classifier is not published).
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data.fileio import JsonlError, read_jsonl
from data.sources import list_inputs


@dataclass
class Passage:
    text: str
    file: str
    line_start: int  # 1-based, inclusive: lines of the .txt file, or the jsonl line of the document
    line_end: int
    char_offset: int  # where the passage starts inside the document's text
    index: int  # position in the numbering over all inputs
    doc: int = -1  # document index inside a prepared shard directory (-1: a text or jsonl file)

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()

    def location(self) -> dict:
        where = {"doc": self.doc} if self.doc >= 0 else {"line_start": self.line_start, "line_end": self.line_end}
        return {"file": self.file, **where, "char_offset": self.char_offset, "sha256": self.sha256}


def _paragraphs(text: str):
    """(start char, start line, end line, paragraph) for each blank-line-separated paragraph (lines 0-based)."""
    pos, line = 0, 0
    for block in re.split(r"(\n[ \t]*\n+)", text):
        if block.strip() and not re.fullmatch(r"\n[ \t]*\n+", block):
            lead = len(block) - len(block.lstrip())
            body = block.strip()
            first = line + block[:lead].count("\n")
            yield pos + lead, first, first + body.count("\n"), body
        pos += len(block)
        line += block.count("\n")


def split_passages(text: str, passage_chars: int):
    """(char offset, first line, last line, passage) with paragraphs packed greedily up to passage_chars; a longer
    paragraph is cut at the last whitespace before the limit."""
    group: list[tuple[int, int, int, str]] = []
    size = 0

    def flush():
        if group:
            yield group[0][0], group[0][1], group[-1][2], "\n\n".join(p for *_, p in group)

    for para in _paragraphs(text):
        start, l0, l1, body = para
        while len(body) > passage_chars:  # an over-long paragraph: pieces of it
            yield from flush()
            group, size = [], 0
            cut = body.rfind(" ", 0, passage_chars)
            cut = cut if cut > passage_chars // 2 else passage_chars
            yield start, l0, l0 + body[:cut].count("\n"), body[:cut].strip()
            skipped = len(body[:cut]) + (len(body[cut:]) - len(body[cut:].lstrip()))
            l0 += body[:skipped].count("\n")
            start, body = start + skipped, body[skipped:]
        if size and size + 2 + len(body) > passage_chars:
            yield from flush()
            group, size = [], 0
        group.append((start, l0, l1, body))
        size += len(body) + (2 if size else 0)
    yield from flush()


def _documents(path: Path, text_field: str):
    """(first line, text) per document of one input file."""
    if path.suffix in (".txt", ".md"):
        yield 1, path.read_text(encoding="utf-8", errors="replace")
        return
    for line_no, obj in read_jsonl(path):
        text = obj.get(text_field)
        if not isinstance(text, str):
            raise JsonlError(f"{path}:{line_no}: expected a JSON object with a string {text_field!r} field")
        yield line_no, text


def _shard_documents(directory: Path):
    """(document index, text) of a prepared shard directory, decoded with the Phi-4 tokenizer."""
    from data.shards import ShardedSource
    from data.tokenizer import Phi4Tokenizer

    source, tok = ShardedSource(directory), Phi4Tokenizer()
    for i in range(len(source)):
        ids = source.doc(i).tolist()
        yield i, tok.decode(ids[:-1] if ids and ids[-1] == tok.eod_id else ids)  # documents end with <|endoftext|>


def passages(inputs: list[str], text_field: str, passage_chars: int, shard: int = 0, num_shards: int = 1):
    """This shard's passages, numbered over every input in order; too-short ones are yielded too (the caller drops
    and counts them)."""
    index = 0
    for item in inputs:
        if (Path(item) / "manifest.json").is_file():  # a prepared shard directory
            groups = [(Path(item), _shard_documents(Path(item)), "shards")]
        else:
            groups = [(p, _documents(p, text_field), "text" if p.suffix in (".txt", ".md") else "jsonl")
                      for p in list_inputs([item], (".txt", ".md", ".jsonl"))]
        for path, docs, kind in groups:
            for doc_line, text in docs:
                for offset, l0, l1, body in split_passages(text, passage_chars):
                    if index % num_shards == shard:
                        start, end = (l0 + 1, l1 + 1) if kind == "text" else (doc_line, doc_line)
                        yield Passage(body, str(path), start, end, offset, index,
                                      doc=doc_line if kind == "shards" else -1)
                    index += 1


SCORE_NAMES = ("educational_value", "reasoning")


def _features(text: str, dim: int) -> np.ndarray:
    words = re.findall(r"\w+", text.lower())
    grams = words + [a + " " + b for a, b in zip(words, words[1:])]
    x = np.zeros(dim, dtype=np.float64)
    for g in grams:
        x[int.from_bytes(hashlib.blake2b(g.encode(), digest_size=8).digest(), "little") % dim] += 1.0
    norm = np.linalg.norm(x)
    return x / norm if norm else x


class SeedClassifier:
    def __init__(self, path: str):
        try:
            with np.load(path, allow_pickle=False) as z:
                self.w = np.stack([z["w_educational"], z["w_reasoning"]]).astype(np.float64)
                self.b = np.asarray(z["b"], dtype=np.float64).reshape(2)
        except (OSError, KeyError, ValueError) as e:
            raise ValueError(f"seeds.classifier {path}: expected an .npz with w_educational, w_reasoning (dim,) "
                             f"and b (2,) ({e})") from None

    def scores(self, text: str) -> dict:
        z = self.w @ _features(text, self.w.shape[1]) + self.b
        values = 1 + 4 / (1 + np.exp(-z))
        return {name: int(round(float(v))) for name, v in zip(SCORE_NAMES, values)}
