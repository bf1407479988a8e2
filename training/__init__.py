"""The trainer library: partitioned training, data, checkpoints, evaluation, growth events.

Nothing here imports gin: the launchers in evogrow/ bind configuration and call it.
"""
