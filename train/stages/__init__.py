"""Training stages: what differs between pretraining, midtraining, SFT and DPO, chosen once (`build.build_stage`).

A stage object has `batches` (the batch source: next, state_dict / load_state_dict, metrics, held_out_batches),
`before_training(engine, dist_state, resumed, should_stop)`, `loss(engine, batch) -> (summed loss, summed stats)`,
`loss_units(batch)` (what the loss is averaged over) and `step_metrics(sums, n_units)`. The one training loop
(train/loop.py) calls these without asking which stage it runs. lm.py: pretrain / midtrain (and the LM loss SFT
uses); sft.py; dpo.py with dpo_loss.py and ref_cache.py (the reference log-probs).
"""
