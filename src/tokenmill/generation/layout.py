"""The memory layout of a model's weights that decodes fastest on a CPU.

A decode step multiplies each weight matrix W (out, in) by one row per sequence, so it streams every weight from
memory once per token and is bound by memory bandwidth. PyTorch computes x @ W.T with the BLAS library; for a
row-major (contiguous) W that is the dot-product form of matrix-vector multiplication, which MKL ran at 5-6 GB/s
on the AMD EPYC where this was measured, against 12-14 GB/s for the column-major W, whose x @ W.T is the
axpy form (benchmarks/decode.py; docs/performance.md has the numbers). The values and shapes of the
weights stay the same, only their strides change, so every result is the same up to the order of the sums.
"""

from __future__ import annotations

from collections.abc import Sequence

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


@torch.no_grad()
def fuse_linears(linears: Sequence[nn.Linear]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Store linears that read the same input (q/k/v, gate/up) as one matrix, so a decode step multiplies once.

    Returns the (in, sum of out) row-major matrix holding every W.T side by side, and the joined bias (None when
    the linears have none). Each weight (and bias) becomes a view into them with its own values and shape, stored
    column-major like `apply_column_major`'s, so the model's own forward still computes the same results.
    """
    weight_t = torch.cat([linear.weight.t() for linear in linears], dim=1).contiguous()  # (in, out_total)
    has_bias = linears[0].bias is not None
    bias = torch.cat([linear.bias for linear in linears]) if has_bias else None
    start = 0
    for linear in linears:
        stop = start + linear.out_features
        linear.weight.data = weight_t[:, start:stop].t()  # (out, in) with strides (1, out_total)
        if bias is not None:
            linear.bias.data = bias[start:stop]
        start = stop
    return weight_t, bias
