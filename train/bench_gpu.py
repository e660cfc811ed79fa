"""Alias of `python -m train.bench.gpu` (the GPU benchmark), kept for the command users already type."""
import sys

from train.bench.gpu import main

if __name__ == "__main__":
    sys.exit(main())
