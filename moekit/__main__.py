"""`python -m moekit` runs the CLI (also what `torchrun -m moekit` starts)."""

import sys

from .cli import main

sys.exit(main())
