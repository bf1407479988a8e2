"""The evolved system out of the store: checkpoints, a t5x model, inference."""
