"""Attention backends agree (forward and backward where they have one), document masking equals running each
document alone, and the mask helpers are right. FlexAttention has no CPU backward in torch 2.13: its backward
(and bf16 checks) run only with a GPU."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from tokenmill.errors import UserError
from tokenmill.model import build_model
from tokenmill.model.attention import ATTENTION, cu_seqlens_from_doc_ids, document_causal_mask
from tokenmill.model.config import ModelConfig

V = 64
HAS_FLASH_ATTN = True
try:
    import flash_attn  # noqa: F401
except ImportError:
    HAS_FLASH_ATTN = False

CPU_GRAD_BACKENDS = ["sdpa", "eager"]  # backends with a CPU backward


@pytest.fixture(autouse=True)
def _quiet_flex():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
        yield


def tiny(**overrides) -> ModelConfig:
    base = dict(n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, vocab_size=V, max_seq_len=32, ffn_hidden=48)
    cfg = ModelConfig(**{**base, **overrides})
    cfg.validate()
    return cfg


def make(attention: str, seed: int = 0, device: str = "cpu", **overrides):
    torch.manual_seed(seed)  # init does not depend on the backend, so equal seeds give equal weights
    return build_model(tiny(attention=attention, **overrides), device=device)


def packed(seed: int = 0, lengths=(5, 3, 8), rows: int = 2):
    """rows x sum(lengths) tokens; row r holds the documents in rotated order, doc ids non-decreasing."""
    g = torch.Generator().manual_seed(seed)
    T = sum(lengths)
    idx = torch.randint(0, V, (rows, T), generator=g)
    doc_ids = torch.empty(rows, T, dtype=torch.long)
    for r in range(rows):
        order = lengths[r % len(lengths) :] + lengths[: r % len(lengths)]
        doc_ids[r] = torch.repeat_interleave(torch.arange(len(order)), torch.tensor(order))
    return idx, doc_ids


def grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters()}


# ---------------------------------------------------------------------------------------------------------------
# Backend parity through the whole model


@pytest.mark.parametrize("with_docs", [False, True])
@pytest.mark.parametrize("n_kv_heads", [0, 2])
def test_sdpa_and_eager_agree_forward_and_backward(with_docs, n_kv_heads):
    idx, doc_ids = packed()
    window = torch.cat([idx, idx[:, :1]], dim=1)
    docs = torch.cat([doc_ids, doc_ids[:, -1:]], dim=1) if with_docs else None
    results = {}
    for name in CPU_GRAD_BACKENDS:
        model = make(name, n_kv_heads=n_kv_heads)
        loss = model.loss(window, docs)
        loss.backward()
        results[name] = (model(idx, docs[:, :-1] if with_docs else None), loss, grads(model))
    (la, lossa, ga), (lb, lossb, gb) = results["sdpa"], results["eager"]
    torch.testing.assert_close(la, lb, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lossa, lossb, atol=1e-6, rtol=1e-6)
    for n in ga:
        torch.testing.assert_close(ga[n], gb[n], atol=1e-5, rtol=1e-4, msg=n)


@pytest.mark.parametrize("with_docs", [False, True])
def test_flex_forward_agrees_with_eager_on_cpu(with_docs):
    idx, doc_ids = packed()
    docs = doc_ids if with_docs else None
    with torch.no_grad():
        reference = make("eager")(idx, docs)
        flex = make("flex")(idx, docs)
    torch.testing.assert_close(flex, reference, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not HAS_FLASH_ATTN, reason="flash-attn is not installed")
@pytest.mark.gpu
@pytest.mark.parametrize("with_docs", [False, True])
def test_flash_attn_agrees_with_sdpa_bf16(with_docs):
    idx, doc_ids = packed()
    idx, doc_ids = idx.cuda(), doc_ids.cuda()
    docs = doc_ids if with_docs else None
    out = {}
    for name in ("sdpa", "flash_attn"):
        model = make(name, device="cuda")
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(idx, docs)
        logits.float().sum().backward()
        out[name] = (logits.float(), grads(model))
    torch.testing.assert_close(out["flash_attn"][0], out["sdpa"][0], atol=3e-2, rtol=3e-2)
    for n, g in out["sdpa"][1].items():
        torch.testing.assert_close(out["flash_attn"][1][n].float(), g.float(), atol=5e-2, rtol=5e-2, msg=n)


@pytest.mark.gpu
@pytest.mark.parametrize("with_docs", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_flex_backward_agrees_with_sdpa_on_gpu(with_docs, dtype):
    idx, doc_ids = packed()
    idx, doc_ids = idx.cuda(), doc_ids.cuda()
    docs = doc_ids if with_docs else None
    out = {}
    for name in ("sdpa", "flex", "eager"):
        model = make(name, device="cuda")
        with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
            logits = model(idx, docs)
        logits.float().pow(2).mean().backward()
        out[name] = (logits.float(), grads(model))
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=3e-2, rtol=3e-2)
    for name in ("flex", "eager"):
        torch.testing.assert_close(out[name][0], out["sdpa"][0], **tol)
        for n, g in out["sdpa"][1].items():
            torch.testing.assert_close(out[name][1][n], g, **tol, msg=f"{name} {n}")


# ---------------------------------------------------------------------------------------------------------------
# Document masking: a packed row equals its documents run alone


@pytest.mark.parametrize("position", ["rope", "learned", "none"])
@pytest.mark.parametrize("attention", ["sdpa", "eager", "flex"])
def test_packed_documents_equal_documents_alone(attention, position):
    model = make(attention, position=position, qk_norm=True)
    idx, doc_ids = packed()
    with torch.no_grad():
        logits = model(idx, doc_ids)
        for r in range(idx.shape[0]):
            for d in doc_ids[r].unique():
                where = doc_ids[r] == d
                alone = model(idx[r][where][None])
                torch.testing.assert_close(logits[r][where][None], alone, atol=1e-5, rtol=1e-5)


def test_without_doc_ids_later_documents_see_earlier_ones():
    """The masked test above can fail: without doc_ids, the second document's logits change."""
    model = make("sdpa", position="none")
    idx, doc_ids = packed(rows=1)
    with torch.no_grad():
        unmasked = model(idx)
        where = doc_ids[0] == 1
        alone = model(idx[0][where][None])
    assert not torch.allclose(unmasked[0][where][None], alone, atol=1e-4)


def test_packed_loss_equals_sum_of_document_losses():
    model = make("sdpa")
    idx, doc_ids = packed(rows=1)
    docs = doc_ids[0]
    window = torch.cat([idx, torch.zeros(1, 1, dtype=torch.long)], dim=1)
    doc_window = torch.cat([doc_ids, doc_ids[:, -1:]], dim=1)
    total = model.loss(window, doc_window, reduction="sum")
    # the same per-position losses, computed document by document (the last position of each document
    # predicts the next document's first token: that target is in the window too)
    expected = 0.0
    for d in docs.unique():
        pos = (docs == d).nonzero().flatten()
        logits = model(idx[:, pos])
        targets = window[0, pos + 1]
        expected = expected + torch.nn.functional.cross_entropy(logits[0], targets, reduction="sum")
    torch.testing.assert_close(total, expected, atol=1e-4, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# Backend level: the same q, k, v through each backend's attend()


def _qkv(B=2, H=4, Hkv=2, T=16, hd=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, h, T, hd, generator=g) for h in (H, Hkv, Hkv)]


@pytest.mark.parametrize("with_docs", [False, True])
def test_attend_level_parity(with_docs):
    _, doc_ids = packed()
    T = doc_ids.shape[1]
    docs = doc_ids if with_docs else None
    outs, gs = {}, {}
    for name in CPU_GRAD_BACKENDS:
        q, k, v = (t.requires_grad_() for t in _qkv(T=T))
        backend = ATTENTION[name]()
        out = backend.attend(q, k, v, backend.prepare(docs, T, q.device), 0.0)
        out.pow(2).sum().backward()
        outs[name], gs[name] = out, (q.grad, k.grad, v.grad)
    flex = ATTENTION["flex"]()
    q, k, v = _qkv(T=T)
    outs["flex"] = flex.attend(q, k, v, flex.prepare(docs, T, q.device), 0.0)
    for name in ("sdpa", "flex"):
        torch.testing.assert_close(outs[name], outs["eager"], atol=1e-5, rtol=1e-5)
    for a, b in zip(gs["sdpa"], gs["eager"]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_document_causal_mask():
    doc_ids = torch.tensor([[0, 0, 1, 1, 1]])
    expected = torch.tensor(
        [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 1, 1, 0], [0, 0, 1, 1, 1]], dtype=torch.bool
    )
    assert torch.equal(document_causal_mask(doc_ids)[0, 0], expected)


def test_cu_seqlens_from_doc_ids():
    doc_ids = torch.tensor([[0, 0, 0, 1, 1], [3, 3, 3, 3, 3], [0, 1, 2, 2, 2]])
    cu, max_len = cu_seqlens_from_doc_ids(doc_ids)
    assert cu.dtype == torch.int32
    assert cu.tolist() == [0, 3, 5, 10, 11, 12, 15]
    assert max_len == 5


def test_attention_dropout_is_active_only_in_training():
    model = make("sdpa", dropout=0.5, n_layers=1)
    idx, doc_ids = packed(rows=1)
    model.train()
    torch.manual_seed(0)
    a = model(idx, doc_ids)
    torch.manual_seed(1)
    b = model(idx, doc_ids)
    assert not torch.allclose(a, b)
    model.eval()
    assert torch.equal(model(idx, doc_ids), model(idx, doc_ids))


@pytest.mark.parametrize("attention", CPU_GRAD_BACKENDS)
@pytest.mark.parametrize("with_docs", [False, True])
def test_bf16_autocast_keeps_qkv_dtypes_consistent(attention, with_docs):
    """fp32 master weights under bf16 autocast (the trainer's mixed precision): q/k after QK-norm and RoPE must
    stay bf16 like v, and the result stays close to fp32."""
    model = make(attention, qk_norm=True, norm="layernorm")
    idx, doc_ids = packed()
    docs = doc_ids if with_docs else None
    window = torch.cat([idx, idx[:, :1]], dim=1)
    window_docs = torch.cat([doc_ids, doc_ids[:, -1:]], dim=1) if with_docs else None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = model(idx, docs)
        loss = model.loss(window, window_docs, chunk_size=7)
    loss.backward()
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.float(), model(idx, docs), atol=5e-2, rtol=5e-2)
    torch.testing.assert_close(loss, model.loss(window, window_docs), atol=5e-2, rtol=5e-2)


# ---------------------------------------------------------------------------------------------------------------
# KV-cache entry points: the new keys land at their positions, queries see the cache bottom-right aligned


def _cached_case(B=2, H=4, Hkv=2, T=3, span=9, hd=8, seed=0):
    """A cache with stale values in every slot, T new tokens per row at different positions per row."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, T, hd, generator=g)
    k_new, v_new = torch.randn(B, Hkv, T, hd, generator=g), torch.randn(B, Hkv, T, hd, generator=g)
    start = torch.tensor([span - T, 2])[:B]  # row 0 fills the cache, row 1 leaves stale slots after its tokens
    positions = start[:, None] + torch.arange(T)
    keys, values = torch.randn(B, Hkv, span, hd, generator=g), torch.randn(B, Hkv, span, hd, generator=g)
    return q, k_new, v_new, positions, keys, values


def _reference_cached(q, k_new, v_new, positions, keys, values):
    """Eager attention of row b over slots 0..position with the new keys written at their positions."""
    keys, values = keys.clone(), values.clone()
    out = torch.empty_like(q)
    eager = ATTENTION["eager"]()
    for b in range(q.shape[0]):
        keys[b][:, positions[b]] = k_new[b]
        values[b][:, positions[b]] = v_new[b]
        mask = torch.arange(keys.shape[2])[None, :] <= positions[b][:, None]  # (T, span)
        out[b] = eager.attend(q[b : b + 1], keys[b : b + 1], values[b : b + 1], mask, 0.0)[0]
    return out, keys, values


@pytest.mark.parametrize("attention", ["sdpa", "eager", "flex"])
@pytest.mark.parametrize("n_kv_heads,T", [(2, 1), (2, 3), (4, 1), (4, 3), (1, 2)])
def test_attend_cached_matches_the_reference(attention, n_kv_heads, T):
    from tokenmill.model.kv_cache import LayerKV

    q, k_new, v_new, positions, keys, values = _cached_case(Hkv=n_kv_heads, T=T)
    expected, expected_keys, expected_values = _reference_cached(q, k_new, v_new, positions, keys, values)
    backend = ATTENTION[attention]()
    rows = torch.arange(q.shape[0])[:, None]
    out = backend.attend_cached(
        q, k_new, v_new, LayerKV(keys, values, rows, positions), backend.prepare_cached(positions, keys.shape[2])
    )
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(keys, expected_keys) and torch.equal(values, expected_values)


def test_sdpa_is_causal_would_misalign_a_decode_query():
    """Why the cached path passes an explicit mask: SDPA's is_causal aligns top-left when Tq != Tk, so a
    one-token query sees only key 0 (pytorch/pytorch#108108)."""
    q, k, v = _qkv(B=1, T=6)
    q = q[:, :, -1:]
    top_left = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    everything = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    assert not torch.allclose(top_left, everything)
    torch.testing.assert_close(top_left, F.scaled_dot_product_attention(q, k[:, :, :1], v[:, :, :1], enable_gqa=True))


def test_flash_attn_refuses_shapes_and_inputs_it_cannot_run():
    from tokenmill.model.attention import FlashAttnBackend

    backend = object.__new__(FlashAttnBackend)  # the shape checks do not need the package installed
    with pytest.raises(UserError, match="head dims that are multiples of 8 up to 256, not 12"):
        backend.check(tiny(n_heads=4, head_dim=12))
    with pytest.raises(UserError, match="CUDA in fp16/bf16, not on cpu in float32"):
        FlashAttnBackend.check_inputs(torch.zeros(1, 1, 1, 8))
    backend.check(tiny(head_dim=64))


@pytest.mark.skipif(not HAS_FLASH_ATTN, reason="flash-attn is not installed")
@pytest.mark.gpu
@pytest.mark.parametrize("n_kv_heads,T", [(2, 1), (2, 3), (4, 1)])
def test_flash_attn_cached_decode_agrees_with_sdpa(n_kv_heads, T):
    from tokenmill.model.kv_cache import LayerKV

    case = [
        t.cuda().to(torch.bfloat16) if t.is_floating_point() else t.cuda()
        for t in _cached_case(Hkv=n_kv_heads, T=T, hd=64)
    ]
    q, k_new, v_new, positions, keys, values = case
    out = {}
    for name in ("sdpa", "flash_attn"):
        backend = ATTENTION[name]()
        kv = LayerKV(keys.clone(), values.clone(), torch.arange(q.shape[0], device="cuda")[:, None], positions)
        out[name] = (
            backend.attend_cached(q, k_new, v_new, kv, backend.prepare_cached(positions, keys.shape[2])),
            kv.keys,
        )
    torch.testing.assert_close(out["flash_attn"][0].float(), out["sdpa"][0].float(), atol=2e-2, rtol=2e-2)
    assert torch.equal(out["flash_attn"][1], out["sdpa"][1])
