"""State-dict adapters between tokenmill's Transformer and Hugging Face's GPT-2 / Llama / Qwen3 layouts.

One adapter per architecture, each with `to_hf(state_dict)` and `from_hf(hf_state_dict)` as pure functions of
the model config (the pattern of torchtitan's `StateDictAdapter`, torchtitan/models/llama3/state_dict_adapter.py).
Weights convert by renaming, except GPT-2's Conv1D layers, which store (in, out) matrices (transposed against
nn.Linear) and fuse q, k, v into one `c_attn`. RoPE is the rotate-half layout on both sides, so Llama and Qwen3
q/k weights need no permutation. Tied output heads appear once, as the input embedding: Hugging Face files omit
`lm_head.weight` when `tie_word_embeddings` is set and re-tie on load.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokenmill.model.config import ModelConfig

StateDict = dict[str, torch.Tensor]


@dataclass(frozen=True)
class GPT2Adapter:
    """tokenmill <-> transformers GPT2LMHeadModel (learned positions, LayerNorm with bias, MLP, Conv1D)."""

    cfg: ModelConfig

    def to_hf(self, sd: StateDict) -> StateDict:
        out = {
            "transformer.wte.weight": sd["tok_emb.weight"],
            "transformer.wpe.weight": sd["pos_emb.weight"],
            "transformer.ln_f.weight": sd["norm.weight"],
            "transformer.ln_f.bias": sd["norm.bias"],
        }
        for i in range(self.cfg.n_layers):
            b, h = f"blocks.{i}.", f"transformer.h.{i}."
            for ours, theirs in (("attn_norm", "ln_1"), ("ffn_norm", "ln_2")):
                out[h + theirs + ".weight"] = sd[b + ours + ".weight"]
                out[h + theirs + ".bias"] = sd[b + ours + ".bias"]
            # Conv1D computes x @ W + b with W (in, out): the transpose of nn.Linear's (out, in) weight.
            qkv = [sd[f"{b}attn.{p}_proj.weight"] for p in "qkv"]
            out[h + "attn.c_attn.weight"] = torch.cat(qkv, dim=0).t().contiguous()  # (d, 3d)
            out[h + "attn.c_attn.bias"] = torch.cat([sd[f"{b}attn.{p}_proj.bias"] for p in "qkv"])
            for ours, theirs in (
                ("attn.o_proj", "attn.c_proj"),
                ("ffn.up_proj", "mlp.c_fc"),
                ("ffn.down_proj", "mlp.c_proj"),
            ):
                out[h + theirs + ".weight"] = sd[b + ours + ".weight"].t().contiguous()
                out[h + theirs + ".bias"] = sd[b + ours + ".bias"]
        if not self.cfg.tie_embeddings:
            out["lm_head.weight"] = sd["head.weight"]
        return out

    def from_hf(self, sd: StateDict) -> StateDict:
        out = {
            "tok_emb.weight": sd["transformer.wte.weight"],
            "pos_emb.weight": sd["transformer.wpe.weight"],
            "norm.weight": sd["transformer.ln_f.weight"],
            "norm.bias": sd["transformer.ln_f.bias"],
        }
        d = self.cfg.d_model
        for i in range(self.cfg.n_layers):
            b, h = f"blocks.{i}.", f"transformer.h.{i}."
            for ours, theirs in (("attn_norm", "ln_1"), ("ffn_norm", "ln_2")):
                out[b + ours + ".weight"] = sd[h + theirs + ".weight"]
                out[b + ours + ".bias"] = sd[h + theirs + ".bias"]
            w, bias = sd[h + "attn.c_attn.weight"].t(), sd[h + "attn.c_attn.bias"]  # (3d, d), (3d,)
            for j, p in enumerate("qkv"):
                out[f"{b}attn.{p}_proj.weight"] = w[j * d : (j + 1) * d].contiguous()
                out[f"{b}attn.{p}_proj.bias"] = bias[j * d : (j + 1) * d].contiguous()
            for ours, theirs in (
                ("attn.o_proj", "attn.c_proj"),
                ("ffn.up_proj", "mlp.c_fc"),
                ("ffn.down_proj", "mlp.c_proj"),
            ):
                out[b + ours + ".weight"] = sd[h + theirs + ".weight"].t().contiguous()
                out[b + ours + ".bias"] = sd[h + theirs + ".bias"]
        if not self.cfg.tie_embeddings:
            out["head.weight"] = sd["lm_head.weight"]
        return out


@dataclass(frozen=True)
class LlamaAdapter:
    """tokenmill <-> transformers LlamaForCausalLM, and Qwen3ForCausalLM when the model has QK-norm.

    Both are pure renames: tokenmill names parameters inside blocks as Llama does, and Qwen3 is Llama plus a
    per-head RMSNorm on queries and keys (`self_attn.q_norm` / `k_norm`).
    """

    cfg: ModelConfig

    def names(self) -> list[tuple[str, str]]:
        """(tokenmill key, HF key) pairs of every tensor the HF file holds."""
        cfg = self.cfg
        names = [("tok_emb.weight", "model.embed_tokens.weight"), ("norm.weight", "model.norm.weight")]
        suffixes = ("weight", "bias") if cfg.bias else ("weight",)
        for i in range(cfg.n_layers):
            b, h = f"blocks.{i}.", f"model.layers.{i}."
            names += [
                (b + "attn_norm.weight", h + "input_layernorm.weight"),
                (b + "ffn_norm.weight", h + "post_attention_layernorm.weight"),
            ]
            names += [(f"{b}attn.{p}_proj.{s}", f"{h}self_attn.{p}_proj.{s}") for p in "qkvo" for s in suffixes]
            names += [
                (f"{b}ffn.{p}_proj.{s}", f"{h}mlp.{p}_proj.{s}") for p in ("gate", "up", "down") for s in suffixes
            ]
            if cfg.qk_norm:
                names += [(f"{b}attn.{p}_norm.weight", f"{h}self_attn.{p}_norm.weight") for p in "qk"]
        if not cfg.tie_embeddings:
            names.append(("head.weight", "lm_head.weight"))
        return names

    def to_hf(self, sd: StateDict) -> StateDict:
        return {theirs: sd[ours] for ours, theirs in self.names()}

    def from_hf(self, sd: StateDict) -> StateDict:
        return {ours: sd[theirs] for ours, theirs in self.names()}


ADAPTERS: dict[str, type[GPT2Adapter | LlamaAdapter]] = {
    "gpt2": GPT2Adapter,
    "llama": LlamaAdapter,
    "qwen3": LlamaAdapter,
}


def build_adapter(arch: str, cfg: ModelConfig) -> GPT2Adapter | LlamaAdapter:
    """The state-dict adapter of architecture `arch` (a key of ADAPTERS) for models shaped like `cfg`."""
    return ADAPTERS[arch](cfg)
