"""The `model` config section: every architectural choice of the decoder, by name.

The names of each choice live here, so validating a config imports no torch; the registries that map these
names to code (`NORMS` in model/norms.py, `ATTENTION` in model/attention.py, ...) must have exactly these keys.
"""

from __future__ import annotations

from dataclasses import dataclass

from tokenmill.config.fields import opt, require, require_choice, require_positive

NORM_NAMES = ("layernorm", "layernorm_nobias", "rmsnorm")
NORM_POSITION_NAMES = ("pre", "post")
POSITION_NAMES = ("learned", "rope", "none")
FFN_NAMES = ("mlp", "swiglu")
ACTIVATION_NAMES = ("gelu", "gelu_tanh", "silu", "relu", "leaky_relu", "relu2")
ATTENTION_NAMES = ("sdpa", "eager", "flex", "flash_attn")
INIT_NAMES = ("normal", "fan_in", "deepnet")


@dataclass
class ModelConfig:
    n_layers: int = opt(4, "number of transformer blocks")
    d_model: int = opt(256, "residual stream width")
    n_heads: int = opt(4, "attention (query) heads; must divide d_model")
    n_kv_heads: int = opt(0, "key/value heads for GQA; 0 = n_heads (MHA); n_heads must be a multiple")
    head_dim: int = opt(0, "per-head width; 0 = d_model / n_heads")
    vocab_size: int = opt(0, "embedding rows; 0 = the tokenizer's vocab rounded up to vocab_multiple_of")
    vocab_multiple_of: int = opt(64, "round a tokenizer-derived vocab up to this multiple (faster matmuls)")
    max_seq_len: int = opt(1024, "longest sequence; sizes the learned position table and the RoPE cache")
    norm: str = opt("rmsnorm", "normalisation layer (NORMS): layernorm, layernorm_nobias, rmsnorm")
    norm_eps: float = opt(1e-5, "epsilon of every norm layer")
    norm_position: str = opt("pre", "where blocks normalise (NORM_POSITIONS): pre or post")
    position: str = opt("rope", "position encoding (POSITIONS): learned, rope, none")
    rope_theta: float = opt(10000.0, "RoPE base frequency")
    ffn: str = opt("swiglu", "feed-forward type (FFNS): mlp or swiglu")
    activation: str = opt(
        "silu",
        "activation of the mlp FFN (ACTIVATIONS): gelu, gelu_tanh, silu, relu, leaky_relu, relu2 (relu squared); "
        "swiglu always gates with silu",
    )
    ffn_mult: float = opt(4.0, "mlp hidden = ffn_mult x d_model (swiglu: 2/3 of that, rounded)")
    ffn_hidden: int = opt(0, "explicit FFN hidden width; 0 = derived from ffn_mult and multiple_of")
    multiple_of: int = opt(256, "round a derived swiglu hidden width up to this multiple")
    bias: bool = opt(False, "bias in linear layers (the norm's bias comes with model.norm: layernorm has one)")
    tie_embeddings: bool = opt(True, "share the input embedding with the output head")
    dropout: float = opt(0.0, "dropout on embeddings, attention probabilities and residual branches (train mode)")
    qk_norm: bool = opt(False, "per-head RMSNorm on queries and keys")
    attention: str = opt("sdpa", "attention backend (ATTENTION): sdpa, eager, flex, flash_attn")
    init: str = opt(
        "normal",
        "init scheme (INITS): normal (std init_std), fan_in (1/sqrt(fan_in)), deepnet "
        "(DeepNorm; needs norm_position=post)",
    )
    init_std: float = opt(0.02, "std of the normal init for linears and embeddings")
    logit_softcap: float = opt(0.0, "cap logits smoothly at +-c: c * tanh(logits / c); 0 = off")
    z_loss: float = opt(0.0, "training only: add z_loss x mean(logsumexp(logits)^2) to the loss; 0 = off")

    def kv_heads(self) -> int:
        """Key/value head count with the 0 = MHA default resolved."""
        return self.n_kv_heads or self.n_heads

    def resolved_head_dim(self) -> int:
        return self.head_dim or self.d_model // self.n_heads

    def ffn_width(self) -> int:
        """FFN hidden width: explicit, or mult x d (mlp), or 2/3 of that rounded up to multiple_of (swiglu)."""
        if self.ffn_hidden:
            return self.ffn_hidden
        hidden = int(self.ffn_mult * self.d_model)
        if self.ffn == "swiglu":
            hidden = int(2 * hidden / 3)
            hidden = self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)
        return hidden

    def validate(self) -> None:
        require_positive(self, "model", "n_layers", "d_model", "n_heads", "max_seq_len", "norm_eps", "rope_theta")
        require_positive(self, "model", "n_kv_heads", "head_dim", "vocab_size", "ffn_hidden", allow_zero=True)
        require_positive(self, "model", "vocab_multiple_of", "multiple_of", "ffn_mult", "init_std")
        require_positive(self, "model", "logit_softcap", "z_loss", allow_zero=True)
        require(
            self.d_model % self.n_heads == 0 or self.head_dim > 0,
            "model.n_heads",
            self.n_heads,
            f"must divide model.d_model={self.d_model} (or set model.head_dim)",
        )
        require(
            self.n_heads % self.kv_heads() == 0,
            "model.n_kv_heads",
            self.n_kv_heads,
            f"model.n_heads={self.n_heads} must be a multiple of it",
        )
        require(0.0 <= self.dropout < 1.0, "model.dropout", self.dropout, "must be in [0, 1)")
        require(
            self.position != "rope" or self.resolved_head_dim() % 2 == 0,
            "model.head_dim",
            self.resolved_head_dim(),
            "rope needs an even head dimension",
        )
        require_choice("model.norm", self.norm, NORM_NAMES)
        require_choice("model.norm_position", self.norm_position, NORM_POSITION_NAMES)
        require_choice("model.position", self.position, POSITION_NAMES)
        require_choice("model.ffn", self.ffn, FFN_NAMES)
        require_choice("model.activation", self.activation, ACTIVATION_NAMES)
        require_choice("model.attention", self.attention, ATTENTION_NAMES)
        require_choice("model.init", self.init, INIT_NAMES)
        # DeepNorm scales the residual stream by (2N)^(1/4) before a norm; under pre-norm the stream would grow
        # as alpha^(2N) instead (arXiv:2203.00555 defines it for post-norm only).
        require(
            self.init != "deepnet" or self.norm_position == "post",
            "model.init",
            self.init,
            "deepnet (DeepNorm) is a post-norm scheme: also set model.norm_position=post",
        )
        require(
            self.attention != "flex" or self.dropout == 0.0,
            "model.dropout",
            self.dropout,
            "model.attention=flex has no attention dropout: set model.dropout=0 or use sdpa",
        )
