"""Organic smoke text harvested from the installed Python standard library: source files, docstrings, reference docs.

Files are listed sorted (relative to the stdlib directory) and shuffled with the seed, so the choice is a pure
function of (seed, installed Python). Each file lands in exactly one bucket: `long` (whole large modules, for
midtraining's natively-long-document selection), `code` (whole source files) or `text` (its docstrings, with the
signatures they document, as prose). The pydoc reference topics (`pydoc_data.topics`) are prose documents too.
Budgets are approximate tokens (characters / 4, the cl100k ratio measured on stdlib code and prose is 4.3-4.4).
"""
from __future__ import annotations

import ast
import inspect
import os
import random
import sysconfig
import warnings
from pathlib import Path

CHARS_PER_TOKEN = 4  # for budgets only; real token counts come from data.prepare
MIN_DOC_CHARS = 200
# A document qualifies as long when len(text) >= LONG_CHARS_PER_TOKEN * min_tokens: conservative (stdlib code runs
# ~4.3 chars per cl100k token), so a "long" document really holds at least min_tokens tokens.
LONG_CHARS_PER_TOKEN = 5
_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__", "pydoc_data",
              "lib2to3", "turtledemo", "ensurepip"}


def approx_tokens(text: str) -> int:
    return len(text) // CHARS_PER_TOKEN


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(root: Path | None = None) -> list[str]:
    """Relative paths of the stdlib's .py files outside tests and vendored packages, sorted."""
    root = root or stdlib_dir()
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS]  # prune: never walk site-packages
        rel_dir = Path(dirpath).relative_to(root)
        out.extend((rel_dir / f).as_posix() for f in filenames if f.endswith(".py"))
    return sorted(out)


def docstring_document(module_name: str, source: str) -> str:
    """The docstrings of a module, each under the signature it documents; '' when there are too few."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # invalid escape sequences in old modules
        try:
            tree = ast.parse(source)
        except SyntaxError:
            return ""
    parts = []
    doc = ast.get_docstring(tree)
    if doc:
        parts.append(f"Module {module_name}\n\n{inspect.cleandoc(doc)}")

    def visit(node, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = f"{prefix}{child.name}"
                doc = ast.get_docstring(child)
                if doc and len(doc) >= 40 and not child.name.startswith("_"):
                    if isinstance(child, ast.ClassDef):
                        header = f"class {name}"
                    else:
                        header = f"{name}({ast.unparse(child.args)})"
                    parts.append(f"{header}\n\n{inspect.cleandoc(doc)}")
                if isinstance(child, ast.ClassDef):
                    visit(child, f"{name}.")
    visit(tree, f"{module_name}.")
    text = "\n\n".join(parts)
    return text if len(text) >= 200 else ""


def harvest_stdlib(seed: int, code_tokens: int, text_tokens: int, long_tokens: int,
                   long_min_tokens: int) -> dict[str, list[dict]]:
    """{'code': [...], 'text': [...], 'long': [...]} documents ({'text', 'source'}) within the token budgets."""
    root = stdlib_dir()
    rng = random.Random(f"smoke-organic-{seed}")
    budgets = {"code": code_tokens, "text": text_tokens, "long": long_tokens}
    used = {k: 0 for k in budgets}
    docs: dict[str, list[dict]] = {k: [] for k in budgets}

    def add(bucket, text, source):
        docs[bucket].append({"text": text, "source": source})
        used[bucket] += approx_tokens(text)

    topics = _pydoc_topics()
    rng.shuffle(topics)
    half = len(topics) // 2  # half the reference topics first, the rest only if docstrings leave room

    def add_topics(chosen):
        for name, text in chosen:
            if used["text"] >= budgets["text"]:
                break
            add("text", f"Python language reference: {name}\n\n{text.strip()}", f"pydoc_data.topics:{name}")
    add_topics(topics[:half])

    files = stdlib_files(root)
    rng.shuffle(files)
    long_min_chars = LONG_CHARS_PER_TOKEN * long_min_tokens
    for rel in files:
        if all(used[k] >= budgets[k] for k in budgets):
            break
        try:
            source = (root / rel).read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if len(source.strip()) < MIN_DOC_CHARS:
            continue  # one-line __init__ files and the like teach nothing
        # A long document may overshoot the long budget by at most long_min_tokens (small scales stay small).
        room = budgets["long"] - used["long"] + long_min_tokens
        if len(source) >= long_min_chars and approx_tokens(source) <= room:
            add("long", source, f"stdlib:{rel}")
            continue
        want_text = used["text"] < budgets["text"] and (used["code"] >= budgets["code"] or rng.random() < 0.4)
        if want_text:
            module = rel[:-3].replace("/", ".").removesuffix(".__init__")
            doc = docstring_document(module, source)
            if doc:
                add("text", doc, f"stdlib-docstrings:{rel}")
                continue
        if used["code"] < budgets["code"]:
            add("code", source, f"stdlib:{rel}")
    add_topics(topics[half:])
    return docs


def _pydoc_topics() -> list[tuple[str, str]]:
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions strip it
        return []
    return sorted((k, v) for k, v in topics.items() if len(v) >= 200)
