"""Parallelism applied from outside the single-device model (STYLE rule 1), in one order (engine.py).

dist.py (process group, print0, collectives), activation.py (activation checkpointing), data_parallel.py
(DDP, ZeRO-1, FSDP2, no-sync), pipeline.py (stages and schedules), global_ops.py (job-wide loss count,
gradient norm, metrics), engine.py (the training step under any strategy), dcp.py (sharded checkpoints).
"""
