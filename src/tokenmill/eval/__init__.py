"""Evaluating a trained model outside the training loop: loss, perplexity and bits per byte over any data source
(source.py), lm-evaluation-harness tasks through the native adapter (tasks.py), and where results go
(results.py). `tokenmill eval` is the command line over them."""
