"""FP8 training (`train.fp8`): torchao's Float8Linear in place of the blocks' nn.Linear layers.

Where it runs: the Engine calls `apply_fp8` after the model is built (and, with parallel.init=full, initialised)
and before activation checkpointing, torch.compile and FSDP2, the order torchtitan uses (float8 converter, then
AC, compile, FSDP2: pytorch/torchtitan torchtitan/models/llama3/parallelize.py). A model still on the meta
device is converted there and initialised after sharding; Float8Linear is an nn.Linear, so `init_weights()`
initialises it like any other linear layer.

Which layers: every nn.Linear whose in and out features are multiples of 16 (the FP8 GEMM, torch._scaled_mm,
needs them), except the output head (its logits feed the loss directly; torchtitan's float8 converter skips
its "output" layer too). Small GEMMs are converted too (torchao's `_auto_filter_for_recipe` would skip those
its H100 benchmarks found slower): the banner says that small models may get slower.

Recipes (torchao.float8 Float8LinearConfig.from_recipe_name): tensorwise (one dynamic scale per tensor; the
fastest) and rowwise (one scale per row: more accurate, slower GEMMs). With tensorwise under FSDP2 the weights
are all-gathered in FP8 (half the bytes of bf16), and after every optimizer step the scales of all weights are
computed together in one all-reduce (`precompute_float8_dynamic_scale_for_fsdp`; the Engine registers it as an
optimizer step post-hook).

Checkpoints: a Float8Linear keeps its weight as a high-precision parameter under the same name, so state-dict
keys, shapes and dtypes do not change and an FP8 run resumes without FP8 and the other way round. Under FP8
all-gather that weight is a torchao tensor subclass; a state-dict hook hands out its plain tensor instead, so
checkpoints hold plain tensors (loadable with safetensors and `torch.load(weights_only=True)`).

Expected benefit (published; not measured by tokenmill yet): about 1.17x tokens/s with tensorwise at ~1B
parameters on 8 H100s, rowwise 0.90x (karpathy/nanochat dev/LOG.md, 2026-02-02); +25-28% on Llama-3-8B
(pytorch/torchtitan benchmarks/llama3_h100_202412_torchtitan.md). Small models get slower (pytorch/ao#572),
and FP8 without torch.compile is several times slower than bf16 (nanochat measured 4x).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from tokenmill.errors import UserError

# train.fp8 -> torchao recipe name. The keys (plus "off") are FP8_MODE_NAMES in train/config.py.
FP8_RECIPES: dict[str, str] = {"tensorwise": "tensorwise", "rowwise": "rowwise"}
MIN_CAPABILITY = (8, 9)  # FP8 tensor cores: Ada (SM 8.9), Hopper (9.0), Blackwell (10.0)
DIM_MULTIPLE = 16  # torch._scaled_mm needs both GEMM dims of the weight to be multiples of 16
SKIPPED_MODULES = ("head",)  # names (last FQN component) never converted
# (published speed-up over bf16 at ~1B parameters, what it depends on): the banner's line
EXPECTED_BENEFIT: dict[str, str] = {
    "tensorwise": "published ~1.17x tokens/s at ~1B params (nanochat, 8xH100); smaller models gain less or slow down",
    "rowwise": "published ~0.90x tokens/s at ~1B params (nanochat, 8xH100): more accurate scales, slower GEMMs",
}


def check_fp8(mode: str, device: torch.device, compile: bool = True) -> list[str]:
    """Refuse (one-line UserError) FP8 that cannot run here; return warnings for FP8 that will run slowly.

    Needs an NVIDIA GPU with compute capability >= 8.9 and the torchao package. Without torch.compile the FP8
    casts run as separate kernels and a step gets slower than bf16, hence the warning.
    """
    if mode == "off":
        return []
    if mode not in FP8_RECIPES:
        raise UserError(f"train.fp8={mode!r} is not allowed: choose one of off, {', '.join(FP8_RECIPES)}")
    if device.type != "cuda":
        raise UserError(
            f"train.fp8={mode} needs an NVIDIA GPU with FP8 tensor cores (compute capability >= 8.9: "
            f"L4, L40S, H100, H200, B200) and this run's device is {device.type}: set train.fp8=off"
        )
    capability = torch.cuda.get_device_capability(device)
    if capability < MIN_CAPABILITY:
        raise UserError(
            f"train.fp8={mode} needs compute capability >= 8.9 and {torch.cuda.get_device_name(device)} "
            f"has {capability[0]}.{capability[1]} (no FP8 tensor cores): set train.fp8=off"
        )
    _import_torchao()
    if not compile:
        return [
            f"train.fp8={mode} without train.compile=true: FP8 casts run as separate kernels and training is "
            f"slower than bf16 (nanochat measured 4x); set train.compile=true"
        ]
    return []


def _import_torchao() -> Any:
    try:
        import torchao.float8
    except ImportError:
        raise UserError(
            "train.fp8 needs the torchao package: pip install 'tokenmill[fp8]' (or train.fp8=off)"
        ) from None
    return torchao.float8


def fp8_eligible(module: nn.Module, fqn: str) -> bool:
    """Convert this module? (torchao's `module_filter_fn`): a linear layer, not the head, dims multiples of 16."""
    if not isinstance(module, nn.Linear) or fqn.rsplit(".", 1)[-1] in SKIPPED_MODULES:
        return False
    return module.in_features % DIM_MULTIPLE == 0 and module.out_features % DIM_MULTIPLE == 0


def fp8_config(mode: str, fsdp_all_gather: bool = False, emulate: bool = False) -> Any:
    """torchao's Float8LinearConfig for `mode`; FP8 all-gather exists for tensorwise scaling only.

    `emulate` runs the FP8 casts and GEMMs in high precision, without FP8 hardware: for tests only (eager mode;
    torchao does not support it under torch.compile).
    """
    config = _import_torchao().Float8LinearConfig.from_recipe_name(FP8_RECIPES[mode])
    return dataclasses.replace(
        config, enable_fsdp_float8_all_gather=fsdp_all_gather and mode == "tensorwise", emulate=emulate
    )


def apply_fp8(model: nn.Module, mode: str, *, fsdp_all_gather: bool = False, emulate: bool = False) -> list[str]:
    """Swap the eligible nn.Linear layers of `model` for Float8Linear in place; returns their FQNs.

    Works on a model on the meta device too (it is then initialised after sharding, as usual).
    """
    if mode == "off":
        return []
    converted = [name for name, module in model.named_modules() if fp8_eligible(module, name)]
    if not converted:
        return []
    from torchao.float8 import convert_to_float8_training

    config = fp8_config(mode, fsdp_all_gather, emulate)
    convert_to_float8_training(model, module_filter_fn=fp8_eligible, config=config)
    if mode == "rowwise":
        # compiled rowwise scaling rounds its casts as eager does only with this set (pytorch/pytorch#150859;
        # torchtitan's float8 converter sets it too)
        import torch._inductor.config

        torch._inductor.config.emulate_precision_casts = True
    if fsdp_all_gather and mode == "tensorwise":
        model.register_state_dict_post_hook(_plain_weights)
    return converted


def uses_fp8_all_gather(model: nn.Module) -> bool:
    """Whether any Float8Linear weight is all-gathered in FP8 (then scales are precomputed after each step)."""
    from torchao.float8.fsdp_utils import WeightWithDynamicFloat8CastTensor

    return any(isinstance(_local(p), WeightWithDynamicFloat8CastTensor) for p in model.parameters())


def precompute_fp8_scales(model: nn.Module) -> None:
    """After an optimizer step under FP8 all-gather: every weight's FP8 scale in one all-reduce (torchao)."""
    from torchao.float8 import precompute_float8_dynamic_scale_for_fsdp

    precompute_float8_dynamic_scale_for_fsdp(model)


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return getattr(tensor, "_local_tensor", tensor)  # a DTensor's shard, else the tensor itself


def _plain(tensor: torch.Tensor) -> torch.Tensor:
    """The high-precision tensor inside torchao's FP8 all-gather weight wrapper (a DTensor stays a DTensor)."""
    from torchao.float8.fsdp_utils import WeightWithDynamicFloat8CastTensor

    local = _local(tensor)
    if not isinstance(local, WeightWithDynamicFloat8CastTensor):
        return tensor
    if local is tensor:
        return local._tensor
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(
        local._tensor,
        tensor.device_mesh,
        tensor.placements,
        run_check=False,
        shape=tensor.shape,
        stride=tensor.stride(),
    )


def _plain_weights(module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    """State-dict post-hook: checkpoints get plain tensors, never the FP8 all-gather wrapper."""
    for key, value in state_dict.items():
        if isinstance(value, torch.Tensor):
            state_dict[key] = _plain(value)
