"""Opt-in speed and memory transforms applied to the model from outside (never inside the model code)."""
