"""One module per stage, named after it; each has `run(config, dates=None, force=False)` (docs/architecture.md)."""
