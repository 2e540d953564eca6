"""FLOPs per token against hand counts, MFU arithmetic, and GPU-name lookup."""

from __future__ import annotations

import pytest

from tokenmill.metrics.flops import GPUS, flops_breakdown, flops_per_token, lookup_gpu, matmul_params, mfu
from tokenmill.model.config import ModelConfig


def gpt2_small() -> ModelConfig:
    return ModelConfig(
        n_layers=12,
        d_model=768,
        n_heads=12,
        vocab_size=50257,
        max_seq_len=1024,
        norm="layernorm",
        position="learned",
        ffn="mlp",
        activation="gelu_tanh",
        ffn_mult=4.0,
        bias=True,
        tie_embeddings=True,
    )


def test_gpt2_small_flops_per_token_hand_count():
    # Per layer: q, k, v, o = 4 x 768 x 768 = 2,359,296; MLP 768 -> 3072 -> 768 = 2 x 768 x 3072 = 4,718,592.
    per_layer = 4 * 768 * 768 + 2 * 768 * 3072
    assert per_layer == 7_077_888
    # 12 layers + the tied output head 768 x 50257 = 38,597,376 (embedding lookups, norms, biases excluded).
    n_matmul = 12 * per_layer + 768 * 50257
    assert n_matmul == 123_532_032
    # Attention scores: 12 L n_heads d_head S = 12 x 12 x 12 x 64 x 1024 = 113,246,208.
    attention = 12 * 12 * 12 * 64 * 1024
    assert attention == 113_246_208
    expected = 6 * n_matmul + attention  # 741,192,192 + 113,246,208
    assert expected == 854_438_400
    assert flops_per_token(gpt2_small(), 1024) == expected
    # Causal accounting counts half the score matrix.
    assert flops_per_token(gpt2_small(), 1024, causal=True) == 6 * n_matmul + attention // 2


def test_breakdown_parts_sum_and_scale_with_seq_len():
    cfg = gpt2_small()
    b1, b2 = flops_breakdown(cfg, 1024), flops_breakdown(cfg, 2048)
    assert b1["total"] == b1["attention_proj"] + b1["attention_scores"] + b1["ffn"] + b1["head"]
    assert b2["attention_scores"] == 2 * b1["attention_scores"]
    assert b2["ffn"] == b1["ffn"] and b2["head"] == b1["head"]


def test_gqa_swiglu_untied_head_dim():
    # 2 layers, d=64, 8 query heads of width 16 (head_dim != d / n_heads), 2 kv heads, swiglu 160, vocab 100.
    cfg = ModelConfig(
        n_layers=2,
        d_model=64,
        n_heads=8,
        n_kv_heads=2,
        head_dim=16,
        ffn="swiglu",
        ffn_hidden=160,
        vocab_size=100,
        tie_embeddings=False,
    )
    q, kv, o = 64 * 8 * 16, 2 * 64 * 2 * 16, 8 * 16 * 64  # 8192, 4096, 8192
    ffn = 3 * 64 * 160  # gate, up, down = 30,720
    head = 64 * 100
    n = matmul_params(cfg)
    assert n == {"attention": 2 * (q + kv + o), "ffn": 2 * ffn, "head": head}
    scores = 12 * 2 * 8 * 16 * 32  # query heads count, kv heads do not
    assert flops_per_token(cfg, 32) == 6 * (2 * (q + kv + o + ffn) + head) + scores
    # GQA: fewer kv heads lower the projection FLOPs but not the score FLOPs.
    mha = ModelConfig(**{**cfg.__dict__, "n_kv_heads": 8})
    assert flops_breakdown(mha, 32)["attention_proj"] > flops_breakdown(cfg, 32)["attention_proj"]
    assert flops_breakdown(mha, 32)["attention_scores"] == flops_breakdown(cfg, 32)["attention_scores"]


def test_swiglu_width_from_multiple_of():
    # ffn_mult 4, d=256 -> 1024 -> 2/3 = 682 -> rounded up to a multiple of 256 = 768; 3 matrices.
    cfg = ModelConfig(n_layers=1, d_model=256, n_heads=4, ffn="swiglu", vocab_size=64)
    assert matmul_params(cfg)["ffn"] == 3 * 256 * 768


def test_mfu_arithmetic():
    # 100k tokens/s x 854.4 MFLOP/token over 1 H100 (989 TF) = 8.64%.
    assert mfu(100_000, 854_438_400, 989) == pytest.approx(100_000 * 854_438_400 / 989e12)
    assert mfu(800_000, 1e9, 312, n_gpus=8) == pytest.approx(800_000 * 1e9 / (8 * 312e12))
    with pytest.raises(ValueError):
        mfu(1.0, 1.0, 0.0)


@pytest.mark.parametrize(
    "device_name, key",
    [
        ("NVIDIA H100 80GB HBM3", "H100 SXM"),
        ("NVIDIA H100 PCIe", "H100 PCIe"),
        ("NVIDIA H100 NVL", "H100 NVL"),
        ("NVIDIA H200", "H200"),
        ("NVIDIA B200", "B200"),
        ("NVIDIA A100-SXM4-40GB", "A100 40GB"),
        ("NVIDIA A100-SXM4-80GB", "A100 80GB"),
        ("NVIDIA A100 80GB PCIe", "A100 80GB"),
        ("NVIDIA L40S", "L40S"),
        ("NVIDIA L4", "L4"),
        ("NVIDIA GeForce RTX 4090", "RTX 4090"),
        ("Tesla V100-SXM2-32GB", "V100 SXM2"),
        ("h100 sxm", "H100 SXM"),
    ],
)
def test_lookup_gpu_known(device_name, key):
    spec = lookup_gpu(device_name)
    assert spec is not None and spec.name == GPUS[key].name
    assert spec.bf16_tflops == GPUS[key].bf16_tflops


@pytest.mark.parametrize(
    "device_name",
    [
        "NVIDIA GB200",
        "NVIDIA H200 NVL",
        "NVIDIA L40",
        "AMD Instinct MI300X",
        "NVIDIA GeForce RTX 4090 D",
        "Tesla V100-PCIE-32GB",
        "cpu",
        "Tesla T4",
    ],
)
def test_lookup_gpu_unknown_is_none(device_name):
    assert lookup_gpu(device_name) is None


def test_v100_memory_from_name_and_dense_peaks():
    assert lookup_gpu("Tesla V100-SXM2-16GB").memory_gib == 16
    assert lookup_gpu("Tesla V100-SXM2-32GB").memory_gib == 32
    # Dense peaks, not the 2:4-sparse datasheet headline (989, not 1979, for H100 SXM).
    assert GPUS["H100 SXM"].bf16_tflops == 989 and GPUS["A100 80GB"].bf16_tflops == 312
    for spec in GPUS.values():
        assert spec.source and spec.memory_gib > 0 and spec.fp32_tflops < spec.bf16_tflops
