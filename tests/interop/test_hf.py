"""Hugging Face conversion: logits parity both directions (tiny GPT-2, Llama, Qwen3), config fields, refusals."""

from __future__ import annotations

import sys
from types import SimpleNamespace

import pytest
import torch

transformers = pytest.importorskip("transformers")

from tokenmill.errors import UserError  # noqa: E402
from tokenmill.interop.hf import from_hf, hf_config, load_pretrained, model_config_from_hf, to_hf  # noqa: E402
from tokenmill.model import build_model  # noqa: E402
from tokenmill.model.config import ModelConfig  # noqa: E402

TOL = 1e-5


def gpt2_cfg(**kw) -> ModelConfig:
    base = dict(
        n_layers=2,
        d_model=64,
        n_heads=4,
        vocab_size=101,
        max_seq_len=32,
        norm="layernorm",
        position="learned",
        ffn="mlp",
        activation="gelu_tanh",
        ffn_mult=4.0,
        bias=True,
        tie_embeddings=True,
        norm_position="pre",
        qk_norm=False,
    )
    cfg = ModelConfig(**{**base, **kw})
    cfg.validate()
    return cfg


def llama_cfg(**kw) -> ModelConfig:
    base = dict(
        n_layers=2,
        d_model=64,
        n_heads=4,
        n_kv_heads=2,
        vocab_size=101,
        max_seq_len=32,
        norm="rmsnorm",
        position="rope",
        rope_theta=500000.0,
        ffn="swiglu",
        ffn_hidden=96,
        bias=False,
        tie_embeddings=True,
        norm_position="pre",
        qk_norm=False,
        norm_eps=1e-6,
    )
    cfg = ModelConfig(**{**base, **kw})
    cfg.validate()
    return cfg


@torch.no_grad()
def perturb(module: torch.nn.Module, seed: int) -> None:
    """Noise on every parameter, so norm weights != 1 and biases != 0 (a swapped or untransposed tensor shows)."""
    g = torch.Generator().manual_seed(seed)
    for p in module.parameters():
        p.add_(0.05 * torch.randn(p.shape, generator=g, dtype=p.dtype))


def random_tokenmill(cfg: ModelConfig, seed: int = 0):
    torch.manual_seed(seed)
    model = build_model(cfg)
    perturb(model, seed + 1)
    return model.eval()


def tokens(vocab: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 17), generator=torch.Generator().manual_seed(seed))


def max_diff(ours, theirs, idx) -> float:
    with torch.no_grad():
        return (ours(idx) - theirs(idx).logits).abs().max().item()


CASES = {
    "gpt2-tied": lambda: gpt2_cfg(),
    "gpt2-untied-gelu": lambda: gpt2_cfg(tie_embeddings=False, activation="gelu", norm_eps=1e-6),
    "llama-gqa-tied": lambda: llama_cfg(),
    "llama-gqa-untied": lambda: llama_cfg(tie_embeddings=False),
    "llama-mha-bias-headdim": lambda: llama_cfg(n_kv_heads=4, head_dim=24, bias=True, rope_theta=1234.0),
    "qwen3-qknorm-tied": lambda: llama_cfg(qk_norm=True),
    "qwen3-qknorm-untied-headdim": lambda: llama_cfg(qk_norm=True, tie_embeddings=False, head_dim=32),
}
HF_CLASS = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM"}


@pytest.mark.parametrize("case", list(CASES))
def test_tokenmill_to_hf_logits(case):
    cfg = CASES[case]()
    ours = random_tokenmill(cfg)
    theirs = to_hf(ours)
    assert type(theirs).__name__ == HF_CLASS[case.split("-")[0]]
    assert max_diff(ours, theirs, tokens(cfg.vocab_size)) <= TOL
    # The export is a copy: changing tokenmill weights afterwards does not change the HF model.
    perturb(ours, 99)
    assert max_diff(ours, theirs, tokens(cfg.vocab_size)) > 1e-2


@pytest.mark.parametrize("case", list(CASES))
def test_hf_to_tokenmill_logits(case):
    torch.manual_seed(3)
    hf_cfg = hf_config(CASES[case]())
    cls = getattr(transformers, HF_CLASS[case.split("-")[0]])
    theirs = cls(hf_cfg)
    perturb(theirs, 4)
    theirs.eval()
    ours = from_hf(theirs)
    assert ours.cfg.tie_embeddings == hf_cfg.tie_word_embeddings
    assert max_diff(ours, theirs, tokens(hf_cfg.vocab_size, 5)) <= TOL


@pytest.mark.parametrize(
    "case", ["gpt2-untied-gelu", "llama-gqa-untied", "llama-mha-bias-headdim", "qwen3-qknorm-untied-headdim"]
)
def test_round_trip_is_exact(case):
    ours = random_tokenmill(CASES[case]())
    back = from_hf(to_hf(ours))
    assert _same_shape_fields(back.cfg, ours.cfg)
    a, b = ours.state_dict(), back.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def _same_shape_fields(a: ModelConfig, b: ModelConfig) -> bool:
    keys = (
        "n_layers",
        "d_model",
        "n_heads",
        "vocab_size",
        "max_seq_len",
        "norm",
        "position",
        "ffn",
        "bias",
        "tie_embeddings",
        "norm_eps",
        "rope_theta",
        "qk_norm",
    )
    return (
        all(getattr(a, k) == getattr(b, k) for k in keys)
        and a.ffn_width() == b.ffn_width()
        and a.kv_heads() == b.kv_heads()
        and a.resolved_head_dim() == b.resolved_head_dim()
    )


def test_hf_config_fields():
    g = hf_config(gpt2_cfg(tie_embeddings=True, norm_eps=1e-5), eos_token_id=7)
    assert (g.model_type, g.n_embd, g.n_layer, g.n_head, g.n_positions, g.vocab_size) == ("gpt2", 64, 2, 4, 32, 101)
    assert g.activation_function == "gelu_new" and g.n_inner == 256 and g.layer_norm_epsilon == 1e-5
    assert g.tie_word_embeddings is True and g.eos_token_id == 7
    ll = hf_config(llama_cfg(tie_embeddings=False, head_dim=32))
    assert (ll.model_type, ll.hidden_size, ll.num_hidden_layers, ll.num_attention_heads) == ("llama", 64, 2, 4)
    assert (ll.num_key_value_heads, ll.head_dim, ll.intermediate_size) == (2, 32, 96)
    assert ll.rms_norm_eps == 1e-6 and ll.tie_word_embeddings is False and ll.hidden_act == "silu"
    assert ll.attention_bias is False and ll.mlp_bias is False
    assert model_config_from_hf(ll).rope_theta == 500000.0  # survives whichever field transformers keeps it in


@pytest.mark.parametrize(
    "cfg, message",
    [
        (lambda: llama_cfg(qk_norm=True, bias=True), "Qwen3's MLP has no biases"),
        (lambda: gpt2_cfg(qk_norm=True), "qk_norm"),
        (lambda: llama_cfg(norm_position="post"), "norm_position"),
        (lambda: llama_cfg(norm="layernorm"), "rmsnorm"),
        (lambda: llama_cfg(ffn="mlp", ffn_mult=4.0, ffn_hidden=0), "swiglu"),
        (lambda: llama_cfg(init="deepnet", norm_position="post"), "norm_position|residual"),
        (lambda: gpt2_cfg(norm="layernorm_nobias"), "layernorm"),
        (lambda: gpt2_cfg(bias=False), "bias"),
        (lambda: gpt2_cfg(n_kv_heads=2), "GQA"),
        (lambda: gpt2_cfg(position="none"), "position"),
    ],
)
def test_refuses_what_hf_cannot_represent(cfg, message):
    with pytest.raises(UserError, match=message):
        hf_config(cfg())


def test_refuses_hf_configs_tokenmill_cannot_represent():
    scaled = transformers.LlamaConfig(
        hidden_size=64,
        num_attention_heads=4,
        num_hidden_layers=1,
        intermediate_size=96,
        vocab_size=50,
        rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0},
    )
    with pytest.raises(UserError, match="RoPE scaling"):
        model_config_from_hf(scaled)
    with pytest.raises(UserError, match="model_type='mistral'"):
        model_config_from_hf(SimpleNamespace(model_type="mistral"))
    layer_scaled = transformers.GPT2Config(n_embd=64, n_layer=1, n_head=4, scale_attn_by_inverse_layer_idx=True)
    with pytest.raises(UserError, match="inverse_layer_idx"):
        model_config_from_hf(layer_scaled)


def test_missing_transformers_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # makes `import transformers` raise ImportError
    with pytest.raises(UserError, match=r"pip install 'tokenmill\[hf\]'"):
        hf_config(llama_cfg())


def test_load_pretrained_from_local_folder(tmp_path):
    ours = random_tokenmill(llama_cfg(tie_embeddings=False), seed=7)
    to_hf(ours).save_pretrained(tmp_path / "export")
    assert (tmp_path / "export" / "model.safetensors").is_file()
    loaded = load_pretrained(tmp_path / "export")
    idx = tokens(101, 9)
    with torch.no_grad():
        assert (loaded(idx) - ours(idx)).abs().max().item() <= TOL
    with pytest.raises(UserError, match="cannot load"):
        load_pretrained(tmp_path / "missing")
