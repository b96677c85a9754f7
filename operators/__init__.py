"""Operators, windows, aggregations, sources and sinks (no Ray code)."""
