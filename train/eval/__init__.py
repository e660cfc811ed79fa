"""Evaluation (`python -m train.eval CONFIG`): multiple choice by log-likelihood, generative few-shot, perplexity by
provenance and JSON key-value recall, on a run, a checkpoint or a Hugging Face directory; also run in-loop."""
