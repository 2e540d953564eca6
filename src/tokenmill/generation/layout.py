"""The memory layout of a model's weights that decodes fastest on a CPU.

A decode step multiplies each weight matrix W (out, in) by one row per sequence, so it streams every weight from
memory once per token and is bound by memory bandwidth. PyTorch computes x @ W.T with the BLAS library; for a
row-major (contiguous) W that is the dot-product form of matrix-vector multiplication, which MKL ran at 5-6 GB/s
on the AMD EPYC where this was measured, against 12-14 GB/s for the column-major W, whose x @ W.T is the
axpy form (benchmarks/decode.py; docs/performance.md has the numbers). The values and shapes of the
weights stay the same, only their strides and addresses change, so every result is the same up to the order of
the sums.

The relaid matrices go into one block of memory (`WeightArena`), advised for transparent huge pages on Linux: a
step reads every matrix once per token, ~17 MB for tiny, which with 4 KB pages is ~4,400 TLB entries, more
than a core's TLB holds, so every step would walk the page tables again; with 2 MB pages it is nine.
"""

from __future__ import annotations

import ctypes
import sys
from collections.abc import Sequence

import torch
from torch import nn

HUGE_PAGE = 2 << 20  # bytes: the x86-64 and arm64 (4 KB base pages) transparent huge page
_MADV_HUGEPAGE = 14  # Linux, include/uapi/asm-generic/mman-common.h


class WeightArena:
    """One 2 MB-aligned block that decode matrices are laid out in, one after another, advised for huge pages.

    The advice is what PyTorch's `THP_MEM_ALLOC_ENABLE=1` gives allocations of 2 MB and more, for these matrices
    alone and without an environment variable read once per process. It is given before anything touches the
    block, so its pages are huge from their first write; where it is refused (THP disabled, not Linux) the block
    is an ordinary one and only the speed differs.
    """

    def __init__(self, numel: int, dtype: torch.dtype) -> None:
        size = -(-numel * dtype.itemsize // HUGE_PAGE) * HUGE_PAGE  # whole huge pages
        raw = torch.empty((size + HUGE_PAGE) // dtype.itemsize, dtype=dtype)  # room to align the start
        start = (-raw.data_ptr()) % HUGE_PAGE // dtype.itemsize
        self.block = raw.narrow(0, start, numel)
        self._used = 0
        if sys.platform.startswith("linux"):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.madvise(ctypes.c_void_p(self.block.data_ptr()), ctypes.c_size_t(size), _MADV_HUGEPAGE)

    def take(self, rows: int, cols: int) -> torch.Tensor:
        """The next (rows, cols) row-major matrix of the block."""
        if self._used + rows * cols > self.block.numel():
            raise ValueError(f"the arena holds {self.block.numel()} elements; {self._used + rows * cols} asked")
        matrix = self.block.narrow(0, self._used, rows * cols).view(rows, cols)
        self._used += rows * cols
        return matrix

    @classmethod
    def for_matrices(cls, matrices: Sequence[torch.Tensor]) -> WeightArena | None:
        """An arena that holds `matrices` (None when there are none, or they differ in dtype or device)."""
        if not matrices or len({(m.dtype, m.device) for m in matrices}) > 1 or matrices[0].device.type != "cpu":
            return None
        return cls(sum(m.numel() for m in matrices), matrices[0].dtype)


def decode_weights(model: nn.Module) -> list[nn.Parameter]:
    """The matrices a decode step multiplies by: every nn.Linear weight and the output head (tied or not)."""
    params = {id(m.weight): m.weight for m in model.modules() if isinstance(m, nn.Linear)}
    head = model.output_weight()
    params.setdefault(id(head), head)
    return list(params.values())


@torch.no_grad()
def apply_column_major(model: nn.Module, arena: WeightArena | None = None) -> int:
    """Store the model's decode matrices column-major, in place (same Parameter objects, values and shapes), in
    `arena` (default: one of their own).

    Only for a model nothing else uses: training steps and checkpoint writers (safetensors refuses
    non-contiguous tensors) expect contiguous weights. Returns how many matrices changed layout.
    """
    moving = [
        w for w in decode_weights(model) if w.dim() == 2 and w.is_contiguous() and w.shape[0] > 1 and w.shape[1] > 1
    ]
    arena = arena or WeightArena.for_matrices(moving)
    for weight in moving:
        out, inp = weight.shape
        relaid = weight.data.t().contiguous() if arena is None else arena.take(inp, out).copy_(weight.data.t())
        weight.data = relaid.t()  # (out, in) with strides (1, out)
    return len(moving)


@torch.no_grad()
def fuse_linears(linears: Sequence[nn.Linear], arena: WeightArena) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Store linears that read the same input (q/k/v, gate/up) as one matrix in `arena`, so a decode step
    multiplies once.

    Returns the (in, sum of out) row-major matrix holding every W.T side by side, and the joined bias (None when
    the linears have none). Each weight (and bias) becomes a view into them with its own values and shape, stored
    column-major like `apply_column_major`'s, so the model's own forward still computes the same results.
    """
    weight_t = arena.take(linears[0].in_features, sum(linear.out_features for linear in linears))
    torch.cat([linear.weight.t() for linear in linears], dim=1, out=weight_t)  # (in, out_total)
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
