"""The `moekit` command: one module per command group, heavy imports inside each command."""

from .main import main  # noqa: F401
