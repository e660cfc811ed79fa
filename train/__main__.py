"""`python -m train <config.yaml> [key=value ...]`: run one stage (see train/loop.py)."""
import sys

from train.loop import main

sys.exit(main())
