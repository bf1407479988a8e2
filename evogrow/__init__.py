"""evogrow's launchers and partitioned trainer.

Library modules here (partitioning, trainer, checkpoints, data, evaluation, train, eval,
infer) never import gin; only the launcher (`evogrow.main`, `evogrow.gin_utils`) binds
gin configuration and calls them.
"""
