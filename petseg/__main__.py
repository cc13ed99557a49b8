"""`python -m petseg`: the same command line as the `petseg` script."""

import sys

from petseg.cli import main

sys.exit(main())
