import sys

from train.export.run import main

sys.exit(main())
