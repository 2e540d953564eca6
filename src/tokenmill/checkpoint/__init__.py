"""Checkpoints on disk: the manager, atomic folders with a manifest, safe values, weights, sharded (DCP) saves."""
