"""Seeing the evolved system: tables, plots, scalars and its picture."""
