"""`python -m moekit` runs the CLI (also what `torchrun -m moekit` starts)."""

import sys

from .cli.main import main

sys.exit(main())
