"""Which parameters get weight decay, and which get Muon: one classification shared by every optimizer.

Every parameter is given a *role*, decided from the module that owns it and its shape, never from a model's
name, so the rule works on any `nn.Module`:

| role        | what                                                    | decay                     | Muon |
|-------------|---------------------------------------------------------|---------------------------|------|
| `matrix`    | >= 2-D weight of a hidden layer (attention, MLP)        | yes                       | yes  |
| `head`      | untied output projection (see `output_layer`)           | yes                       | no   |
| `embedding` | weight of an `nn.Embedding` (tokens, positions; a tied  | `optim.decay_embeddings`  | no   |
|             | head *is* this parameter, so it is counted once)        | (default no)              |      |
| `norm`      | weight of a normalisation layer                         | `optim.decay_norms_biases`| no   |
| `bias`      | any other 0-/1-D parameter                              | (default no)              | no   |

Why no decay on norms, biases and embeddings: decaying gains and offsets pulls them towards 0 rather than
towards their neutral value (1 for a norm gain), and embeddings of rare tokens see few gradients so decay
dominates them (nanoGPT `configure_optimizers`; Loshchilov & Hutter 2019 apply decay to weights only).
Muon is meant for hidden-layer matrices only; the embedding and the classifier head stay on AdamW
(Keller Jordan 2024, https://kellerjordan.github.io/posts/muon/).

Wrappers are transparent: `module.` (DDP), `_orig_mod.` (torch.compile) and `_checkpoint_wrapped_module.`
(activation checkpointing) are dropped from names; FSDP2 DTensor parameters report their global shape.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from tokenmill.parallel.wrappers import canonical_name, unwrap

NORM_TYPES: tuple[type[nn.Module], ...] = (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nn.modules.batchnorm._BatchNorm)

ROLES = ("matrix", "head", "embedding", "norm", "bias")
DECAY_ROLES = frozenset({"matrix", "head"})
MUON_ROLES = frozenset({"matrix"})


def _is_norm(module: nn.Module) -> bool:
    """A normalisation layer: a known torch type, or a custom class named like one (`RMSNorm`, `LayerNorm`)."""
    return isinstance(module, NORM_TYPES) or type(module).__name__.lower().endswith("norm")


def output_layer(model: nn.Module) -> nn.Module | None:
    """The untied output projection, or None (tied, or no head).

    Decided by the model's own declaration first: Hugging Face's `get_output_embeddings()`, else a `head`,
    `lm_head` or `output` attribute (tokenmill's Transformer has `head`, None when tied). Only a model that
    declares none of these falls back to the last `nn.Linear` whose output size is the token vocabulary
    (an FFN can have d_ff == vocab, so shape alone cannot decide when a declaration exists).
    """
    plain = unwrap(model)
    getter = getattr(plain, "get_output_embeddings", None)
    if callable(getter):
        try:
            return getter()
        except NotImplementedError:
            pass
    for attr in ("head", "lm_head", "output"):
        if hasattr(plain, attr) and (getattr(plain, attr) is None or isinstance(getattr(plain, attr), nn.Module)):
            return getattr(plain, attr)
    vocab = {m.num_embeddings for m in plain.modules() if isinstance(m, nn.Embedding)}
    linears = [m for m in plain.modules() if isinstance(m, nn.Linear) and m.out_features in vocab]
    return linears[-1] if linears else None


def parameter_roles(model: nn.Module) -> dict[str, str]:
    """Map each trainable parameter's clean name to its role (see the module docstring's table).

    Shared parameters (a tied head) appear once, under the first name `named_parameters` yields.
    """
    owner: dict[int, nn.Module] = {}
    for module in model.modules():
        for p in module.parameters(recurse=False):
            owner.setdefault(id(p), module)
    head = output_layer(model)
    roles: dict[str, str] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        module = owner.get(id(p))
        if isinstance(module, nn.Embedding):
            role = "embedding"
        elif module is not None and _is_norm(module):
            role = "norm"
        elif p.ndim < 2:
            role = "bias"
        elif head is not None and module is head:
            role = "head"
        else:
            role = "matrix"
        roles[canonical_name(name)] = role
    return roles


def decay_switches(cfg: Any) -> dict[str, bool]:
    """`decays` keyword arguments from an optim config; the old `decay_norms_biases_embeddings` key sets both."""
    both = bool(getattr(cfg, "decay_norms_biases_embeddings", False))
    return {"decay_embeddings": both or cfg.decay_embeddings, "decay_norms_biases": both or cfg.decay_norms_biases}


def decays(role: str, decay_embeddings: bool = False, decay_norms_biases: bool = False) -> bool:
    """Whether a parameter of this role gets weight decay (see the module docstring's table)."""
    return (
        role in DECAY_ROLES
        or (decay_embeddings and role == "embedding")
        or (decay_norms_biases and role in ("norm", "bias"))
    )


def named_trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    """Clean name -> parameter, each shared parameter once."""
    return {canonical_name(n): p for n, p in model.named_parameters() if p.requires_grad}


def build_param_groups(
    model: nn.Module,
    weight_decay: float,
    *,
    decay_embeddings: bool = False,
    decay_norms_biases: bool = False,
    role_lrs: dict[str, float] | None = None,
    **group_options: Any,
) -> list[dict[str, Any]]:
    """Optimizer groups, `decay` then `no_decay`, each carrying its `names` (empty groups are dropped).

    `group_options` (lr, betas, ...) are copied into every group. `role_lrs` (role -> lr) splits a group whose
    roles have different LRs: one group per (decay, lr), each with its `roles`, in the order first seen.
    """
    roles = parameter_roles(model)
    params = named_trainable(model)
    base_lr = group_options.get("lr")
    groups: dict[tuple[str, Any], tuple[list[str], list[nn.Parameter]]] = {("decay", base_lr): ([], [])}
    groups[("no_decay", base_lr)] = ([], [])
    for name, p in params.items():
        key = "decay" if decays(roles[name], decay_embeddings, decay_norms_biases) else "no_decay"
        lr = (role_lrs or {}).get(roles[name], base_lr)
        names, ps = groups.setdefault((key, lr), ([], []))
        names.append(name)
        ps.append(p)
    out = []
    for (key, lr), (names, ps) in sorted(groups.items(), key=lambda kv: kv[0][0] != "decay"):
        if ps:
            wd = weight_decay if key == "decay" else 0.0
            group = {"params": ps, "names": names, "weight_decay": wd, "group": key, **group_options}
            if lr is not None:
                group["lr"] = lr
            group["roles"] = sorted({roles[n] for n in names})
            out.append(group)
    return out
