"""The one place that knows how wrappers change a model: `unwrap()` finds the plain module under them and
`canonical_name()` strips the name components they insert.

Checkpoints, optimizer parameter groups, activation checkpointing and metrics all speak in the plain
single-device names (`blocks.3.attn.q_proj.weight`), so a checkpoint saved under one set of wrappers loads
under any other, and a new wrapper is taught here once.
"""

from __future__ import annotations

import sys

from torch import nn

# Name components inserted by wrappers: DDP / DataParallel (`module.`, around the root only), torch.compile's
# OptimizedModule (`_orig_mod.`, around the root or, compiled per block, inside), activation checkpointing's
# CheckpointWrapper (`_checkpoint_wrapped_module.`, around blocks) and FSDP1 (`_fsdp_wrapped_module.`).
WRAPPER_PREFIXES = ("module.", "_orig_mod.", "_checkpoint_wrapped_module.", "_fsdp_wrapped_module.")
ROOT_ONLY_PREFIXES = ("module.",)  # elsewhere `module` may be a real submodule name


def canonical_name(name: str) -> str:
    """`name` without wrapper components: `module._orig_mod.blocks.0._checkpoint_wrapped_module.w` ->
    `blocks.0.w`. A leading run of any wrapper prefix is dropped; inside the name only the prefixes that
    wrappers put around inner modules are."""
    parts = name.split(".")
    while len(parts) > 1 and f"{parts[0]}." in WRAPPER_PREFIXES:
        parts = parts[1:]
    inner = {prefix[:-1] for prefix in WRAPPER_PREFIXES if prefix not in ROOT_ONLY_PREFIXES}
    return ".".join(part for part in parts if part not in inner)


def _is_instance(module: nn.Module, module_name: str, class_name: str) -> bool:
    """isinstance against a class of a torch module that is never imported here: an instance can only exist
    once its module is loaded, and importing torch._dynamo just to check would cost seconds."""
    owner = sys.modules.get(module_name)
    return owner is not None and isinstance(module, getattr(owner, class_name))


def is_compiled(module: nn.Module) -> bool:
    """True for torch.compile's OptimizedModule."""
    return _is_instance(module, "torch._dynamo.eval_frame", "OptimizedModule")


def uncompiled(module: nn.Module) -> nn.Module:
    """The module under torch.compile wrappers (the DDP or FSDP module that owns gradient sync, if any)."""
    while is_compiled(module):
        module = module._orig_mod
    return module


def unwrap(module: nn.Module) -> nn.Module:
    """The plain model under torch.compile, DDP / DataParallel and activation-checkpoint wrappers.

    FSDP2 shards parameters in place without a wrapper module, so a `fully_shard`-ed model is returned as is.
    """
    while True:
        module = uncompiled(module)
        if isinstance(module, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            module = module.module
        elif _is_instance(module, "torch.distributed.algorithms._checkpoint.checkpoint_wrapper", "CheckpointWrapper"):
            module = module._checkpoint_wrapped_module
        else:
            return module
