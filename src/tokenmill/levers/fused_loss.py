"""Output head + next-token cross-entropy, four ways (`train.loss_impl`), with one meaning.

Every implementation computes cross-entropy(h @ W.T, targets) from the final hidden states h (N, d), the head
weight W (V, d) and the already shifted targets (N,): `mean` over targets != ignore_index, or `sum` (the engine
divides the sum by the global count of valid targets). Values and gradients agree with the plain path up to
floating-point summation order; tests/levers/test_fused_loss.py checks each one that can run on the machine.

| impl    | runs on | loss memory (N tokens, vocab V, width d)               | source                            |
|---------|---------|--------------------------------------------------------|-----------------------------------|
| torch   | any     | N V fp32 log-probs saved, 2 N V fp32 grads in backward | torch.nn.functional.cross_entropy |
| chunked | any     | the same for one chunk of `loss_chunk_size` tokens     | Transformer.loss (recomputes)     |
| liger   | CUDA    | grads of h, W made in forward; ~N d transient logits   | Liger-Kernel, arXiv:2410.10989    |
| cce     | CUDA    | N fp32 log-sum-exps; backward recomputes logit blocks  | Cut Your Losses, arXiv:2411.09009 |

`torch` and `chunked` are the model's own `Transformer.loss` paths (the portable reference, used by evaluation
whatever is chosen here), built by tokenmill.levers.loss; `liger` and `cce` are passed to it as its `head_loss`, so
under FSDP2 they run inside the registered `loss` forward, on gathered plain tensors. `select_loss_fn` returns the
Engine's `loss_fn` for `train.loss_impl`. `auto` takes the first fused kernel that is installed when
the device is a CUDA GPU (cce, then liger: cce keeps the least memory) and passes a small probe against the plain
loss there (kernel packages and Triton versions move fast; a kernel that fails or disagrees is skipped with a
warning), else chunked when `loss_chunk_size` > 0, else torch. Pipeline stages end in their own cross-entropy of
the logits, so fused kernels need parallel.pp=1.
"""

from __future__ import annotations

import functools
import importlib.util
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from tokenmill.errors import UserError
from tokenmill.levers.loss import IGNORE_INDEX, Batch, LossFn, build_loss_fn, targets_of
from tokenmill.model.transformer import HeadLoss

DEFAULT_CHUNK_TOKENS = 4096  # loss_impl=chunked with loss_chunk_size=0: (4096, V) fp32 logits at a time


def _autocast_cast(h: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cast h and W to the autocast dtype, as F.linear would under autocast (the kernels see plain tensors)."""
    device_type = h.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        return h.to(dtype), weight.to(dtype)
    return h, weight


def liger_head_loss(
    h: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int = IGNORE_INDEX,
    reduction: str = "mean",
) -> torch.Tensor:
    """Liger's fused linear cross-entropy (Triton, CUDA only).

    accum_dtype=float32: the weight gradient is summed over token chunks in fp32 (in bf16 it loses bits at large
    N; the kernel's docstring recommends fp32 when training is sensitive).
    """
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    h, weight = _autocast_cast(h, weight)
    return liger_fused_linear_cross_entropy(
        h, weight, targets, ignore_index=ignore_index, reduction=reduction, accum_dtype=torch.float32
    )


def cce_head_loss(
    h: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int = IGNORE_INDEX,
    reduction: str = "mean",
    kernel: str = "cce",
) -> torch.Tensor:
    """Apple's cut cross-entropy: `kernel="cce"` (Triton, CUDA) or `"torch_compile"` (pure PyTorch, any device).

    filter_eps=None keeps every gradient entry: the default filtering of negligible entries makes gradients
    approximate, which its authors advise against for pretraining (apple/ml-cross-entropy README).
    """
    from cut_cross_entropy import linear_cross_entropy

    h, weight = _autocast_cast(h, weight)
    if kernel == "cce":
        return linear_cross_entropy(
            h, weight, targets, ignore_index=ignore_index, reduction=reduction, filter_eps=None, impl="cce"
        )
    return linear_cross_entropy(h, weight, targets, ignore_index=ignore_index, reduction=reduction, impl=kernel)


@dataclass(frozen=True)
class LossImpl:
    """One `train.loss_impl`: the head loss handed to Transformer.loss (None = its own torch/chunked path)."""

    head_loss: HeadLoss | None
    chunked: bool = False  # the model's chunked path
    cuda_only: bool = False
    package: str = ""  # import name of the kernel package ("" = none)
    pip_name: str = ""


# The keys (plus "auto") are LOSS_IMPL_NAMES in train/config.py, the names config validation accepts.
LOSS_IMPLS: dict[str, LossImpl] = {
    "torch": LossImpl(head_loss=None),
    "chunked": LossImpl(head_loss=None, chunked=True),
    "liger": LossImpl(head_loss=liger_head_loss, cuda_only=True, package="liger_kernel", pip_name="liger-kernel"),
    "cce": LossImpl(head_loss=cce_head_loss, cuda_only=True, package="cut_cross_entropy", pip_name="cut-cross-entropy"),
}
AUTO_ORDER = ("cce", "liger")  # fused kernels `auto` tries on a CUDA GPU, least memory first
PROBE_SHAPE = (256, 64, 1000)  # tokens, width, vocab of the probe `auto` runs before choosing a kernel
PROBE_TOLERANCE = 1e-2  # relative error (norm of the difference / norm of the reference) a kernel may show


def is_installed(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


def resolve_loss_impl(name: str, device: torch.device, chunk_size: int = 0, pp: int = 1) -> str:
    """The implementation `name` stands for on `device`: itself, or for "auto" the best one that can run there."""
    if name != "auto":
        return name
    if device.type == "cuda" and pp == 1:
        for candidate in AUTO_ORDER:
            if is_installed(LOSS_IMPLS[candidate].package) and kernel_works(candidate, device):
                return candidate
    return "chunked" if chunk_size > 0 else "torch"


@functools.cache
def kernel_works(name: str, device: torch.device) -> bool:
    """Whether fused kernel `name` runs on `device` and matches the plain loss (value and both gradients) on a
    small problem with ignored targets; warns with the reason when it does not. Cached per process."""
    n, d, v = PROBE_SHAPE
    g = torch.Generator().manual_seed(0)
    h = torch.randn(n, d, generator=g).to(device).requires_grad_()
    weight = torch.randn(v, d, generator=g).to(device).requires_grad_()
    targets = torch.randint(0, v, (n,), generator=g).to(device)
    targets[::7] = IGNORE_INDEX
    expected = F.cross_entropy(F.linear(h, weight), targets, ignore_index=IGNORE_INDEX, reduction="sum")
    reference = (expected.detach(), *torch.autograd.grad(expected, (h, weight)))
    try:
        loss = LOSS_IMPLS[name].head_loss(h, weight, targets, IGNORE_INDEX, "sum")
        got = (loss, *torch.autograd.grad(loss, (h, weight)))
    except Exception as err:  # any failure of a third-party kernel means: not available here
        warnings.warn(
            f"train.loss_impl=auto: {name} fails on {device} ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}); not using it",
            stacklevel=2,
        )
        return False
    errors = [float((a.detach() - b).float().norm() / b.float().norm()) for a, b in zip(got, reference, strict=True)]
    if max(errors) > PROBE_TOLERANCE:
        warnings.warn(
            f"train.loss_impl=auto: {name} disagrees with the plain loss on {device} (relative errors of "
            f"loss, dh, dW: {', '.join(f'{e:.1e}' for e in errors)}); not using it",
            stacklevel=2,
        )
        return False
    return True


def check_loss_impl(name: str, device: torch.device, pp: int = 1) -> None:
    """Raise a one-line UserError when `train.loss_impl=name` cannot run on `device` with this install."""
    if name == "auto":
        return
    if name not in LOSS_IMPLS:
        raise UserError(f"train.loss_impl={name!r} is not allowed: choose one of auto, {', '.join(LOSS_IMPLS)}")
    impl = LOSS_IMPLS[name]
    if impl.cuda_only and device.type != "cuda":
        raise UserError(
            f"train.loss_impl={name} runs Triton kernels on a CUDA GPU only and this run's device is "
            f"{device.type}: use train.loss_impl=chunked (or auto) here"
        )
    if impl.package and not is_installed(impl.package):
        raise UserError(
            f"train.loss_impl={name} needs the {impl.pip_name} package: pip install 'tokenmill[kernels]' "
            f"(or train.loss_impl=chunked)"
        )
    if impl.head_loss is not None and pp > 1:
        raise UserError(
            f"train.loss_impl={name} needs parallel.pp=1: pipeline stages end in the plain "
            f"cross-entropy of their logits; use train.loss_impl=auto with pipeline parallelism"
        )


def fused_token_loss(model: nn.Module, batch: Batch, head_loss: HeadLoss) -> torch.Tensor:
    """Summed token loss of one micro-batch with a fused head + cross-entropy kernel, through `model.loss`."""
    return model.loss(
        batch["tokens"], batch.get("doc_ids"), targets=targets_of(batch), reduction="sum", head_loss=head_loss
    )


def select_loss_fn(name: str, device: torch.device, chunk_size: int = 0, pp: int = 1) -> LossFn:
    """The Engine's `loss_fn` for `train.loss_impl=name` on `device` (checked: a UserError if it cannot run)."""
    check_loss_impl(name, device, pp)
    impl = LOSS_IMPLS[resolve_loss_impl(name, device, chunk_size, pp)]
    if impl.head_loss is not None:
        return functools.partial(fused_token_loss, head_loss=impl.head_loss)
    return build_loss_fn((chunk_size or DEFAULT_CHUNK_TOKENS) if impl.chunked else 0)
