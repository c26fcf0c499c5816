"""Models: architecture, checkpoints, registry. Imports torch; only the worker and CLI use it."""
