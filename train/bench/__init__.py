"""Benchmarks that print ratios against a peer run side by side: `python -m train.bench` (CPU: ours vs Hugging Face
and raw tiktoken) and `python -m train.bench.gpu` (one GPU: tokens/s, TFLOP/s, MFU). See README.md here."""
