"""`python -m train.synth`: the synthetic-data engine (data/synth/) with its backends, our own model among them."""
