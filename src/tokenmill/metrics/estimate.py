"""What a run will cost before spending GPU hours: the exact parameter count (the real model built on the meta
device), FLOPs per token, a per-GPU memory plan, the largest micro-batch that fits a named GPU and the
time to the token budget at 40% and 50% MFU. Formulas and their sources live in
`tokenmill.metrics.flops` (FLOPs, GPU peaks) and `tokenmill.metrics.memory` (bytes).

The loss's memory depends on `train.loss_impl`: the plan uses the configured implementation, and for `auto` the
portable one (chunked when train.loss_chunk_size > 0, else torch), so the plan does not depend on which kernel
packages this machine has; `loss.by_impl` lists every implementation's loss memory at the planned micro-batch.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from tokenmill.errors import UserError
from tokenmill.metrics import flops, memory

DEFAULT_GPU = "H100 SXM"
MFU_TARGETS = (0.4, 0.5)
CHINCHILLA_TOKENS_PER_PARAM = 20  # Hoffmann et al. 2022: compute-optimal ~20 tokens per parameter


def resolve_gpu(name: str) -> flops.GPUSpec:
    spec = flops.lookup_gpu(name)
    if spec is None:
        raise UserError(
            f"unknown GPU '{name}': use one of {', '.join(flops.GPUS)} "
            "(or a torch.cuda.get_device_name() string of one of them)"
        )
    return spec


def resolve_vocab(cfg: Any) -> tuple[Any, str]:
    """A model config with vocab_size > 0, and a note when it had to be derived (vocab_size = 0)."""
    model = cfg.model
    if model.vocab_size > 0:
        return model, ""
    mult = model.vocab_multiple_of
    if cfg.data.tokenizer == "bpe":  # trained on first use: its size is the requested one
        size, where = cfg.data.tokenizer_vocab_size, f"data.tokenizer_vocab_size={cfg.data.tokenizer_vocab_size}"
    else:  # byte, a tokenizer.json path, or a Hub name (from the local cache when offline)
        from tokenmill.data.tokenizer import load_tokenizer

        try:
            size = load_tokenizer(cfg.data.tokenizer).vocab_size
        except UserError as err:
            raise UserError(
                f"model.vocab_size=0 needs the tokenizer's size, which could not be read ({err}); set model.vocab_size"
            ) from None
        where = f"tokenizer {cfg.data.tokenizer!r} vocab {size}"
    vocab = -(-size // mult) * mult  # the trainer's rule (train.resolve_model_vocab)
    note = f"model.vocab_size=0: {where} rounded up to a multiple of model.vocab_multiple_of={mult} = {vocab}"
    return dataclasses.replace(model, vocab_size=vocab), note


def planned_loss_impl(cfg: Any) -> tuple[str, int]:
    """(loss implementation, chunk size) the memory plan assumes: `auto` is planned as its portable choice."""
    from tokenmill.levers.fused_loss import DEFAULT_CHUNK_TOKENS

    chunk, impl = cfg.train.loss_chunk_size, cfg.train.loss_impl
    if impl == "auto":
        impl = "chunked" if chunk > 0 else "torch"
    return impl, (chunk or DEFAULT_CHUNK_TOKENS) if impl == "chunked" else chunk


def estimate(cfg: Any, gpu: flops.GPUSpec, micro_batch: int | None = None, n_gpus: int = 1) -> dict[str, Any]:
    """Everything `tokenmill estimate` prints, as plain numbers (bytes, FLOPs, seconds)."""
    from tokenmill.levers.fused_loss import DEFAULT_CHUNK_TOKENS, LOSS_IMPLS
    from tokenmill.model import param_counts  # builds the real model on the meta device: exact counts

    if micro_batch is not None and micro_batch < 1:
        raise UserError(f"--micro-batch={micro_batch} is not allowed: must be >= 1")
    if n_gpus < 1:
        raise UserError(f"--n-gpus={n_gpus} is not allowed: must be >= 1")
    model, vocab_note = resolve_vocab(cfg)
    seq_len = cfg.train.seq_len
    batch = micro_batch or cfg.train.micro_batch_size
    counts = dict(param_counts(model))
    counts["matmul"] = sum(flops.matmul_params(model).values())
    total = counts["total"]

    parts = flops.flops_breakdown(model, seq_len)
    per_token = parts["total"]
    attention = parts["attention_proj"] + parts["attention_scores"]

    notes = [vocab_note] if vocab_note else []
    if cfg.optim.name != "adamw":
        notes.append(f"optim.name={cfg.optim.name}: the optimizer state is planned as AdamW (2 fp32 states)")
    if model.attention == "sdpa":
        notes.append("attention memory assumes SDPA's flash/memory-efficient kernels (GPU); no score matrix")
    loss_impl, chunk = planned_loss_impl(cfg)
    plan: dict[str, Any] = {}
    fit: dict[str, Any] = {}
    for mode_name, mode in memory.MODES.items():
        static = memory.static_bytes(total, mode)
        acts = {
            label: memory.activation_bytes(model, mode, batch, seq_len, ac, chunk, loss_impl)
            for label, ac in (("none", False), ("all", True))
        }
        plan[mode_name] = {
            **{k: v for k, v in static.items() if k != "total"},
            "static_total": static["total"],
            "activations": acts,
            "peak_total": {k: static["total"] + a["total"] for k, a in acts.items()},
        }
        fit[mode_name] = {
            label: memory.max_micro_batch(model, mode, total, seq_len, gpu.memory_gib, ac, chunk, loss_impl=loss_impl)
            for label, ac in (("none", False), ("all", True))
        }

    bf16 = memory.MODES["bf16-mixed"]
    loss_impls = {}
    for name in LOSS_IMPLS:
        loss_parts = memory.loss_bytes(model, bf16, batch * seq_len, name, chunk or DEFAULT_CHUNK_TOKENS)
        loss_impls[name] = {**loss_parts, "total": loss_parts["logits"] + loss_parts["loss_backward"]}
    notes.append(
        f"loss memory (logits + loss gradients, bf16-mixed, micro-batch {batch}) by train.loss_impl: "
        + ", ".join(f"{name} {v['total'] / memory.GIB:.2f} GiB" for name, v in loss_impls.items())
        + f"; planned: {loss_impl} (train.loss_impl={cfg.train.loss_impl}"
        + (
            "; on a GPU with cut-cross-entropy or liger-kernel installed auto takes that kernel)"
            if cfg.train.loss_impl == "auto"
            else ")"
        )
    )
    acts = plan["bf16-mixed"]["activations"]["none"]
    if loss_impl == "torch" and acts["logits"] + acts["loss_backward"] > 0.25 * acts["total"]:
        notes.append(
            "the fp32 logits and their gradients are over a quarter of the activations: "
            "train.loss_impl=chunked (or cce / liger on a GPU) removes most of them"
        )
    if cfg.train.total_tokens:
        budget, budget_source = cfg.train.total_tokens, "train.total_tokens"
    else:
        budget, budget_source = CHINCHILLA_TOKENS_PER_PARAM * total, "20 x parameters (Chinchilla)"
    times = {f"{m:.0%}": budget * per_token / (m * gpu.bf16_tflops * 1e12 * n_gpus) for m in MFU_TARGETS}

    return {
        "model": {
            "n_layers": model.n_layers,
            "d_model": model.d_model,
            "n_heads": model.n_heads,
            "n_kv_heads": model.kv_heads(),
            "head_dim": model.resolved_head_dim(),
            "ffn": model.ffn,
            "ffn_hidden": model.ffn_width(),
            "vocab_size": model.vocab_size,
            "tie_embeddings": model.tie_embeddings,
            "seq_len": seq_len,
        },
        "parameters": counts,
        "flops": {
            "seq_len": seq_len,
            "per_token": per_token,
            "per_token_causal": flops.flops_per_token(model, seq_len, causal=True),
            "six_n": 6.0 * counts["matmul"],
            "breakdown": parts,
            "attention_ffn_ratio": attention / parts["ffn"] if parts["ffn"] else None,
            "attention_scores_share": parts["attention_scores"] / per_token,
            "formula": "6 N_matmul + 12 L n_heads d_head S (PaLM app. B; non-causal)",
        },
        "gpu": dataclasses.asdict(gpu),
        "memory": {
            "micro_batch": batch,
            "seq_len": seq_len,
            "plan": plan,
            "usable_bytes": memory.usable_bytes(gpu.memory_gib),
            "safety": f"{memory.RESERVED_GIB:g} GiB reserved for the CUDA context, then "
            f"{memory.SAFETY_FRACTION:.0%} of the rest kept free",
        },
        "max_micro_batch": fit,
        "loss": {"impl": loss_impl, "chunk_size": chunk, "by_impl": loss_impls},
        "budget": {
            "tokens": budget,
            "source": budget_source,
            "n_gpus": n_gpus,
            "peak_tflops": gpu.bf16_tflops,
            "time_s": times,
        },
        "notes": notes,
    }
