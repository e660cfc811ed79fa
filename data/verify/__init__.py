"""Checking model-written answers: the OS-isolated code sandbox (`sandbox`) and the answer extractors and oracles
built on it (`answers`), shared by synthetic-data validation, Pivotal Token Search and evaluation."""
