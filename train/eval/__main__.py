import sys

from train.eval.run import main

sys.exit(main())
