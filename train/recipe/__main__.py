import sys

from train.recipe.runner import main

sys.exit(main())
