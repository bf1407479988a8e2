"""Flax model families with the t5x contract, axis rules, and component paths."""
