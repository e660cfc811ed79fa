"""Fixtures shared by every test directory (the real tokenizer, the tiny models of tests/helpers/models.py), and the
rule that keeps `pytest -m "not slow"` fast: a test that starts a real trainer or the recipe must be marked slow."""
from __future__ import annotations

import ast
import inspect
import os
import re
import textwrap

import pytest
import torch

from tests.helpers.models import small_model, tiny_model

# One torch thread unless OMP_NUM_THREADS says otherwise: the models here are tiny, and on a shared 2-core machine
# OpenMP's spinning second thread made tests/model + tests/train/eval take 80 s instead of 30 s (3.6x the CPU time).
# The trainer subprocesses get OMP_NUM_THREADS=1 from tests/helpers/train.py as well.
TEST_THREADS = int(os.environ.get("OMP_NUM_THREADS", "1"))
torch.set_num_threads(TEST_THREADS)


@pytest.fixture(autouse=True)
def _torch_threads():
    """Give every test TEST_THREADS threads, whatever the one before set (the benchmarks' --threads does)."""
    if torch.get_num_threads() != TEST_THREADS:
        torch.set_num_threads(TEST_THREADS)


@pytest.fixture(scope="session")
def tok():
    """The real Phi-4 tokenizer (cl100k + the Phi-4 special tokens); read-only after construction, so shared."""
    from data.tokenizer import Phi4Tokenizer

    return Phi4Tokenizer()


@pytest.fixture(scope="session")
def hf_tokenizer_dir(tok, tmp_path_factory):
    """The tokenizer exported for transformers (tok.save_hf: ~4 CPU-seconds, so once per session); read it only."""
    out = tmp_path_factory.mktemp("hf_tokenizer")
    tok.save_hf(out)
    return out


@pytest.fixture(scope="session")
def hf_tok(hf_tokenizer_dir):
    """transformers.AutoTokenizer of the export (another ~4 CPU-seconds to load)."""
    import transformers  # a dependency (pyproject.toml): missing, the tests that need it fail rather than skip

    return transformers.AutoTokenizer.from_pretrained(hf_tokenizer_dir)


@pytest.fixture
def tiny():
    """A fresh TINY model (seed 0) for each test: tests change weights freely."""
    return tiny_model(0)


@pytest.fixture
def small():
    """A fresh SMALL model (seed 0) for each test."""
    return small_model(0)


# ---- slow marks ---------------------------------------------------------------------------------------------------
# What starts a real trainer process (tests/helpers/train.py run_train, torchrun, `python -m train`), the whole
# recipe (`python -m train.recipe`) or a Slurm job: minutes each on a 2-core machine.
STARTS_A_TRAINER = re.compile(r'\brun_train\(|torch\.distributed\.run|"-m",\s*"train(\.recipe)?"|\bsbatch\(')
_found: dict[object, str | None] = {}


def _starts_a_trainer(fn) -> str | None:
    """Where `fn`, or a function of the tests it calls (transitively), starts a trainer; None if it does not."""
    fn = inspect.unwrap(fn)
    if fn in _found:
        return _found[fn]
    _found[fn] = None  # recursion guard
    try:
        source = textwrap.dedent(inspect.getsource(fn))
    except (OSError, TypeError):
        return None
    hit = STARTS_A_TRAINER.search(source)
    if hit:
        _found[fn] = f"{fn.__module__}.{fn.__qualname__} has {hit.group(0)!r}"
        return _found[fn]
    scope = vars(inspect.getmodule(fn))
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            callee = scope.get(node.func.id)
            if inspect.isfunction(callee) and callee.__module__.startswith("tests."):
                where = _starts_a_trainer(callee)
                if where:
                    _found[fn] = where
                    return where
    return None


def trainer_start(item) -> str | None:
    """Where a collected test, or one of its fixtures, starts a trainer (None: it does not)."""
    fixtures = [fd.func for defs in item._fixtureinfo.name2fixturedefs.values() for fd in defs
                if getattr(fd.func, "__module__", "").startswith("tests")]
    return next(filter(None, map(_starts_a_trainer, [item.function, *fixtures])), None)


_unmarked: dict[str, str] = {}  # node id -> where it starts a trainer


def pytest_collection_modifyitems(config, items):
    for item in items:
        if isinstance(item, pytest.Function) and not item.get_closest_marker("slow"):
            where = trainer_start(item)
            if where:
                _unmarked[item.nodeid] = where


def pytest_runtest_setup(item):
    if item.nodeid in _unmarked:
        pytest.fail(f"{item.nodeid} starts a real trainer ({_unmarked[item.nodeid]}) but is not marked "
                    "@pytest.mark.slow: mark it, so that `pytest -m 'not slow'` stays fast", pytrace=False)
