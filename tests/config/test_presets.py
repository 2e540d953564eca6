"""Every preset's exact parameter count (meta device, no memory) and that bundles combine with sizes."""

from __future__ import annotations

import pytest
import torch

from tokenmill.config import load_config, preset_names
from tokenmill.errors import UserError
from tokenmill.model import build_meta, build_model, param_counts

EXACT = {
    "gpt2-124m": 124_439_808,  # = transformers GPT2LMHeadModel (tied, learned positions, biases)
    "llama3-1b": 1_241_581_568,
    "llama3.2-1b": 1_235_814_400,
    "dense-180m": 226_546_432,  # seed 000's shapes (per-head QK-norm), not its "180M" label
}

SEED_003 = {  # seed 003's table: preset -> (claimed params, layers, width)
    "pt-tiny": (85e6, 12, 512),
    "pt-small": (178e6, 16, 768),
    "pt-medium": (374e6, 24, 1024),
    "pt-medium-large": (401e6, 20, 1152),
    "pt-large": (763e6, 24, 1536),
    "pt-xlarge": (1.46e9, 32, 1920),
}

BUNDLES = ["gpt2", "llama", "team", "hybrid"]


def counts(*presets: str) -> dict[str, int]:
    return param_counts(load_config(list(presets)).model)


@pytest.mark.parametrize("name", sorted(EXACT))
def test_exact_counts(name):
    assert counts(name)["total"] == EXACT[name]


def test_gpt2_split_matches_hand_count():
    # wte 50257*768 + wpe 1024*768 are the embedding; the rest are the 12 blocks and the final LayerNorm.
    c = counts("gpt2-124m")
    assert c["embedding"] == 50257 * 768 + 1024 * 768
    per_block = 12 * 768 * 768 + 13 * 768  # qkv+o (4 d^2 + 4 d) + mlp (8 d^2 + 5 d) + 2 LayerNorms (4 d)
    assert c["non_embedding"] == 12 * per_block + 2 * 768
    assert c["trainable"] == c["total"]


@pytest.mark.parametrize("name", sorted(SEED_003))
def test_pt_presets_within_3_percent_of_seed(name):
    target, layers, width = SEED_003[name]
    cfg = load_config([name]).model
    assert (cfg.n_layers, cfg.d_model) == (layers, width)
    total = param_counts(cfg)["total"]
    assert abs(total / target - 1) <= 0.03, f"{name}: {total:,} vs {target:,.0f}"


def test_pt_preset_comments_state_the_true_count():
    from importlib import resources

    for name in SEED_003:
        text = (resources.files("tokenmill.config") / "presets" / f"{name}.yaml").read_text()
        assert f"{counts(name)['total']:,}" in text, name


def test_deepone_shape_and_count():
    cfg = load_config(["deepone-162m"]).model
    assert (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.vocab_size) == (16, 768, 8, 32768)
    assert (cfg.position, cfg.ffn, cfg.qk_norm, cfg.init) == ("rope", "swiglu", True, "deepnet")
    total = counts("deepone-162m")["total"]
    assert total == 163_605_504
    assert abs(total / 162e6 - 1) <= 0.03


def test_llama_124m_is_gpt2_small_shaped():
    # Untied with a 50304 vocab: 162.2M in total; ~124M without the input embedding table.
    c = counts("llama-124m")
    assert c["total"] == 162_220_800
    assert abs(c["non_embedding"] / 124e6 - 1) <= 0.05
    assert abs(c["non_embedding"] / counts("gpt2-124m")["total"] - 1) <= 0.01


@pytest.mark.parametrize("bundle", BUNDLES)
@pytest.mark.parametrize("size", ["pt-tiny", "gpt2-124m", "dense-180m"])
def test_bundles_combine_with_sizes(size, bundle):
    size_cfg = load_config([size]).model
    cfg = load_config([size, bundle]).model
    bundle_raw = load_config([bundle]).model
    assert (cfg.n_layers, cfg.d_model, cfg.n_heads) == (size_cfg.n_layers, size_cfg.d_model, size_cfg.n_heads)
    for key in ("norm", "position", "ffn", "tie_embeddings", "bias", "norm_position"):
        assert getattr(cfg, key) == getattr(bundle_raw, key), key
    model = build_meta(cfg)
    assert all(p.is_meta for p in model.parameters())
    assert (model.pos_emb is not None) == (cfg.position == "learned")
    assert (model.head is None) == cfg.tie_embeddings


def test_mlp_bundle_uses_4x_width_on_a_swiglu_size():
    cfg = load_config(["pt-small", "gpt2"]).model
    assert cfg.ffn_width() == 4 * cfg.d_model


@pytest.mark.parametrize("name", preset_names())
def test_every_preset_builds_on_meta(name):
    cfg = load_config([name]).model
    if cfg.vocab_size == 0:
        with pytest.raises(UserError, match="model.vocab_size"):
            build_meta(cfg)
        return
    assert param_counts(cfg)["total"] > 0


def test_tiny_builds_with_a_vocab():
    cfg = load_config(["tiny"], overrides=["model.vocab_size=4096"]).model
    torch.manual_seed(0)
    model = build_model(cfg)
    logits = model(torch.randint(0, 4096, (1, 8)))
    assert logits.shape == (1, 8, 4096)
    assert torch.isfinite(logits).all()


def test_vocab_zero_is_refused_with_a_clear_message():
    cfg = load_config(["tiny"]).model
    assert cfg.vocab_size == 0
    with pytest.raises(UserError, match="set model.vocab_size or let the trainer resolve it"):
        build_model(cfg)
    with pytest.raises(UserError, match="model.vocab_size"):
        param_counts(cfg)
