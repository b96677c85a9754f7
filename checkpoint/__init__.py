"""The checkpoint protocol core (sans-IO): barriers, the coordinator, storage, the two-phase-commit sink contract."""
