"""Replayable sources."""
