"""The start-up banner: model, training, hardware and theoretical performance at a glance.

`build_banner(...)` gathers the numbers once; `Banner.as_dict()` is the JSONL "startup" event and
`Banner.print()` shows the same numbers as a rich table on the console.
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass, field
from typing import Any

import torch

GIB = 2**30
BANNER_MFU = 0.5  # the "expected tokens/s" line assumes this model FLOPs utilisation
SECTIONS = ("model", "training", "hardware", "theoretical")
WIDE_SECTIONS = ("recipe",)  # values too long for the two-pair rows: printed one per line below the table
# Console labels for keys too long for an 80-column table (the JSONL keeps the keys).
LABELS = {
    "params_non_embedding": "params non-emb",
    "params_trainable": "params trainable",
    "params_total": "params total",
    "global_batch_sequences": "global batch seqs",
    "activation_checkpointing": "act. checkpointing",
    "expected_tokens_per_s_at_50_mfu": "tok/s at 50% MFU",
    "attention_ffn_ratio": "attention/FFN",
    "tokens_per_param": "tokens/param",
    "pipeline_stages": "pipeline stages",
    "micro_batch_size": "micro-batch",
    "memory_gib": "memory",
    "log_every_steps": "log every",
    "eval_every_steps": "eval every",
    "checkpoint_every_steps": "save every",
    "optimizer_groups": "groups",
}


@dataclass
class Banner:
    info: dict[str, dict[str, Any]] = field(default_factory=dict)

    def as_dict(self) -> dict[str, dict[str, Any]]:
        return self.info

    def renderable(self) -> Any:
        from rich.console import Group
        from rich.text import Text

        lines = [
            Text.assemble((f" {section} {LABELS.get(key, key)}: ", "bold cyan"), str(value))
            for section in WIDE_SECTIONS
            for key, value in self.info.get(section, {}).items()
        ]
        return Group(render_banner(self.info), *lines)

    def print(self, console: Any = None) -> None:
        from tokenmill.metrics.sinks import get_console

        (console or get_console()).print(self.renderable())


def _device_info(device: torch.device) -> tuple[str, float | None]:
    """(device name, memory GiB per device): the GPU's, or the CPU's and the machine's RAM."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return props.name, props.total_memory / GIB
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB
    except (ValueError, OSError, AttributeError):
        ram = None
    name = platform.processor() or platform.machine() or "cpu"
    return f"{name} ({torch.get_num_threads()} threads)", ram


def build_banner(
    cfg: Any,
    counts: dict[str, int] | None,
    plan: Any,
    dist: Any = None,
    precision: str | None = None,
    resumed_from: Any = None,
    *,
    cadence: Any = None,
    peak_tflops: float | None | str = "auto",
) -> Banner:
    """Collect the start-up numbers. `counts` is tokenmill.model.param_counts(cfg.model); `plan` the BatchPlan;
    `cadence` (the loop's Cadence) adds the log / eval / checkpoint intervals in steps (0 = only at the end).

    Peak TFLOPS come from the GPU table in metrics/flops.py (None on CPUs and unknown GPUs: never
    guessed); FLOPs/token and the attention/FFN split use the same formula as MFU (flops_breakdown).
    """
    from tokenmill.metrics.flops import flops_breakdown
    from tokenmill.metrics.monitor import detect_peak_tflops

    m = cfg.model
    if counts is None:
        from tokenmill.model import param_counts

        counts = param_counts(m)
    device = torch.device(getattr(dist, "device", "cpu"))
    n_devices = getattr(dist, "world_size", 1)
    precision = precision or cfg.train.precision
    if peak_tflops == "auto":
        peak_tflops, _ = detect_peak_tflops(device, precision)
    flops = flops_breakdown(m, plan.seq_len)
    device_name, memory = _device_info(device)
    expected = BANNER_MFU * peak_tflops * 1e12 * n_devices / flops["total"] if peak_tflops else None
    info = {
        "model": {
            "params_total": counts["total"],
            "params_non_embedding": counts["non_embedding"],
            "params_trainable": counts["trainable"],
            "n_layers": m.n_layers,
            "d_model": m.d_model,
            "n_heads": m.n_heads,
            "n_kv_heads": m.kv_heads(),
            "head_dim": m.resolved_head_dim(),
            "seq_len": plan.seq_len,
            "vocab_size": m.vocab_size,
            "ffn": m.ffn,
            "ffn_hidden": m.ffn_width(),
            "position": m.position,
            "norm": m.norm,
            "attention": m.attention,
            "tie_embeddings": m.tie_embeddings,
        },
        "training": {
            "micro_batch_size": plan.micro_batch_size,
            "grad_accum": plan.grad_accum,
            "data_parallel": plan.world_size,
            "global_batch_sequences": plan.global_batch_sequences,
            "tokens_per_step": plan.tokens_per_step,
            "total_steps": plan.total_steps,
            "total_tokens": plan.total_tokens,
            "tokens_per_param": plan.total_tokens / max(counts["total"], 1),
            "resumed_from": str(resumed_from) if resumed_from is not None else None,
        },
        "recipe": recipe_lines(cfg, plan),
        "hardware": {
            "device": device.type,
            "device_name": device_name,
            "count": n_devices,
            "memory_gib": memory,
            "precision": precision,
            "strategy": cfg.parallel.strategy if n_devices > 1 else "single",
            "pipeline_stages": cfg.parallel.pp,
            "compile": cfg.train.compile,
            "activation_checkpointing": cfg.train.activation_checkpointing,
            "fp8": fp8_line(cfg.train.fp8),
        },
        "theoretical": {
            "peak_tflops": peak_tflops,
            "flops_per_token": flops["total"],
            "attention_ffn_ratio": (flops["attention_proj"] + flops["attention_scores"]) / flops["ffn"]
            if flops["ffn"]
            else None,
            "expected_tokens_per_s_at_50_mfu": expected,
            "total_flops": flops["total"] * plan.total_tokens,
        },
    }
    if cadence is not None:
        info["training"].update(
            log_every_steps=cadence.log_every,
            eval_every_steps=cadence.eval_every,
            checkpoint_every_steps=cadence.checkpoint_every,
        )
    return Banner(info)


def recipe_lines(cfg: Any, plan: Any) -> dict[str, str]:
    """The effective recipe: each optimizer group with its LR (after sqrt batch scaling), and the LR schedule."""
    from tokenmill.optim.optimizers import scaled_lr
    from tokenmill.optim.recipe import describe_groups, describe_schedule

    lr_scale = scaled_lr(1.0, plan.global_batch_sequences, cfg.optim.lr_sqrt_batch_scaling)
    return {
        "optimizer_groups": describe_groups(cfg.optim, cfg.model.d_model, cfg.model.tie_embeddings, lr_scale),
        "schedule": describe_schedule(cfg.schedule, plan.total_steps, plan.tokens_per_step),
    }


def fp8_line(mode: str) -> str:
    """`train.fp8` with the benefit to expect, as published (tokenmill has not measured it)."""
    if mode == "off":
        return "off"
    from tokenmill.levers.fp8 import EXPECTED_BENEFIT

    return f"{mode}: {EXPECTED_BENEFIT[mode]}"


def _fmt(key: str, value: Any) -> str:
    from tokenmill.metrics.sinks import human

    if value is None:
        return "n/a" if key not in ("peak_tflops", "expected_tokens_per_s_at_50_mfu") else "n/a (no GPU peak known)"
    if isinstance(value, (bool, str)):
        return str(value)
    if key.endswith("_gib"):
        return f"{value:.1f} GiB"
    if key in ("tokens_per_param", "attention_ffn_ratio", "peak_tflops"):
        return f"{value:.3g}"
    if isinstance(value, float) and ("flops" in key):
        return f"{value:.3g}"
    if isinstance(value, (int, float)) and abs(value) >= 10_000:
        return human(value)
    return str(value)


def render_banner(info: dict[str, dict[str, Any]]) -> Any:
    """A rich table of the banner dict: one titled block per section, two key/value pairs per row."""
    from rich import box
    from rich.table import Table

    table = Table(title="tokenmill", box=box.SIMPLE_HEAD, show_header=False, title_style="bold", pad_edge=False)
    for _ in range(4):
        table.add_column()
    for section in SECTIONS:
        values = [(k, v) for k, v in info.get(section, {}).items() if not (k == "resumed_from" and v is None)]
        table.add_row(f"[bold cyan]{section}[/]", "", "", "", end_section=False)
        for i in range(0, len(values), 2):
            row: list[str] = []
            for key, value in values[i : i + 2]:
                row += [f"[dim]{LABELS.get(key, key.replace('_', ' '))}[/]", _fmt(key, value)]
            table.add_row(*row, end_section=i + 2 >= len(values))
    return table
