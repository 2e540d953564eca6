"""Hugging Face conversion: tokenmill Transformer <-> transformers GPT2LMHeadModel / LlamaForCausalLM /
Qwen3ForCausalLM.

This module maps configs both ways and builds models; the tensors are renamed by the state-dict adapters in
`hf_weights.py`. Which HF class a model becomes follows from its components: learned positions -> GPT-2,
RoPE -> Llama, RoPE with QK-norm -> Qwen3 (Llama plus a per-head RMSNorm on queries and keys). Configs that
the target class cannot represent (post-norm, DeepNet residual scaling, no positions, ...) are refused with a
UserError instead of exporting a model whose logits would differ.

transformers is optional (`pip install 'tokenmill[hf]'`) and imported only inside these functions.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from tokenmill.errors import UserError
from tokenmill.interop.hf_weights import build_adapter
from tokenmill.model.config import ModelConfig

# architecture -> transformers class of a causal LM with that architecture
HF_CLASSES = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM"}
ARCHITECTURES = tuple(HF_CLASSES)

# tokenmill activation -> GPT2Config.activation_function, and the HF names read back.
_GPT2_ACT_TO_HF = {
    "gelu_tanh": "gelu_new",
    "gelu": "gelu",
    "relu": "relu",
    "silu": "silu",
    "leaky_relu": "leaky_relu",
    "relu2": "relu2",  # transformers' ReLUSquaredActivation
}
_GPT2_ACT_FROM_HF = {
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "gelu": "gelu",
    "relu": "relu",
    "silu": "silu",
    "swish": "silu",
    "leaky_relu": "leaky_relu",
    "relu2": "relu2",
}


def transformers_module() -> Any:
    """`import transformers`, or a one-line UserError naming the extra that installs it."""
    try:
        import transformers
    except ImportError as err:
        raise UserError("Hugging Face conversion needs transformers: pip install 'tokenmill[hf]'") from err
    return transformers


def quiet_transformers() -> None:
    """No progress bars or info logs from transformers: a command prints its own one-line summary."""
    tf = transformers_module()
    tf.utils.logging.disable_progress_bar()
    tf.utils.logging.set_verbosity_error()


def _no_init() -> contextlib.AbstractContextManager:
    """Skip transformers' random init when we overwrite every weight anyway (location moved in v5)."""
    for module, name in (
        ("transformers.initialization", "no_init_weights"),
        ("transformers.modeling_utils", "no_init_weights"),
    ):
        try:
            return getattr(__import__(module, fromlist=[name]), name)()
        except (ImportError, AttributeError):
            continue
    return contextlib.nullcontext()


def _refuse(checks: list[tuple[bool, str]], arch: str) -> None:
    for ok, what in checks:
        if not ok:
            raise UserError(f"cannot convert to/from Hugging Face {arch}: {what}")


def _residual_alpha(cfg: ModelConfig) -> float:
    from tokenmill.model.init import INITS

    return INITS[cfg.init]().residual_alpha(cfg)


def architecture_of(cfg: ModelConfig) -> str:
    """`gpt2` for learned positions, `qwen3` for RoPE with QK-norm, `llama` for RoPE without (else refused)."""
    if cfg.position == "learned":
        return "gpt2"
    if cfg.position == "rope":
        return "qwen3" if cfg.qk_norm else "llama"
    raise UserError(
        f"cannot convert to Hugging Face: model.position={cfg.position!r} matches neither GPT-2 "
        f"(learned) nor Llama/Qwen3 (rope)"
    )


# ---------------------------------------------------------------------------------------------------
# Config mapping, tokenmill -> HF


def _gpt2_checks(cfg: ModelConfig) -> list[tuple[bool, str]]:
    return [
        (cfg.norm == "layernorm", "GPT-2 needs model.norm=layernorm (with bias)"),
        (cfg.ffn == "mlp", "GPT-2 needs model.ffn=mlp"),
        (not cfg.qk_norm, "model.qk_norm=true has no place in GPT-2"),
        (cfg.bias, "GPT-2 needs model.bias=true (its Conv1D layers always have a bias)"),
        (cfg.kv_heads() == cfg.n_heads, "GPT-2 has no GQA (model.n_kv_heads must equal n_heads)"),
        (cfg.resolved_head_dim() * cfg.n_heads == cfg.d_model, "GPT-2 needs head_dim = d_model / n_heads"),
        (cfg.activation in _GPT2_ACT_TO_HF, f"activation {cfg.activation} has no GPT-2 name"),
    ]


def _gpt2_config(tf: Any, cfg: ModelConfig) -> Any:
    return tf.GPT2Config(
        vocab_size=cfg.vocab_size,
        n_positions=cfg.max_seq_len,
        n_embd=cfg.d_model,
        n_layer=cfg.n_layers,
        n_head=cfg.n_heads,
        n_inner=cfg.ffn_width(),
        activation_function=_GPT2_ACT_TO_HF[cfg.activation],
        resid_pdrop=cfg.dropout,
        embd_pdrop=cfg.dropout,
        attn_pdrop=cfg.dropout,
        layer_norm_epsilon=cfg.norm_eps,
        initializer_range=cfg.init_std,
        tie_word_embeddings=cfg.tie_embeddings,
    )


def _rope_model_fields(cfg: ModelConfig) -> dict[str, Any]:
    """The config fields Llama and Qwen3 share (Llama has no residual dropout: dropout only matters in training,
    so it is carried as attention_dropout)."""
    return {
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.ffn_width(),
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.kv_heads(),
        "head_dim": cfg.resolved_head_dim(),
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "attention_dropout": cfg.dropout,
        "initializer_range": cfg.init_std,
        "tie_word_embeddings": cfg.tie_embeddings,
    }


def _llama_checks(cfg: ModelConfig) -> list[tuple[bool, str]]:
    return [
        (cfg.norm == "rmsnorm", "Llama needs model.norm=rmsnorm"),
        (cfg.ffn == "swiglu", "Llama needs model.ffn=swiglu"),
        (not cfg.qk_norm, "model.qk_norm=true has no place in Llama (it exports as Qwen3)"),
    ]


def _llama_config(tf: Any, cfg: ModelConfig) -> Any:
    return tf.LlamaConfig(**_rope_model_fields(cfg), attention_bias=cfg.bias, mlp_bias=cfg.bias)


def _qwen3_checks(cfg: ModelConfig) -> list[tuple[bool, str]]:
    return [
        (cfg.norm == "rmsnorm", "Qwen3 needs model.norm=rmsnorm"),
        (cfg.ffn == "swiglu", "Qwen3 needs model.ffn=swiglu"),
        (not cfg.bias, "Qwen3's MLP has no biases: model.bias must be false"),
    ]


def _qwen3_config(tf: Any, cfg: ModelConfig) -> Any:
    if not hasattr(tf, "Qwen3Config"):
        raise UserError("exporting a QK-norm model as Qwen3 needs transformers>=4.51: pip install -U 'tokenmill[hf]'")
    return tf.Qwen3Config(**_rope_model_fields(cfg), attention_bias=False, use_sliding_window=False)


# architecture -> (what the HF class cannot represent, tokenmill config -> HF config)
_TO_HF: dict[str, tuple[Callable[[ModelConfig], list[tuple[bool, str]]], Callable[[Any, ModelConfig], Any]]] = {
    "gpt2": (_gpt2_checks, _gpt2_config),
    "llama": (_llama_checks, _llama_config),
    "qwen3": (_qwen3_checks, _qwen3_config),
}


def check_exportable(cfg: ModelConfig) -> str:
    """The architecture a model config exports as, or a UserError naming what the HF class cannot represent.
    Needs no transformers, so it runs before anything heavy."""
    arch = architecture_of(cfg)
    _refuse(
        [
            (cfg.norm_position == "pre", "model.norm_position must be pre (HF blocks are pre-norm)"),
            (_residual_alpha(cfg) == 1.0, f"model.init={cfg.init} scales the residual stream, HF does not"),
            (cfg.logit_softcap == 0, f"model.logit_softcap={cfg.logit_softcap}: {arch} has no logit soft-capping"),
            *_TO_HF[arch][0](cfg),
        ],
        arch,
    )
    return arch


def hf_config(cfg: ModelConfig, **overrides: Any) -> Any:
    """The transformers config (GPT2Config, LlamaConfig or Qwen3Config) for a tokenmill model config, after
    checking that the class computes exactly what tokenmill computes. `overrides` (e.g. bos_token_id) go to it."""
    arch = check_exportable(cfg)
    hf_cfg = _TO_HF[arch][1](transformers_module(), cfg)
    for key, value in {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None, **overrides}.items():
        setattr(hf_cfg, key, value)
    hf_cfg.architectures = [HF_CLASSES[arch]]
    return hf_cfg


# ---------------------------------------------------------------------------------------------------
# Config mapping, HF -> tokenmill


def _rope(hf_cfg: Any) -> tuple[float, str]:
    """(theta, rope type) from a Llama config: v5 keeps them in `rope_parameters`, v4 in rope_theta/rope_scaling."""
    params = getattr(hf_cfg, "rope_parameters", None)
    if isinstance(params, dict) and "rope_theta" in params:
        return float(params["rope_theta"]), params.get("rope_type", "default")
    scaling = getattr(hf_cfg, "rope_scaling", None) or {}
    return float(hf_cfg.rope_theta), scaling.get("rope_type", scaling.get("type", "default"))


def _gpt2_from_config(hf_cfg: Any) -> ModelConfig:
    act = hf_cfg.activation_function
    _refuse(
        [
            (act in _GPT2_ACT_FROM_HF, f"activation_function={act!r} is not supported"),
            (hf_cfg.scale_attn_weights, "scale_attn_weights=false is not supported"),
            (not hf_cfg.scale_attn_by_inverse_layer_idx, "scale_attn_by_inverse_layer_idx=true is not supported"),
            (not getattr(hf_cfg, "add_cross_attention", False), "cross-attention is not supported"),
        ],
        "gpt2",
    )
    d = hf_cfg.n_embd
    return ModelConfig(
        n_layers=hf_cfg.n_layer,
        d_model=d,
        n_heads=hf_cfg.n_head,
        vocab_size=hf_cfg.vocab_size,
        max_seq_len=hf_cfg.n_positions,
        norm="layernorm",
        norm_eps=hf_cfg.layer_norm_epsilon,
        position="learned",
        ffn="mlp",
        activation=_GPT2_ACT_FROM_HF[act],
        ffn_hidden=hf_cfg.n_inner or 4 * d,
        bias=True,
        tie_embeddings=hf_cfg.tie_word_embeddings,
        dropout=0.0,
        init_std=hf_cfg.initializer_range,
    )


def _rope_model_from_config(hf_cfg: Any, arch: str, qk_norm: bool, bias: bool) -> ModelConfig:
    theta, rope_type = _rope(hf_cfg)
    _refuse(
        [
            (rope_type == "default", f"rope type {rope_type!r} (RoPE scaling) is not supported (tokenmill has none)"),
            (hf_cfg.hidden_act == "silu", f"hidden_act={hf_cfg.hidden_act!r}: tokenmill's swiglu gates with silu"),
        ],
        arch,
    )
    head_dim = getattr(hf_cfg, "head_dim", None) or hf_cfg.hidden_size // hf_cfg.num_attention_heads
    return ModelConfig(
        n_layers=hf_cfg.num_hidden_layers,
        d_model=hf_cfg.hidden_size,
        n_heads=hf_cfg.num_attention_heads,
        n_kv_heads=hf_cfg.num_key_value_heads or 0,
        head_dim=head_dim,
        vocab_size=hf_cfg.vocab_size,
        max_seq_len=hf_cfg.max_position_embeddings,
        norm="rmsnorm",
        norm_eps=hf_cfg.rms_norm_eps,
        position="rope",
        rope_theta=theta,
        ffn="swiglu",
        ffn_hidden=hf_cfg.intermediate_size,
        bias=bias,
        qk_norm=qk_norm,
        tie_embeddings=hf_cfg.tie_word_embeddings,
        dropout=0.0,
        init_std=hf_cfg.initializer_range,
    )


def _llama_from_config(hf_cfg: Any) -> ModelConfig:
    _refuse(
        [
            (
                hf_cfg.attention_bias == getattr(hf_cfg, "mlp_bias", False),
                "attention_bias and mlp_bias differ; tokenmill has one model.bias",
            )
        ],
        "llama",
    )
    return _rope_model_from_config(hf_cfg, "llama", qk_norm=False, bias=bool(hf_cfg.attention_bias))


def _qwen3_from_config(hf_cfg: Any) -> ModelConfig:
    layer_types = getattr(hf_cfg, "layer_types", None) or []
    _refuse(
        [
            (not hf_cfg.attention_bias, "attention_bias=true is not supported (Qwen3's MLP has no bias)"),
            (
                not getattr(hf_cfg, "use_sliding_window", False) and all(t == "full_attention" for t in layer_types),
                "sliding-window attention is not supported",
            ),
        ],
        "qwen3",
    )
    return _rope_model_from_config(hf_cfg, "qwen3", qk_norm=True, bias=False)


_FROM_CONFIG: dict[str, Callable[[Any], ModelConfig]] = {
    "gpt2": _gpt2_from_config,
    "llama": _llama_from_config,
    "qwen3": _qwen3_from_config,
}


def model_config_from_hf(hf_cfg: Any) -> ModelConfig:
    """The tokenmill ModelConfig computing what a GPT2Config / LlamaConfig / Qwen3Config computes (refusing what
    it cannot)."""
    kind = getattr(hf_cfg, "model_type", None)
    if kind not in _FROM_CONFIG:
        raise UserError(f"cannot convert Hugging Face model_type={kind!r}: supported are {', '.join(_FROM_CONFIG)}")
    cfg = _FROM_CONFIG[kind](hf_cfg)
    cfg.validate()
    return cfg


# ---------------------------------------------------------------------------------------------------
# Models


def to_hf(model: Any, **config_overrides: Any) -> Any:
    """A transformers GPT2LMHeadModel / LlamaForCausalLM / Qwen3ForCausalLM with the tokenmill model's weights
    (copied), in eval mode and the model's dtype. `config_overrides` go to the HF config (bos_token_id, ...)."""
    tf = transformers_module()
    cfg = model.cfg
    arch = architecture_of(cfg)
    hf_cfg = hf_config(cfg, **config_overrides)
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    with _no_init():
        hf_model = getattr(tf, HF_CLASSES[arch])(hf_cfg)
    hf_model.to(dtype=sd["tok_emb.weight"].dtype)
    missing, unexpected = hf_model.load_state_dict(build_adapter(arch, cfg).to_hf(sd), strict=False)
    params = {name for name, _ in hf_model.named_parameters(remove_duplicate=False)}
    tied = {"lm_head.weight"} if cfg.tie_embeddings else set()  # shares the embedding: tied below
    missing = [k for k in missing if k in params and k not in tied]  # buffers (older GPT-2 masks) may be missing
    if missing or unexpected:
        raise RuntimeError(f"HF {HF_CLASSES[arch]} weight mismatch: missing {missing}, unexpected {unexpected}")
    if cfg.tie_embeddings:
        hf_model.tie_weights()
    return hf_model.eval()


def from_hf(hf_model: Any, device: str | torch.device = "cpu") -> Any:
    """A tokenmill Transformer with the weights of a transformers GPT-2 / Llama / Qwen3 causal LM (copied), in
    eval mode and fp32 (cast it afterwards if you want another dtype)."""
    from tokenmill.model import build_model

    cfg = model_config_from_hf(hf_model.config)
    sd = build_adapter(architecture_of(cfg), cfg).from_hf(dict(hf_model.state_dict()))
    model = build_model(cfg, device=device)  # the supported construction path (meta build + init_weights)
    model.load_state_dict(sd, strict=True)  # copies into the fp32 parameters
    return model.eval()


def load_pretrained(path_or_name: str | Path, device: str | torch.device = "cpu") -> Any:
    """A tokenmill Transformer from a Hugging Face model folder (config.json + safetensors) or, when online,
    a Hub name. Loads with transformers (safetensors, no pickled code) and converts with `from_hf`."""
    tf = transformers_module()
    try:
        hf_config_ = tf.AutoConfig.from_pretrained(str(path_or_name))
        model_config_from_hf(hf_config_)  # refuse an unsupported architecture before reading any weights
        hf_model = tf.AutoModelForCausalLM.from_pretrained(str(path_or_name), use_safetensors=True, dtype=torch.float32)
    except (OSError, ValueError) as err:
        raise UserError(f"cannot load Hugging Face model {path_or_name}: {err}".splitlines()[0]) from err
    return from_hf(hf_model, device=device)
