"""Hardware peaks and model FLOPs: the GPU table, FLOPs per training token, and MFU.

Conventions (the same ones the start-up banner and per-step MFU use; each cites its public source):
- Peaks are **dense** tensor-core TFLOPS, without 2:4 sparsity. NVIDIA datasheets quote the sparse
  figure for the tensor-core rows; the dense figure is half of it ("Specifications are one-half lower
  without sparsity" - datasheet footnote, also quoted in torchtitan's `get_peak_flops`).
- MFU = achieved model FLOP/s / (dense BF16 peak x GPUs), also when FP8 matmuls are used (a
  "bf16-equivalent MFU"). An unknown device gets no peak and hence no MFU: we never guess a peak
  (a fallback peak is how other tools printed "563% MFU").
- Training FLOPs per token = 6 N_matmul + 12 L H_q d_head S (attention scores): the full non-causal
  form of PaLM (Chowdhery et al. 2022, appendix B) and nanoGPT's `estimate_mfu`; the score term is also
  Chinchilla's (Hoffmann et al. 2022, appendix F: 2 x 2 S d_head H_q forward for QK^T and AV).
  Softmax, norms and other elementwise work are not counted. `causal=True` halves the score term,
  as current Megatron does ("/2 causal mask").
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # no import-time work: the model config is only needed for type hints
    from tokenmill.model.config import ModelConfig


@dataclass(frozen=True)
class GPUSpec:
    """Datasheet numbers for one accelerator; all TFLOPS are dense (no sparsity)."""

    name: str
    bf16_tflops: float  # tensor-core BF16 with FP32 accumulate: the MFU denominator
    fp16_tflops: float  # tensor-core FP16 with FP32 accumulate
    fp32_tflops: float  # non-tensor (CUDA-core) FP32: what fp32 matmuls get without TF32
    memory_gib: float  # on-board memory as the datasheet's "GB" (NVIDIA's HBM sizes are binary GiB)
    source: str
    tf32_tflops: float = 0.0  # tensor-core TF32 (only used when torch.backends.cuda.matmul.allow_tf32)
    fp8_tflops: float = 0.0  # tensor-core FP8; 0 = no FP8 tensor cores
    note: str = ""


_DS = "NVIDIA datasheet"
_TT = "torchtitan tools/utils.py get_peak_flops"

GPUS: dict[str, GPUSpec] = {
    "B200": GPUSpec(
        "B200",
        2250,
        2250,
        75,
        180,
        f"{_DS} HGX B200 (per-GPU = 8-GPU figure / 8, sparse / 2); {_TT} (2.25e15)",
        tf32_tflops=1100,
        fp8_tflops=4500,
        note="HGX B200 at 1,000 W; GB200 (1,200 W) is faster",
    ),
    "H200": GPUSpec(
        "H200",
        989,
        989,
        67,
        141,
        f"{_DS} H200 SXM (1,979 sparse / 2); {_TT} (989e12)",
        tf32_tflops=494,
        fp8_tflops=1979,
        note="SXM; same GH100 tensor cores as H100 SXM",
    ),
    "H100 SXM": GPUSpec(
        "H100 SXM",
        989,
        989,
        67,
        80,
        f"{_DS} H100 SXM (1,979 sparse / 2); {_TT} (989e12)",
        tf32_tflops=494,
        fp8_tflops=1979,
    ),
    "H100 PCIe": GPUSpec(
        "H100 PCIe",
        756,
        756,
        51,
        80,
        f"{_DS} H100 PCIe (1,513 sparse / 2); {_TT} (756e12)",
        tf32_tflops=378,
        fp8_tflops=1513,
    ),
    "H100 NVL": GPUSpec(
        "H100 NVL",
        835,
        835,
        60,
        94,
        f"{_DS} H100 NVL (1,671 sparse / 2); {_TT} (835e12)",
        tf32_tflops=418,
        fp8_tflops=1671,
    ),
    "A100 40GB": GPUSpec(
        "A100 40GB",
        312,
        312,
        19.5,
        40,
        f"{_DS} A100 (624 sparse / 2); {_TT} (312e12)",
        tf32_tflops=156,
        note="SXM4 and PCIe share the tensor-core peak",
    ),
    "A100 80GB": GPUSpec(
        "A100 80GB",
        312,
        312,
        19.5,
        80,
        f"{_DS} A100 (624 sparse / 2); {_TT} (312e12)",
        tf32_tflops=156,
        note="SXM4 and PCIe share the tensor-core peak",
    ),
    "L40S": GPUSpec("L40S", 362, 362, 91.6, 48, f"{_DS} L40S (733 sparse / 2)", tf32_tflops=183, fp8_tflops=733),
    "L4": GPUSpec("L4", 121, 121, 30.3, 24, f"{_DS} L4 (242 sparse / 2)", tf32_tflops=60, fp8_tflops=242),
    "RTX 4090": GPUSpec(
        "RTX 4090",
        165.2,
        165.2,
        82.6,
        24,
        "NVIDIA Ada GPU architecture whitepaper, GeForce RTX 4090 (FP32-accumulate column)",
        tf32_tflops=82.6,
        fp8_tflops=330.3,
        note="GeForce: FP16-accumulate is 2x, but PyTorch matmuls accumulate in FP32",
    ),
    "V100 SXM2": GPUSpec(
        "V100 SXM2",
        125,
        125,
        15.7,
        32,
        f"{_DS} Tesla V100 SXM2 (tensor FP16 125)",
        note="no BF16 tensor cores: bf16_tflops is the FP16 tensor peak (train in fp16); "
        "memory 16 or 32 GiB, read from the device name",
    ),
}

# (pattern over torch.cuda.get_device_name(), GPUS key), most specific first. Variants with other peaks
# (H200 NVL, GB200, RTX 4090 D / Laptop, L40 without S, V100 PCIe) deliberately match nothing.
_MATCHERS: tuple[tuple[str, str], ...] = (
    (r"\bGB200\b|\bH200 NVL\b|\bRTX 4090 ?D\b|\bLaptop\b|\bV100[- ]PCIE\b", ""),
    (r"\bB200\b", "B200"),
    (r"\bH200\b", "H200"),
    (r"\bH100\b.*\bNVL\b", "H100 NVL"),
    (r"\bH100\b.*\bPCIE\b", "H100 PCIe"),
    (r"\bH100\b.*\b(SXM|HBM3)\b|^(NVIDIA )?H100$", "H100 SXM"),
    (r"\bA100\b.*\b80 ?GB\b", "A100 80GB"),
    (r"\bA100\b.*\b40 ?GB\b", "A100 40GB"),
    (r"\bL40S\b", "L40S"),
    (r"\bL4\b", "L4"),
    (r"\bRTX 4090\b", "RTX 4090"),
    (r"\bV100\b", "V100 SXM2"),
)


def lookup_gpu(device_name: str) -> GPUSpec | None:
    """The table row for a `torch.cuda.get_device_name()` string or a GPUS key; None when unknown.

    Callers report MFU as unavailable on None rather than assume some peak.
    """
    name = " ".join(device_name.replace("_", " ").split())
    for key, spec in GPUS.items():
        if name.lower() == key.lower():
            return spec
    for pattern, key in _MATCHERS:
        if re.search(pattern, name, flags=re.IGNORECASE):
            if not key:
                return None
            spec = GPUS[key]
            if key == "V100 SXM2" and re.search(r"\b16 ?GB\b", name, flags=re.IGNORECASE):
                spec = replace(spec, memory_gib=16)
            return spec
    return None


# ---------------------------------------------------------------------------------------------------
# FLOPs per token


def matmul_params(cfg: ModelConfig) -> dict[str, int]:
    """Weights that take part in matmuls, by part: attention projections, FFN, output head (per model).

    Embedding lookups (token and learned position tables), norms and biases do no matmul and are left
    out; the output head counts even when tied to the embedding, since it still multiplies d x V.
    """
    d, hd, n_q, n_kv = cfg.d_model, cfg.resolved_head_dim(), cfg.n_heads, cfg.kv_heads()
    attn = d * n_q * hd + 2 * d * n_kv * hd + n_q * hd * d  # q, k and v (GQA: n_kv heads), o
    ffn = (3 if cfg.ffn == "swiglu" else 2) * d * cfg.ffn_width()  # swiglu: gate, up, down
    return {"attention": cfg.n_layers * attn, "ffn": cfg.n_layers * ffn, "head": d * cfg.vocab_size}


def flops_breakdown(cfg: ModelConfig, seq_len: int, causal: bool = False) -> dict[str, float]:
    """Training FLOPs per token (forward + backward = 3 x forward), split by where they are spent.

    A matmul with a (m x n) weight costs 2 m n FLOPs per token forward and twice that backward (grads of
    input and weight): 6 per parameter per token (Kaplan et al. 2020, section 2.1). Attention scores
    (QK^T and AV) cost 2 x 2 x n_heads x d_head x S forward per token per layer, so
    12 L n_heads d_head S for training (PaLM appendix B; nanoGPT `estimate_mfu`). It scales with the query
    heads, not with n_kv_heads. `causal=True` counts only the unmasked half.
    """
    n = matmul_params(cfg)
    scores = 12.0 * cfg.n_layers * cfg.n_heads * cfg.resolved_head_dim() * seq_len
    if causal:
        scores /= 2
    out = {
        "attention_proj": 6.0 * n["attention"],
        "attention_scores": scores,
        "ffn": 6.0 * n["ffn"],
        "head": 6.0 * n["head"],
    }
    out["total"] = sum(out.values())
    return out


def flops_per_token(cfg: ModelConfig, seq_len: int, causal: bool = False) -> float:
    """Training FLOPs per token: 6 N_matmul + 12 L n_heads d_head S (see `flops_breakdown`)."""
    return flops_breakdown(cfg, seq_len, causal)["total"]


def mfu(tokens_per_s: float, flops_per_token: float, peak_tflops: float, n_gpus: int = 1) -> float:
    """Model FLOPs utilisation in [0, 1]: tokens_per_s is the total over all `n_gpus` GPUs."""
    if peak_tflops <= 0 or n_gpus <= 0:
        raise ValueError(f"mfu needs a positive peak and GPU count, got {peak_tflops} TFLOPS x {n_gpus}")
    return tokens_per_s * flops_per_token / (peak_tflops * 1e12 * n_gpus)
