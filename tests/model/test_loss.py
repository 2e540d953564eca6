"""Next-token loss (SPEC M7): the label shift, a copying model cannot win, ignore_index, reductions, and the
chunked head + cross-entropy equals the plain path in values and gradients without building full logits."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from tokenmill.errors import UserError
from tokenmill.model import Transformer, build_model
from tokenmill.model.config import ModelConfig

V = 32


def make(seed: int = 0, **overrides) -> Transformer:
    base = dict(n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, vocab_size=V, max_seq_len=32, ffn_hidden=48)
    cfg = ModelConfig(**{**base, **overrides})
    cfg.validate()
    torch.manual_seed(seed)
    return build_model(cfg)


def windows(B: int = 3, T: int = 12, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, V, (B, T + 1), generator=torch.Generator().manual_seed(seed))


def test_loss_is_cross_entropy_of_logits_t_against_token_t_plus_1():
    model = make()
    window = windows()
    logits = model(window[:, :-1])  # (B, T, V)
    by_hand = torch.stack(
        [F.cross_entropy(logits[:, t], window[:, t + 1], reduction="none") for t in range(window.shape[1] - 1)]
    )  # (T, B)
    torch.testing.assert_close(model.loss(window), by_hand.mean(), atol=1e-6, rtol=1e-6)
    # and not against the same position (the seed 000 bug)
    unshifted = F.cross_entropy(logits.flatten(0, 1), window[:, :-1].flatten())
    assert not torch.allclose(model.loss(window), unshifted)


def copying_model() -> Transformer:
    """A real Transformer whose logits put almost all mass on its *input* token.

    Embeddings are 10 x one-hot (d_model = vocab), every residual projection is zero so blocks are the identity,
    the final RMSNorm maps a one-hot row to sqrt(d) x one-hot, and the tied head scores the input token
    sqrt(d) x 10 ~ 57 above every other token.
    """
    model = make(d_model=V, n_heads=4, n_kv_heads=0, tie_embeddings=True, position="none")
    with torch.no_grad():
        model.tok_emb.weight.copy_(10.0 * torch.eye(V))
        for block in model.blocks:
            block.attn.o_proj.weight.zero_()
            block.ffn.down_proj.weight.zero_()
    return model


def test_a_copying_model_does_not_get_a_low_loss():
    model = copying_model()
    window = windows(B=4, T=24)
    logits = model(window[:, :-1])
    assert torch.equal(logits.argmax(-1), window[:, :-1])  # it really copies its input
    loss = model.loss(window)
    # the buggy unshifted loss rewards copying with a near-zero loss ...
    buggy = F.cross_entropy(logits.flatten(0, 1), window[:, :-1].flatten())
    assert buggy < 1e-3
    # ... while the shifted loss is far above chance (ln V) on random data: copying is wrong almost everywhere
    assert loss > math.log(V) * 2
    # sanity: when the next token really is the current one, copying is right and the shifted loss is low
    repeated = torch.full((2, 10), 7)
    assert model.loss(repeated) < 1e-3


def test_ignore_index_drops_targets():
    model = make()
    window = windows()
    window[:, -1] = -100  # only ever a target (inputs are window[:, :-1])
    logits = model(window[:, :-1])
    keep = window[:, 1:] != -100
    by_hand = F.cross_entropy(logits[keep], window[:, 1:][keep])
    torch.testing.assert_close(model.loss(window), by_hand, atol=1e-6, rtol=1e-6)


def test_ignore_index_as_a_pad_token_id():
    model = make()
    pad = 0
    window = windows().clamp(min=1)
    window[0, 5:] = pad
    window[2, 9:] = pad
    logits = model(window[:, :-1])
    targets = window[:, 1:]
    keep = targets != pad
    by_hand = F.cross_entropy(logits[keep], targets[keep], reduction="sum")
    total = model.loss(window, ignore_index=pad, reduction="sum")
    torch.testing.assert_close(total, by_hand, atol=1e-5, rtol=1e-6)
    assert not torch.allclose(total, model.loss(window, reduction="sum"))


def test_reduction_sum_is_mean_times_token_count():
    model = make()
    window = windows()
    n_tokens = window[:, 1:].numel()
    torch.testing.assert_close(model.loss(window, reduction="sum"), model.loss(window) * n_tokens, atol=1e-4, rtol=1e-6)


def test_bad_reduction_is_a_user_error():
    with pytest.raises(UserError, match="reduction"):
        make().loss(windows(), reduction="none")


@pytest.mark.parametrize("chunk_size", [1, 5, 16, 1000])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("tied", [True, False])
def test_chunked_equals_plain_values_and_grads(chunk_size, reduction, tied):
    window = windows().clamp(min=1)
    window[1, -4:] = 0  # padding: ignored targets, so the mean's denominator matters
    results = []
    for chunk in (0, chunk_size):
        model = make(tie_embeddings=tied)
        loss = model.loss(window, ignore_index=0, chunk_size=chunk, reduction=reduction)
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (plain, g_plain), (chunked, g_chunked) = results
    torch.testing.assert_close(chunked, plain, atol=1e-5, rtol=1e-6)
    for name, g in g_plain.items():
        torch.testing.assert_close(g_chunked[name], g, atol=1e-6, rtol=1e-5, msg=name)


def test_chunked_with_doc_ids_equals_plain():
    window = windows(B=2, T=10)
    doc_ids = torch.tensor([[0] * 4 + [1] * 7, [0] * 11])
    model = make()
    torch.testing.assert_close(
        model.loss(window, doc_ids, chunk_size=3), model.loss(window, doc_ids), atol=1e-6, rtol=1e-6
    )


def test_chunked_never_builds_full_logits(monkeypatch):
    model = make(tie_embeddings=False)
    window = windows(B=3, T=12)
    shapes = []
    original = F.linear

    def spy(x, w, b=None):
        if w is model.head.weight:
            shapes.append(tuple(x.shape))
        return original(x, w, b)

    monkeypatch.setattr(F, "linear", spy)
    model.loss(window, chunk_size=5).backward()
    assert shapes, "the head was never called"
    assert max(s[0] for s in shapes) <= 5 and all(len(s) == 2 for s in shapes)
    shapes.clear()
    model.loss(window).backward()
    assert shapes == [(36, 32)]  # the plain path does build all B*T rows (the spy sees it)


def test_loss_backward_reaches_every_parameter():
    model = make(tie_embeddings=False)
    model.loss(windows(), chunk_size=4).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
