"""The decoder-only Transformer: embeddings, blocks, final norm, output head and next-token loss.

Plain single-device PyTorch, never importing torch.distributed: parallelism, activation checkpointing and
torch.compile are applied from outside (`tokenmill.parallel`, `tokenmill.levers`), so the model reads the same
for one CPU and for a pipeline-parallel FSDP run. Build it on the meta device and call `init_weights()` once
(`tokenmill.model.build_model` does both). Parameter names follow Hugging Face Llama inside blocks so
GPT-2 and Llama checkpoints convert by renaming only (the key maps are in `tokenmill.interop.hf`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from tokenmill.errors import UserError
from tokenmill.model.attention import Attention, build_attention_backend
from tokenmill.model.config import ModelConfig
from tokenmill.model.ffn import FFNS
from tokenmill.model.init import INITS
from tokenmill.model.kv_cache import KVCache, LayerKV
from tokenmill.model.norms import RMSNorm, build_norm
from tokenmill.model.position import POSITIONS, RotaryEmbedding, position_ids, rolled_rope_tables

Sublayer = Callable[[torch.Tensor], torch.Tensor]
# (h (N, d), head weight (V, d), targets (N,), ignore_index, reduction) -> loss: a fused head + cross-entropy
HeadLoss = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int, str], torch.Tensor]


def _pre_norm_step(x: torch.Tensor, f: Sublayer, norm: nn.Module, alpha: float) -> torch.Tensor:
    """x + f(norm(x)) (GPT-2, Llama): the residual stream itself is never normalised."""
    return (x if alpha == 1.0 else alpha * x) + f(norm(x))


def _post_norm_step(x: torch.Tensor, f: Sublayer, norm: nn.Module, alpha: float) -> torch.Tensor:
    """norm(alpha * x + f(x)) (original Transformer; DeepNorm with alpha > 1, arXiv:2203.00555 eq. 1)."""
    return norm((x if alpha == 1.0 else alpha * x) + f(x))


@dataclass(frozen=True)
class NormPosition:
    """Where a block normalises: `step` applies one residual sublayer; `final_norm` says whether the model
    ends with a norm (post-norm blocks already end normalised, so theirs is an identity)."""

    step: Callable[[torch.Tensor, Sublayer, nn.Module, float], torch.Tensor]
    final_norm: bool


# The keys are NORM_POSITION_NAMES in model/config.py, the names config validation accepts (a test keeps them equal).
NORM_POSITIONS: dict[str, NormPosition] = {
    "pre": NormPosition(step=_pre_norm_step, final_norm=True),
    "post": NormPosition(step=_post_norm_step, final_norm=False),
}


@dataclass
class BlockContext:
    """What every block needs besides x, computed once per forward: RoPE tables and the backend's mask."""

    rope: tuple[torch.Tensor, torch.Tensor] | None
    mask: Any


class Block(nn.Module):
    """One Transformer layer: attention then FFN, each a residual sublayer normalised pre or post."""

    def __init__(self, cfg: ModelConfig, backend: Any, residual_alpha: float = 1.0) -> None:
        super().__init__()
        self.attn_norm = build_norm(cfg.norm, cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg, backend)
        self.ffn_norm = build_norm(cfg.norm, cfg.d_model, cfg.norm_eps)
        self.ffn = FFNS[cfg.ffn](cfg)
        self.resid_drop = nn.Dropout(cfg.dropout)
        self.step = NORM_POSITIONS[cfg.norm_position].step
        self.residual_alpha = residual_alpha

    def forward(self, x: torch.Tensor, ctx: BlockContext, kv: LayerKV | None = None) -> torch.Tensor:
        """(B, T, d) -> (B, T, d); `kv` is this layer's KV cache during generation."""
        x = self.step(
            x, lambda h: self.resid_drop(self.attn(h, ctx.rope, ctx.mask, kv)), self.attn_norm, self.residual_alpha
        )
        return self.step(x, lambda h: self.resid_drop(self.ffn(h)), self.ffn_norm, self.residual_alpha)


class Transformer(nn.Module):
    """Decoder-only LM. forward: (B, T) token ids -> (B, T, V) logits; loss: (B, T+1) windows -> scalar."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        if cfg.vocab_size <= 0:
            raise UserError(
                f"model.vocab_size={cfg.vocab_size}: the model needs a concrete vocab size; set "
                f"model.vocab_size or let the trainer resolve it from the tokenizer"
            )
        self.cfg = cfg
        kind = POSITIONS[cfg.position]
        backend = build_attention_backend(cfg)
        alpha = INITS[cfg.init]().residual_alpha(cfg)
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.max_seq_len, cfg.d_model) if kind.table else None
        self.rope = RotaryEmbedding(cfg.resolved_head_dim(), cfg.max_seq_len, cfg.rope_theta) if kind.rotary else None
        self.emb_drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, backend, alpha) for _ in range(cfg.n_layers))
        final = NORM_POSITIONS[cfg.norm_position].final_norm
        self.norm = build_norm(cfg.norm, cfg.d_model, cfg.norm_eps) if final else nn.Identity()
        self.head = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.backend = backend
        # (token ids, positions, cache) -> logits: a fused one-token step that a generator owning this model attaches
        # (tokenmill.generation.decode_step); None computes every step through the modules below
        self.decode_step: Callable[[list[int], list[int], KVCache], torch.Tensor] | None = None

    # -- initialisation ---------------------------------------------------------------------------------

    @torch.no_grad()
    def init_weights(self) -> None:
        """Initialise every parameter (and the RoPE cache); the only place init is decided,
        so a model built on the meta device and initialised once (after any sharding) misses no parameter.

        | parameter                    | normal                  | fan_in                        | deepnet           |
        | ---------------------------- | ----------------------- | ----------------------------- | ----------------- |
        | tok_emb, pos_emb             | N(0, init_std)          | N(0, init_std)                | N(0, init_std)    |
        | q_proj, k_proj               | N(0, init_std)          | N(0, 1/sqrt(fan_in))          | xavier, gain 1    |
        | v_proj, gate_proj, up_proj   | N(0, init_std)          | N(0, 1/sqrt(fan_in))          | xavier, gain beta |
        | o_proj, down_proj (residual) | N(0, init_std/sqrt(2L)) | N(0, 1/sqrt(fan_in)/sqrt(2L)) | xavier, gain beta |
        | head (untied)                | N(0, init_std)          | N(0, 1/sqrt(d))               | N(0, 1/sqrt(d))   |
        | linear biases                | 0                       | 0                             | 0                 |
        | norm weight / bias, QK too   | 1 / 0                   | 1 / 0                         | 1 / 0             |

        L = n_layers; xavier = torch.nn.init.xavier_normal_; DeepNet (arXiv:2203.00555): beta = (8L)^(-1/4) and
        residual alpha = (2L)^(1/4) (see model/init.py).
        """
        cfg = self.cfg
        scheme = INITS[cfg.init]()
        for table in (self.tok_emb, self.pos_emb):
            if table is not None:
                nn.init.normal_(table.weight, mean=0.0, std=scheme.embedding_std(cfg))
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                role = name.rsplit(".", 1)[-1]  # q_proj, ..., down_proj, head
                std = scheme.linear_std(role, module.in_features, module.out_features, cfg)
                nn.init.normal_(module.weight, mean=0.0, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, (nn.LayerNorm, RMSNorm)):
                if module.weight is not None:
                    nn.init.ones_(module.weight)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
        if self.rope is not None:
            self.rope.reset_cache()

    # -- forward ----------------------------------------------------------------------------------------

    def hidden(
        self,
        idx: torch.Tensor,
        doc_ids: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """Final hidden states (B, T, d) after the last norm, before the head."""
        return self.norm(self.trunk(idx, doc_ids, positions, cache))

    def trunk(
        self,
        idx: torch.Tensor,
        doc_ids: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """Residual stream (B, T, d) after the last block, before the final norm.

        Training and scoring pass token ids (and doc_ids for packed rows); positions are then derived. Generation
        passes explicit (B, T) `positions` and a `cache`: each row's tokens are written into the cache at their
        positions and see every cached position up to their own (kv_cache.py explains the layout).
        """
        T = idx.shape[1]
        if T > self.cfg.max_seq_len:
            raise UserError(
                f"sequence of {T} tokens exceeds model.max_seq_len={self.cfg.max_seq_len}; "
                f"shorten it or raise model.max_seq_len"
            )
        if doc_ids is not None and doc_ids.shape != idx.shape:
            raise UserError(f"doc_ids shape {tuple(doc_ids.shape)} must equal the token shape {tuple(idx.shape)}")
        if cache is not None and (positions is None or positions.shape != idx.shape or doc_ids is not None):
            raise UserError("a KV cache forward needs (B, T) positions of the token shape and no doc_ids")
        pos = positions
        if pos is None and (self.pos_emb is not None or self.rope is not None):
            pos = position_ids(T, doc_ids, idx.device)
        x = self.tok_emb(idx)  # (B, T, d)
        if self.pos_emb is not None:
            x = x + self.pos_emb(pos)
        x = self.emb_drop(x)
        rope = self.rope.tables(pos) if self.rope is not None else None
        if cache is None:
            ctx = BlockContext(rope=rope, mask=self.backend.prepare(doc_ids, T, idx.device))
            for block in self.blocks:
                x = block(x, ctx)
            return x
        rope = rolled_rope_tables(*rope) if rope is not None else None  # what Attention's cached path takes
        ctx = BlockContext(rope=rope, mask=self.backend.prepare_cached(positions, cache.span))
        rows = torch.arange(positions.shape[0], device=positions.device)[:, None]  # (B, 1), shared by every layer
        for i, block in enumerate(self.blocks):
            x = block(x, ctx, cache.layer(i, rows, positions))
        return x

    def output_weight(self) -> torch.Tensor:
        """(V, d) matrix of the output head: the token embedding when tied."""
        return self.tok_emb.weight if self.head is None else self.head.weight

    def forward(
        self,
        idx: torch.Tensor,
        doc_ids: torch.Tensor | None = None,
        last_only: bool = False,
        positions: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """Logits (B, T, V), or (B, 1, V) for the last position only (generation: the head runs on one row)."""
        x = self.trunk(idx, doc_ids, positions, cache)
        if last_only:
            x = x[:, -1:]  # final norm and head on one position only
        return head_logits(self.norm(x), self.output_weight(), self.cfg.logit_softcap)

    def next_logits(
        self, idx: torch.Tensor, positions: torch.Tensor, cache: KVCache, last: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Generation step: cache the (B, T) tokens at their positions, return (B, V) next-token logits.

        The logits are those of each row's token at index `last[b]` of T (right-padded prefill of prompts of
        different lengths), or of the final token; the head runs on those B rows only.
        """
        if self.decode_step is not None and idx.shape[1] == 1:
            return self.decode_step(idx[:, 0].tolist(), positions[:, 0].tolist(), cache)  # attached on CPUs only
        x = self.trunk(idx, None, positions, cache)  # (B, T, d)
        # (B, d): each row's last position, or the given one per row
        x = x[:, -1] if last is None else x[torch.arange(x.shape[0], device=x.device), last]
        return head_logits(self.norm(x), self.output_weight(), self.cfg.logit_softcap)

    # -- loss -------------------------------------------------------------------------------------------

    def loss(
        self,
        window: torch.Tensor,
        doc_ids: torch.Tensor | None = None,
        ignore_index: int = -100,
        chunk_size: int = 0,
        reduction: str = "mean",
        targets: torch.Tensor | None = None,
        head_loss: HeadLoss | None = None,
    ) -> torch.Tensor:
        """Next-token cross-entropy of a (B, T+1) window: inputs window[:, :-1], targets window[:, 1:].

        `targets` (B, T) replaces window[:, 1:], e.g. with ignore_index at masked prompt or padding positions.
        reduction "mean" averages over targets != ignore_index; "sum" returns the summed token loss (the
        trainer divides by the global token count under gradient accumulation). chunk_size > 0 runs head +
        cross-entropy over chunks of chunk_size tokens, recomputing each chunk's logits in backward, so full
        (B, T, V) fp32 logits never exist; values and gradients equal the plain path. `head_loss(h, weight,
        targets, ignore_index, reduction)` replaces both with a fused head + loss kernel (tokenmill.levers.fused_loss).
        `model.logit_softcap` caps the logits and `model.z_loss` adds its term on every path but the fused one.
        """
        if reduction not in ("mean", "sum"):
            raise UserError(f"loss reduction={reduction!r} is not allowed: choose mean or sum")
        inputs, targets = window[:, :-1], window[:, 1:] if targets is None else targets
        h = self.hidden(inputs, None if doc_ids is None else doc_ids[:, :-1])
        weight = self.output_weight()
        flat_h, flat_t = h.flatten(0, 1), targets.flatten()  # (B*T, d), (B*T,)
        softcap, z_loss = self.cfg.logit_softcap, self.cfg.z_loss
        if head_loss is not None:
            if softcap or z_loss:
                raise UserError(
                    "a fused head + loss kernel has no logit soft-capping or z-loss: set train.loss_impl=chunked "
                    "(or model.logit_softcap=0 and model.z_loss=0)"
                )
            return head_loss(flat_h, weight, flat_t, ignore_index, reduction)
        if chunk_size <= 0:
            total = _chunk_loss_sum(flat_h, weight, flat_t, ignore_index, softcap, z_loss)
        else:
            total = flat_h.new_zeros((), dtype=torch.float32)
            for start in range(0, flat_h.shape[0], chunk_size):
                stop = start + chunk_size
                chunk = (flat_h[start:stop], weight, flat_t[start:stop], ignore_index, softcap, z_loss)
                total = total + checkpoint(_chunk_loss_sum, *chunk, use_reentrant=False)
        if reduction == "sum":
            return total
        return total / (flat_t != ignore_index).sum()


def head_logits(h: torch.Tensor, weight: torch.Tensor, softcap: float = 0.0) -> torch.Tensor:
    """(..., d) hidden -> (..., V) logits, soft-capped to (-c, c) by c * tanh(logits / c) when c > 0
    (Gemma 2 report, arXiv:2408.00118, section 2; modded-nanogpt caps its logits the same way)."""
    logits = F.linear(h, weight)
    return logits if softcap <= 0 else softcap * torch.tanh(logits / softcap)


def _chunk_loss_sum(
    h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int, softcap: float, z_loss: float
) -> torch.Tensor:
    """Summed cross-entropy of one chunk: (n, d) hidden -> (n, V) logits in fp32 -> scalar.

    z_loss > 0 adds z_loss x logsumexp(logits)^2 per valid target, which keeps the softmax normaliser near 1
    (PaLM, Chowdhery et al. 2022, arXiv:2204.02311, section 5: weight 1e-4)."""
    logits = head_logits(h, weight, softcap).float()  # (n, V)
    loss = F.cross_entropy(logits, targets, ignore_index=ignore_index, reduction="sum")
    if z_loss > 0:
        valid = targets != ignore_index
        loss = loss + z_loss * torch.logsumexp(logits[valid], dim=-1).square().sum()
    return loss
