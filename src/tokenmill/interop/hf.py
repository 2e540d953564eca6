"""Hugging Face conversion: tokenmill Transformer <-> transformers GPT2LMHeadModel / LlamaForCausalLM.

Weights convert by renaming, except GPT-2's Conv1D layers, which store (in, out) matrices (transposed
against nn.Linear) and fuse q, k, v into one `c_attn`. RoPE is the rotate-half layout on both sides, so
Llama q/k weights need no permutation. Configs that the target class cannot represent (QK-norm on Llama,
post-norm, DeepNet residual scaling, no positions, ...) are refused with a UserError instead of
exporting a model whose logits would differ.

transformers is optional (`pip install 'tokenmill[hf]'`) and imported only inside these functions.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from tokenmill.errors import UserError
from tokenmill.model.config import ModelConfig

ARCHITECTURES = ("gpt2", "llama")

# tokenmill activation -> GPT2Config.activation_function, and the HF names read back.
_GPT2_ACT_TO_HF = {"gelu_tanh": "gelu_new", "gelu": "gelu", "relu": "relu", "silu": "silu",
                   "leaky_relu": "leaky_relu"}
_GPT2_ACT_FROM_HF = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh",
                     "gelu": "gelu", "relu": "relu", "silu": "silu", "swish": "silu", "leaky_relu": "leaky_relu"}


def _transformers() -> Any:
    try:
        import transformers
    except ImportError as err:
        raise UserError("Hugging Face conversion needs transformers: pip install 'tokenmill[hf]'") from err
    return transformers


def _no_init() -> contextlib.AbstractContextManager:
    """Skip transformers' random init when we overwrite every weight anyway (location moved in v5)."""
    for module, name in (("transformers.initialization", "no_init_weights"),
                         ("transformers.modeling_utils", "no_init_weights")):
        try:
            return getattr(__import__(module, fromlist=[name]), name)()
        except (ImportError, AttributeError):
            continue
    return contextlib.nullcontext()


def _refuse(ok: bool, arch: str, what: str) -> None:
    if not ok:
        raise UserError(f"cannot convert to/from Hugging Face {arch}: {what}")


def _residual_alpha(cfg: ModelConfig) -> float:
    from tokenmill.model.init import INITS

    return INITS[cfg.init]().residual_alpha(cfg)


def architecture_of(cfg: ModelConfig) -> str:
    """`gpt2` for learned positions + layernorm + mlp, `llama` for rope + rmsnorm + swiglu (else refused)."""
    if cfg.position == "learned":
        return "gpt2"
    if cfg.position == "rope":
        return "llama"
    raise UserError(f"cannot convert to Hugging Face: model.position={cfg.position!r} matches neither GPT-2 "
                    f"(learned) nor Llama (rope)")


# ---------------------------------------------------------------------------------------------------
# Config mapping


def hf_config(cfg: ModelConfig, **overrides: Any) -> Any:
    """The transformers config (GPT2Config or LlamaConfig) for a tokenmill model config, after checking that
    the class computes exactly what tokenmill computes. `overrides` (e.g. bos_token_id) go to the config."""
    tf = _transformers()
    arch = architecture_of(cfg)
    common = [(cfg.norm_position == "pre", "model.norm_position must be pre (HF blocks are pre-norm)"),
              (not cfg.qk_norm, "model.qk_norm=true has no place in this HF class"),
              (_residual_alpha(cfg) == 1.0, f"model.init={cfg.init} scales the residual stream, HF does not")]
    for ok, what in common:
        _refuse(ok, arch, what)
    tokens = {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None}
    if arch == "gpt2":
        for ok, what in ((cfg.norm == "layernorm", "GPT-2 needs model.norm=layernorm (with bias)"),
                         (cfg.ffn == "mlp", "GPT-2 needs model.ffn=mlp"),
                         (cfg.bias, "GPT-2 needs model.bias=true (its Conv1D layers always have a bias)"),
                         (cfg.kv_heads() == cfg.n_heads, "GPT-2 has no GQA (model.n_kv_heads must equal n_heads)"),
                         (cfg.resolved_head_dim() * cfg.n_heads == cfg.d_model,
                          "GPT-2 needs head_dim = d_model / n_heads"),
                         (cfg.activation in _GPT2_ACT_TO_HF, f"activation {cfg.activation} has no GPT-2 name")):
            _refuse(ok, arch, what)
        return tf.GPT2Config(**{**tokens, **dict(
            vocab_size=cfg.vocab_size, n_positions=cfg.max_seq_len, n_embd=cfg.d_model, n_layer=cfg.n_layers,
            n_head=cfg.n_heads, n_inner=cfg.ffn_width(), activation_function=_GPT2_ACT_TO_HF[cfg.activation],
            resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout, attn_pdrop=cfg.dropout,
            layer_norm_epsilon=cfg.norm_eps, initializer_range=cfg.init_std,
            tie_word_embeddings=cfg.tie_embeddings), **overrides})
    for ok, what in ((cfg.norm == "rmsnorm", "Llama needs model.norm=rmsnorm"),
                     (cfg.ffn == "swiglu", "Llama needs model.ffn=swiglu")):
        _refuse(ok, arch, what)
    # Llama has no residual dropout; dropout only matters in training, so it is carried as attention_dropout.
    return tf.LlamaConfig(**{**tokens, **dict(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.ffn_width(),
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.kv_heads(),
        head_dim=cfg.resolved_head_dim(), hidden_act="silu", max_position_embeddings=cfg.max_seq_len,
        rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta, attention_bias=cfg.bias, mlp_bias=cfg.bias,
        attention_dropout=cfg.dropout, initializer_range=cfg.init_std,
        tie_word_embeddings=cfg.tie_embeddings), **overrides})


def _rope(hf_cfg: Any) -> tuple[float, str]:
    """(theta, rope type) from a Llama config: v5 keeps them in `rope_parameters`, v4 in rope_theta/rope_scaling."""
    params = getattr(hf_cfg, "rope_parameters", None)
    if isinstance(params, dict) and "rope_theta" in params:
        return float(params["rope_theta"]), params.get("rope_type", "default")
    scaling = getattr(hf_cfg, "rope_scaling", None) or {}
    return float(hf_cfg.rope_theta), scaling.get("rope_type", scaling.get("type", "default"))


def model_config_from_hf(hf_cfg: Any) -> ModelConfig:
    """The tokenmill ModelConfig computing what a GPT2Config / LlamaConfig computes (refusing what it cannot)."""
    kind = getattr(hf_cfg, "model_type", None)
    if kind == "gpt2":
        act = hf_cfg.activation_function
        for ok, what in ((act in _GPT2_ACT_FROM_HF, f"activation_function={act!r} is not supported"),
                         (hf_cfg.scale_attn_weights, "scale_attn_weights=false is not supported"),
                         (not hf_cfg.scale_attn_by_inverse_layer_idx, "scale_attn_by_inverse_layer_idx=true is "
                                                                      "not supported"),
                         (not getattr(hf_cfg, "add_cross_attention", False), "cross-attention is not supported")):
            _refuse(ok, "gpt2", what)
        d = hf_cfg.n_embd
        cfg = ModelConfig(n_layers=hf_cfg.n_layer, d_model=d, n_heads=hf_cfg.n_head, vocab_size=hf_cfg.vocab_size,
                          max_seq_len=hf_cfg.n_positions, norm="layernorm", norm_eps=hf_cfg.layer_norm_epsilon,
                          position="learned", ffn="mlp", activation=_GPT2_ACT_FROM_HF[act],
                          ffn_hidden=hf_cfg.n_inner or 4 * d, bias=True, tie_embeddings=hf_cfg.tie_word_embeddings,
                          dropout=0.0, init_std=hf_cfg.initializer_range)
    elif kind == "llama":
        theta, rope_type = _rope(hf_cfg)
        for ok, what in ((rope_type == "default", f"rope type {rope_type!r} (RoPE scaling) is not supported; "
                                                  "tokenmill's RoPE has no scaling"),
                         (hf_cfg.hidden_act == "silu", f"hidden_act={hf_cfg.hidden_act!r}: tokenmill's swiglu "
                                                       "gates with silu"),
                         (hf_cfg.attention_bias == hf_cfg.mlp_bias, "attention_bias and mlp_bias differ; "
                                                                    "tokenmill has one model.bias")):
            _refuse(ok, "llama", what)
        cfg = ModelConfig(n_layers=hf_cfg.num_hidden_layers, d_model=hf_cfg.hidden_size,
                          n_heads=hf_cfg.num_attention_heads, n_kv_heads=hf_cfg.num_key_value_heads,
                          head_dim=hf_cfg.head_dim, vocab_size=hf_cfg.vocab_size,
                          max_seq_len=hf_cfg.max_position_embeddings, norm="rmsnorm", norm_eps=hf_cfg.rms_norm_eps,
                          position="rope", rope_theta=theta, ffn="swiglu", ffn_hidden=hf_cfg.intermediate_size,
                          bias=bool(hf_cfg.attention_bias), tie_embeddings=hf_cfg.tie_word_embeddings,
                          dropout=0.0, init_std=hf_cfg.initializer_range)
    else:
        raise UserError(f"cannot convert Hugging Face model_type={kind!r}: supported are gpt2 and llama")
    cfg.validate()
    return cfg


# ---------------------------------------------------------------------------------------------------
# Weight mapping: each function renames (and for GPT-2 reshapes) one state dict into the other.


def _gpt2_to_hf(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    out = {"transformer.wte.weight": sd["tok_emb.weight"], "transformer.wpe.weight": sd["pos_emb.weight"],
           "transformer.ln_f.weight": sd["norm.weight"], "transformer.ln_f.bias": sd["norm.bias"]}
    for i in range(cfg.n_layers):
        b, h = f"blocks.{i}.", f"transformer.h.{i}."
        for ours, theirs in (("attn_norm", "ln_1"), ("ffn_norm", "ln_2")):
            out[h + theirs + ".weight"], out[h + theirs + ".bias"] = sd[b + ours + ".weight"], sd[b + ours + ".bias"]
        # Conv1D computes x @ W + b with W (in, out): the transpose of nn.Linear's (out, in) weight.
        qkv = [sd[f"{b}attn.{p}_proj.weight"] for p in "qkv"]
        out[h + "attn.c_attn.weight"] = torch.cat(qkv, dim=0).t().contiguous()  # (d, 3d)
        out[h + "attn.c_attn.bias"] = torch.cat([sd[f"{b}attn.{p}_proj.bias"] for p in "qkv"])
        for ours, theirs in (("attn.o_proj", "attn.c_proj"), ("ffn.up_proj", "mlp.c_fc"),
                             ("ffn.down_proj", "mlp.c_proj")):
            out[h + theirs + ".weight"] = sd[b + ours + ".weight"].t().contiguous()
            out[h + theirs + ".bias"] = sd[b + ours + ".bias"]
    out["lm_head.weight"] = sd["tok_emb.weight"] if cfg.tie_embeddings else sd["head.weight"]
    return out


def _gpt2_from_hf(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    out = {"tok_emb.weight": sd["transformer.wte.weight"], "pos_emb.weight": sd["transformer.wpe.weight"],
           "norm.weight": sd["transformer.ln_f.weight"], "norm.bias": sd["transformer.ln_f.bias"]}
    d = cfg.d_model
    for i in range(cfg.n_layers):
        b, h = f"blocks.{i}.", f"transformer.h.{i}."
        for ours, theirs in (("attn_norm", "ln_1"), ("ffn_norm", "ln_2")):
            out[b + ours + ".weight"], out[b + ours + ".bias"] = sd[h + theirs + ".weight"], sd[h + theirs + ".bias"]
        w, bias = sd[h + "attn.c_attn.weight"].t(), sd[h + "attn.c_attn.bias"]  # (3d, d), (3d,)
        for j, p in enumerate("qkv"):
            out[f"{b}attn.{p}_proj.weight"] = w[j * d:(j + 1) * d].contiguous()
            out[f"{b}attn.{p}_proj.bias"] = bias[j * d:(j + 1) * d].contiguous()
        for ours, theirs in (("attn.o_proj", "attn.c_proj"), ("ffn.up_proj", "mlp.c_fc"),
                             ("ffn.down_proj", "mlp.c_proj")):
            out[b + ours + ".weight"] = sd[h + theirs + ".weight"].t().contiguous()
            out[b + ours + ".bias"] = sd[h + theirs + ".bias"]
    if not cfg.tie_embeddings:
        out["head.weight"] = sd["lm_head.weight"]
    return out


def _llama_names(cfg: ModelConfig) -> list[tuple[str, str]]:
    """(tokenmill key, HF key) pairs; pure renames."""
    names = [("tok_emb.weight", "model.embed_tokens.weight"), ("norm.weight", "model.norm.weight")]
    suffixes = ("weight", "bias") if cfg.bias else ("weight",)
    for i in range(cfg.n_layers):
        b, h = f"blocks.{i}.", f"model.layers.{i}."
        names += [(b + "attn_norm.weight", h + "input_layernorm.weight"),
                  (b + "ffn_norm.weight", h + "post_attention_layernorm.weight")]
        names += [(f"{b}attn.{p}_proj.{s}", f"{h}self_attn.{p}_proj.{s}") for p in "qkvo" for s in suffixes]
        names += [(f"{b}ffn.{p}_proj.{s}", f"{h}mlp.{p}_proj.{s}") for p in ("gate", "up", "down") for s in suffixes]
    if not cfg.tie_embeddings:
        names.append(("head.weight", "lm_head.weight"))
    return names


def _llama_to_hf(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    out = {theirs: sd[ours] for ours, theirs in _llama_names(cfg)}
    if cfg.tie_embeddings:
        out["lm_head.weight"] = sd["tok_emb.weight"]
    return out


def _llama_from_hf(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    return {ours: sd[theirs] for ours, theirs in _llama_names(cfg)}


# arch -> (transformers class name, tokenmill->HF weights, HF->tokenmill weights)
_ARCH: dict[str, tuple[str, Callable, Callable]] = {
    "gpt2": ("GPT2LMHeadModel", _gpt2_to_hf, _gpt2_from_hf),
    "llama": ("LlamaForCausalLM", _llama_to_hf, _llama_from_hf),
}


# ---------------------------------------------------------------------------------------------------
# Public API


def to_hf(model: Any, **config_overrides: Any) -> Any:
    """A transformers GPT2LMHeadModel / LlamaForCausalLM with the tokenmill model's weights (copied), in eval
    mode and the model's dtype. `config_overrides` go to the HF config (bos_token_id, eos_token_id, ...)."""
    tf = _transformers()
    cfg = model.cfg
    arch = architecture_of(cfg)
    hf_cfg = hf_config(cfg, **config_overrides)
    class_name, to_hf_weights, _ = _ARCH[arch]
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    with _no_init():
        hf_model = getattr(tf, class_name)(hf_cfg)
    dtype = sd["tok_emb.weight"].dtype
    hf_model.to(dtype=dtype)
    missing, unexpected = hf_model.load_state_dict(to_hf_weights(sd, cfg), strict=False)
    params = {name for name, _ in hf_model.named_parameters()}  # buffers (older GPT-2 masks) may stay missing
    missing = [k for k in missing if k in params]
    if missing or unexpected:
        raise RuntimeError(f"HF {class_name} weight mismatch: missing {missing}, unexpected {unexpected}")
    if cfg.tie_embeddings:
        hf_model.tie_weights()
    return hf_model.eval()


def from_hf(hf_model: Any, device: str | torch.device = "cpu") -> Any:
    """A tokenmill Transformer with the weights of a transformers GPT2LMHeadModel / LlamaForCausalLM (copied),
    in eval mode and fp32 (cast it afterwards if you want another dtype)."""
    from tokenmill.model import build_model

    cfg = model_config_from_hf(hf_model.config)
    _, _, from_hf_weights = _ARCH[architecture_of(cfg)]
    sd = from_hf_weights(dict(hf_model.state_dict()), cfg)
    model = build_model(cfg, device=device)  # the supported construction path (meta build + init_weights)
    model.load_state_dict(sd, strict=True)  # copies into the fp32 parameters
    return model.eval()


def load_pretrained(path_or_name: str | Path, device: str | torch.device = "cpu") -> Any:
    """A tokenmill Transformer from a Hugging Face model folder (config.json + safetensors) or, when online,
    a Hub name. Loads with transformers (safetensors, no pickled code) and converts with `from_hf`."""
    tf = _transformers()
    try:
        hf_model = tf.AutoModelForCausalLM.from_pretrained(str(path_or_name), use_safetensors=True)
    except (OSError, ValueError) as err:
        raise UserError(f"cannot load Hugging Face model {path_or_name}: {err}".splitlines()[0]) from err
    return from_hf(hf_model, device=device)

