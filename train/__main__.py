"""`python -m train <config.yaml> [key=value ...]`: run one stage (see train/loop.py).

The process leaves with os._exit once the trainer has returned: by then checkpoints and exit_status.json are fsynced,
metrics and wandb closed and the process group destroyed. What is left is interpreter teardown, where the C++
destructors of communication threads can abort an otherwise finished rank ("terminate called without an active
exception", seen twice in a day of gloo runs under torchrun here). torchrun and Slurm would report
that finished stage as failed, and a recipe chain's `afterok` would then cancel the rest.
"""
import logging
import os
import sys

from train.loop import main

code = main()
logging.shutdown()
sys.stdout.flush()
sys.stderr.flush()
os._exit(code)
