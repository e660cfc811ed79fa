"""The synthetic-data engine: seeds -> rewrites, plurality-filtered questions, self-revision, instruction reversal ->
validated, deduplicated, decontaminated jsonl that data.prepare takes unchanged. Entry point: python -m train.synth."""
