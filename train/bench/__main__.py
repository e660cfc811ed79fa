import sys

from train.bench.cpu import main

sys.exit(main())
