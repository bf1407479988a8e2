"""The search space and its operators: hyperparameters and the mutations that plan a child path."""
