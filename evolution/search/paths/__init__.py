"""A path as a model: training one candidate, its optimizer state, cost, timing and router paths."""
