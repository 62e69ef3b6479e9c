"""`python -m xdpo` (and `accelerate launch -m xdpo train ...`)."""

import sys

from xdpo.cli import main

sys.exit(main())
