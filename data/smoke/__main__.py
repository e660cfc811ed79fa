import sys

from data.smoke.build import main

sys.exit(main())
