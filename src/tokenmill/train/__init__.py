"""Pretraining: the loop (`train(cfg)`), its state, batching, precision, stability and evaluation."""
