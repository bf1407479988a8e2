"""Agents: a method bound to a task, its cycles, views of the store, baselines, Ray."""
