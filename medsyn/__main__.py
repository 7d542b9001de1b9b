"""`python -m medsyn` is the `medsyn` command."""

import sys

from medsyn.cli import main

sys.exit(main())
