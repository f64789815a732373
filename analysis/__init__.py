"""Tables and plots built from the records in ``results/`` (never re-runs anything)."""
