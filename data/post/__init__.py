"""Post-training data as the Phi-4 report makes it: judged SFT responses, judge-guided DPO pairs, refusal-to-
hallucinate data and safety data, through the synthetic-data engine's backends. Entry point: python -m train.post."""
