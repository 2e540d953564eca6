"""Parallelism applied from outside the single-device model, in one documented order (engine.py).

dist.py (process group, collectives), data_parallel.py (DDP, ZeRO-1, FSDP2, no-sync), pipeline.py (stages and
schedules), global_ops.py (job-wide token count, gradient norm, metrics), engine.py (one rank's training step).
"""
