import sys

from train.recipe.cli import main

sys.exit(main())
