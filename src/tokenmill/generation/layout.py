"""The memory layout of a model's weights that decodes fastest on a CPU.

A decode step multiplies each weight matrix W (out, in) by one row per sequence, so it streams every weight from
memory once per token and is bound by memory bandwidth. PyTorch computes x @ W.T with the BLAS library; for a
row-major (contiguous) W that is the dot-product form of matrix-vector multiplication, which MKL ran at 5-6 GB/s
on the AMD EPYC where this was measured, against 12-14 GB/s for the column-major W, whose x @ W.T is the
axpy form (benchmarks/decode.py; docs/performance.md has the numbers). The values and shapes of the
weights stay the same, only their strides change, so every result is the same up to the order of the sums.
"""

from __future__ import annotations

import torch
from torch import nn


def decode_weights(model: nn.Module) -> list[nn.Parameter]:
    """The matrices a decode step multiplies by: every nn.Linear weight and the output head (tied or not)."""
    params = {id(m.weight): m.weight for m in model.modules() if isinstance(m, nn.Linear)}
    head = model.output_weight()
    params.setdefault(id(head), head)
    return list(params.values())


@torch.no_grad()
def apply_column_major(model: nn.Module) -> int:
    """Store the model's decode matrices column-major, in place (same Parameter objects, values and shapes).

    Only for a model nothing else uses: training steps and checkpoint writers (safetensors refuses
    non-contiguous tensors) expect contiguous weights. Returns how many matrices changed layout.
    """
    changed = 0
    for weight in decode_weights(model):
        if weight.dim() == 2 and weight.is_contiguous() and weight.shape[0] > 1 and weight.shape[1] > 1:
            weight.data = weight.data.t().contiguous().t()  # (out, in) with strides (1, out)
            changed += 1
    return changed
