"""Pivotal Token Search (`python -m train.pts CONFIG`): single-token DPO pairs from Monte-Carlo estimates of
p(success | prefix), for DPO round 1."""
