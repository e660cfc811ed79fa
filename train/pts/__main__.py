import sys

from train.pts.run import main

sys.exit(main())
