"""A task's data for the search: seqio tasks as in-memory arrays, batches, augmentations."""
