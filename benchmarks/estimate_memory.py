"""Measured vs estimated training memory: peak CUDA memory of real bf16 AdamW steps against
`tokenmill estimate`'s plan, with and without activation checkpointing. Prints a table; needs a CUDA GPU.

    python benchmarks/estimate_memory.py [--preset gpt2-124m --preset llama-124m ...] [--micro-batch 8]
"""

from __future__ import annotations

import argparse
import sys

import torch


def measure(cfg, micro_batch: int, ac: str) -> int:
    """Peak bytes allocated over the second of two optimizer steps (the first one creates AdamW's state)."""
    from tokenmill.levers.activation_checkpointing import apply_activation_checkpointing
    from tokenmill.model import build_model

    model = build_model(cfg.model, device="cuda")
    if ac != "none":
        apply_activation_checkpointing(model, ac)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    window = torch.randint(0, cfg.model.vocab_size, (micro_batch, cfg.train.seq_len + 1), device="cuda")
    for step in range(2):
        if step == 1:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model.loss(window)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    torch.cuda.synchronize()  # host-device sync: read the peak after all kernels ran
    peak = torch.cuda.max_memory_allocated()
    del model, opt
    torch.cuda.empty_cache()
    return peak


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", action="append", default=None)
    parser.add_argument("--micro-batch", type=int, default=8)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("estimate_memory: needs a CUDA GPU (nothing to measure on this machine)")
        return 0
    from tokenmill.config import load_config
    from tokenmill.metrics.estimate import estimate
    from tokenmill.metrics.flops import GPUS, lookup_gpu
    from tokenmill.metrics.memory import GIB

    gpu = lookup_gpu(torch.cuda.get_device_name()) or GPUS["H100 SXM"]
    print(f"{'preset':<14} {'B':>3} {'AC':<5} {'estimated GiB':>14} {'measured GiB':>13} {'est/meas':>9}")
    for preset in args.preset or ["gpt2-124m", "llama-124m", "dense-180m"]:
        cfg = load_config([preset], None, [])
        plan = estimate(cfg, gpu, args.micro_batch)["memory"]["plan"]["bf16-mixed"]["peak_total"]
        for ac, key in (("none", "none"), ("all", "all")):
            try:
                measured = measure(cfg, args.micro_batch, ac)
            except torch.cuda.OutOfMemoryError:
                print(f"{preset:<14} {args.micro_batch:>3} {ac:<5} {plan[key] / GIB:>14.2f} {'OOM':>13}")
                torch.cuda.empty_cache()
                continue
            print(
                f"{preset:<14} {args.micro_batch:>3} {ac:<5} {plan[key] / GIB:>14.2f} {measured / GIB:>13.2f} "
                f"{plan[key] / measured:>9.2f}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
