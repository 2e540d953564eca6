"""The `train`, `eval` and `stability` config sections: what the loop trains, how it measures, when it stops.

`train` holds the budget, the batch, precision, levers, the run folder and the device; `eval` the held-out
evaluation and the samples printed with it; `stability` the non-finite step policy and the divergence detector.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from tokenmill.config.fields import opt, require, require_choice, require_positive

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
NONFINITE_POLICIES = ("skip", "stop")
ACTIVATION_CHECKPOINTING = ("none", "all", "every_k")
DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:\d+)?")
# The keys of tokenmill.levers.fp8.FP8_RECIPES (plus "off") and tokenmill.levers.fused_loss.LOSS_IMPLS (plus
# "auto"), the names validation accepts (tests/levers keeps them equal).
FP8_MODE_NAMES = ("off", "tensorwise", "rowwise")
LOSS_IMPL_NAMES = ("auto", "torch", "chunked", "liger", "cce")
COMPILE_SCOPE_NAMES = ("auto", "model", "blocks")  # the keys of tokenmill.levers.compile.COMPILE_SCOPES


@dataclass
class TrainConfig:
    seed: int = opt(1337, "seed for model init, data order and sampling")
    total_tokens: int = opt(0, "training budget in tokens; 0 = 20 x parameters (Chinchilla)")
    max_steps: int = opt(0, "stop after this many optimizer steps; 0 = derived from total_tokens")
    global_batch_tokens: int = opt(0, "tokens per optimizer step over all ranks; 0 = one micro-batch per rank")
    grad_accum: int = opt(
        0,
        "micro-steps per optimizer step on each data-parallel rank; 0 = derived from "
        "global_batch_tokens (1 when that is 0)",
    )
    micro_batch_size: int = opt(8, "sequences per forward pass per rank")
    seq_len: int = opt(256, "tokens per training sequence (windows hold seq_len + 1 tokens)")
    precision: str = opt("auto", "fp32, bf16 (autocast, fp32 master weights), fp16 (grad scaler) or auto")
    compile: bool = opt(False, "torch.compile the training step (scope: train.compile_scope)")
    compile_scope: str = opt(
        "auto",
        "with train.compile: model (one graph for the whole loss), blocks (one per block, before FSDP), or auto "
        "(model unless FSDP, pipeline stages, activation checkpointing, FP8 or a fused loss kernel need blocks)",
    )
    activation_checkpointing: str = opt("none", "none, all, or every_k (see ac_every)")
    ac_every: int = opt(2, "with activation_checkpointing=every_k: checkpoint every k-th block")
    document_masking: bool = opt(False, "attention stays within each packed document (block-diagonal causal mask)")
    loss_chunk_size: int = opt(0, "tokens per chunk of the output-head + loss; 0 = one pass")
    loss_impl: str = opt(
        "auto",
        "output head + cross-entropy: torch (one pass), chunked (loss_chunk_size), liger or cce (fused GPU "
        "kernels, never full logits), auto (best available here)",
    )
    fp8: str = opt(
        "off",
        "FP8 matmuls in the blocks' linear layers (torchao float8, GPU with SM >= 8.9): off, tensorwise or rowwise",
    )
    grad_clip: float = opt(1.0, "clip the global gradient norm to this; 0 = no clipping")
    step_cadence: float = opt(1.0, "multiply every log/eval/checkpoint interval (steps or tokens) by this")
    out_dir: str = opt("runs/demo", "run folder: checkpoints, logs, tokenizer cache")
    init_from: str = opt(
        "",
        "start a new run from this checkpoint's weights (or a run folder's latest) with a fresh optimizer, "
        "schedule and data order; --resume continues a run instead",
    )
    device: str = opt("auto", "auto, cpu, cuda, cuda:N")

    def validate(self) -> None:
        require_positive(self, "train", "micro_batch_size", "seq_len", "step_cadence", "ac_every")
        require_positive(
            self,
            "train",
            "total_tokens",
            "max_steps",
            "global_batch_tokens",
            "grad_accum",
            "grad_clip",
            allow_zero=True,
        )
        require(
            math.isfinite(self.step_cadence),
            "train.step_cadence",
            self.step_cadence,
            "must be a finite number > 0 (e.g. 0.5 or 2)",
        )
        require_choice("train.precision", self.precision, PRECISIONS)
        require_choice("train.activation_checkpointing", self.activation_checkpointing, ACTIVATION_CHECKPOINTING)
        require_choice("train.loss_impl", self.loss_impl, LOSS_IMPL_NAMES)
        require_choice("train.fp8", self.fp8, FP8_MODE_NAMES)
        require_choice("train.compile_scope", self.compile_scope, COMPILE_SCOPE_NAMES)
        require(
            not (self.loss_impl == "torch" and self.loss_chunk_size > 0),
            "train.loss_chunk_size",
            self.loss_chunk_size,
            "chunks only the chunked loss: set train.loss_impl=chunked (or auto), or train.loss_chunk_size=0 for "
            "loss_impl=torch",
        )
        require(
            bool(self.out_dir.strip()),
            "train.out_dir",
            self.out_dir,
            "name the run folder, e.g. train.out_dir=runs/my_run",
        )
        require(
            DEVICE_PATTERN.fullmatch(self.device) is not None,
            "train.device",
            self.device,
            "choose auto, cpu, cuda or cuda:N",
        )


@dataclass
class EvalConfig:
    interval_steps: int = opt(100, "evaluate every N steps (scaled by train.step_cadence); 0 = only at the end")
    interval_tokens: int = opt(
        0, "evaluate every N training tokens (scaled by train.step_cadence); when > 0 it replaces interval_steps"
    )
    max_batches: int = opt(8, "micro-batches per rank per evaluation; 0 = the whole eval set (one pass)")
    sample_prompts: list[str] = opt(["def ", "import ", "class "], "prompts sampled after the final evaluation")
    sample_tokens: int = opt(48, "tokens generated per sample prompt")
    tasks: list[str] = opt([], "lm-evaluation-harness tasks run at each evaluation, e.g. [arc_easy] (tokenmill[eval])")
    tasks_limit: int = opt(0, "examples per lm-eval task; 0 = every example")
    tasks_include_path: str = opt("", "folder of extra lm-eval task YAMLs (local datasets) for eval.tasks")

    def validate(self) -> None:
        require_positive(
            self,
            "eval",
            "interval_steps",
            "interval_tokens",
            "max_batches",
            "sample_tokens",
            "tasks_limit",
            allow_zero=True,
        )


@dataclass
class StabilityConfig:
    nonfinite_policy: str = opt("skip", "on non-finite loss or gradients: skip the step or stop (with a checkpoint)")
    divergence_threshold: float = opt(1.0, "stop when fast loss EMA exceeds slow EMA by this; 0 = off")
    divergence_fast_alpha: float = opt(0.1, "weight of a new loss in the fast EMA")
    divergence_slow_alpha: float = opt(0.01, "weight of a new loss in the slow EMA")
    divergence_warmup_steps: int = opt(50, "steps before the divergence detector may fire")

    def validate(self) -> None:
        require_choice("stability.nonfinite_policy", self.nonfinite_policy, NONFINITE_POLICIES)
        require_positive(self, "stability", "divergence_threshold", "divergence_warmup_steps", allow_zero=True)
        require(
            math.isfinite(self.divergence_threshold),
            "stability.divergence_threshold",
            self.divergence_threshold,
            "must be a finite number >= 0 (0 = off)",
        )
        require(
            0 < self.divergence_fast_alpha <= 1,
            "stability.divergence_fast_alpha",
            self.divergence_fast_alpha,
            "must be in (0, 1]",
        )
        require(
            0 < self.divergence_slow_alpha < self.divergence_fast_alpha,
            "stability.divergence_slow_alpha",
            self.divergence_slow_alpha,
            "must be in (0, stability.divergence_fast_alpha)",
        )
