"""Two-phase-commit sinks."""
