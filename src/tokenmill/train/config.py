"""The `train` config section: budget, batch, precision, levers, stability, evaluation cadence."""

from __future__ import annotations

from dataclasses import dataclass

from tokenmill.config.fields import opt, require, require_choice, require_positive

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
NONFINITE_POLICIES = ("skip", "stop")


@dataclass
class TrainConfig:
    seed: int = opt(1337, "seed for model init, data order and sampling")
    total_tokens: int = opt(0, "training budget in tokens; 0 = 20 x parameters (Chinchilla)")
    max_steps: int = opt(0, "stop after this many optimizer steps; 0 = derived from total_tokens")
    global_batch_tokens: int = opt(0, "tokens per optimizer step over all ranks; 0 = one micro-batch per rank")
    grad_accum: int = opt(0, "micro-steps per optimizer step on each data-parallel rank; 0 = derived from "
                              "global_batch_tokens (1 when that is 0)")
    micro_batch_size: int = opt(8, "sequences per forward pass per rank")
    seq_len: int = opt(256, "tokens per training sequence (windows hold seq_len + 1 tokens)")
    precision: str = opt("auto", "fp32, bf16 (autocast, fp32 master weights), fp16 (grad scaler) or auto")
    compile: bool = opt(False, "torch.compile the model (applied after any parallel wrapping)")
    activation_checkpointing: str = opt("none", "none, all, or every_k (see ac_every)")
    ac_every: int = opt(2, "with activation_checkpointing=every_k: checkpoint every k-th block")
    document_masking: bool = opt(False, "attention stays within each packed document (block-diagonal causal mask)")
    loss_chunk_size: int = opt(0, "tokens per chunk of the output-head + loss; 0 = one pass")
    grad_clip: float = opt(1.0, "clip the global gradient norm to this; 0 = no clipping")
    nonfinite_policy: str = opt("skip", "on non-finite loss or gradients: skip the step or stop (with a checkpoint)")
    divergence_threshold: float = opt(1.0, "stop when fast loss EMA exceeds slow EMA by this; 0 = off")
    divergence_fast_alpha: float = opt(0.1, "weight of a new loss in the fast EMA")
    divergence_slow_alpha: float = opt(0.01, "weight of a new loss in the slow EMA")
    divergence_warmup_steps: int = opt(50, "steps before the divergence detector may fire")
    eval_interval: int = opt(100, "evaluate every N steps; 0 = only at the end")
    eval_batches: int = opt(8, "micro-batches per evaluation")
    sample_prompts: list[str] = opt(["def ", "import ", "class "], "prompts sampled at each eval")
    sample_tokens: int = opt(48, "tokens generated per sample prompt")
    step_cadence: float = opt(1.0, "multiply log/eval/checkpoint intervals by this")
    out_dir: str = opt("runs/demo", "run folder: checkpoints, logs, tokenizer cache")
    device: str = opt("auto", "auto, cpu, cuda, cuda:N")

    def validate(self) -> None:
        require_positive(self, "train", "micro_batch_size", "seq_len", "eval_batches", "step_cadence", "ac_every")
        require_positive(self, "train", "total_tokens", "max_steps", "global_batch_tokens", "grad_accum", "grad_clip",
                         "eval_interval", "sample_tokens", "divergence_threshold", allow_zero=True)
        require_choice("train.precision", self.precision, PRECISIONS)
        require_choice("train.nonfinite_policy", self.nonfinite_policy, NONFINITE_POLICIES)
        require_choice("train.activation_checkpointing", self.activation_checkpointing, ("none", "all", "every_k"))
        require(0 < self.divergence_fast_alpha <= 1, "train.divergence_fast_alpha", self.divergence_fast_alpha,
                "must be in (0, 1]")
        require(0 < self.divergence_slow_alpha < self.divergence_fast_alpha, "train.divergence_slow_alpha",
                self.divergence_slow_alpha, "must be in (0, train.divergence_fast_alpha)")
