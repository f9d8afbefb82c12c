"""Helpers shipped for tests: fault-injecting storage, reference model, strategies.
Nothing under src/ imports this package."""
