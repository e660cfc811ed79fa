"""Imported once by data.prepare's fork server (data/prepare_pool.py): the bundled Phi-4 tokenizer built there, so each
forked tokenizer worker starts with it in memory instead of building its own (~0.3 s each)."""
from data.tokenizer import Phi4Tokenizer

BUNDLED = Phi4Tokenizer()
