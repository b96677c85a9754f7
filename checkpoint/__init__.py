"""The checkpoint protocol core (sans-IO): errors and the two-phase-commit sink contract."""
