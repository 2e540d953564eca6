"""The recipe's model options: ReLU^2 FFN activation (maps to HF GPT-2 "relu2"), logit soft-capping (refused at
HF export), z-loss (training only), and that every loss path agrees with them."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tokenmill.errors import ConfigError, UserError
from tokenmill.model import build_model
from tokenmill.model.config import ModelConfig
from tokenmill.model.ffn import ACTIVATIONS

V = 48


def make(**overrides):
    base = dict(n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, vocab_size=V, max_seq_len=32, ffn_hidden=48)
    cfg = ModelConfig(**{**base, **overrides})
    cfg.validate()
    torch.manual_seed(0)
    return build_model(cfg)


def windows(B: int = 3, T: int = 12) -> torch.Tensor:
    return torch.randint(0, V, (B, T + 1), generator=torch.Generator().manual_seed(1))


def test_relu2_is_relu_squared():
    x = torch.tensor([-2.0, -0.5, 0.0, 0.5, 3.0])
    assert torch.equal(ACTIVATIONS["relu2"](x), torch.tensor([0.0, 0.0, 0.0, 0.25, 9.0]))


def test_softcap_bounds_logits_and_the_loss_uses_them():
    model = make(logit_softcap=2.0)
    window = windows()
    logits = model(window[:, :-1])
    assert logits.abs().max() < 2.0
    with torch.no_grad():  # scale the head so uncapped logits would exceed the cap
        model.tok_emb.weight.mul_(10)
    logits = model(window[:, :-1])
    assert 1.9 < logits.abs().max() <= 2.0  # tanh saturates to the cap in fp32
    expected = F.cross_entropy(logits.flatten(0, 1), window[:, 1:].flatten())
    torch.testing.assert_close(model.loss(window), expected)
    uncapped = make()
    uncapped.load_state_dict(model.state_dict())
    assert uncapped(window[:, :-1]).abs().max() > 2.0


def test_z_loss_adds_the_squared_log_normaliser():
    window = windows()
    plain, with_z = make(), make(z_loss=1e-2)
    logits = plain(window[:, :-1]).flatten(0, 1)
    z = torch.logsumexp(logits, dim=-1).square().mean()
    torch.testing.assert_close(with_z.loss(window), plain.loss(window) + 1e-2 * z)
    torch.testing.assert_close(with_z(window[:, :-1]), plain(window[:, :-1]))  # inference is unchanged


@pytest.mark.parametrize("options", [{"logit_softcap": 3.0}, {"z_loss": 1e-3}, {"logit_softcap": 3.0, "z_loss": 1e-3}])
def test_chunked_loss_equals_plain_with_softcap_and_z_loss(options):
    window = windows()
    targets = window[:, 1:].clone()
    targets[0, :4] = -100  # ignored targets carry no z-loss either
    a, b = make(**options), make(**options)
    plain = a.loss(window, targets=targets, reduction="sum")
    chunked = b.loss(window, targets=targets, reduction="sum", chunk_size=7)
    torch.testing.assert_close(chunked, plain)
    plain.backward()
    chunked.backward()
    for (name, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pb.grad, pa.grad, msg=name)


def test_fused_head_loss_refuses_softcap():
    model = make(logit_softcap=3.0)
    with pytest.raises(UserError, match="train.loss_impl=chunked"):
        model.loss(windows(), head_loss=lambda *args: torch.zeros(()))


def test_bad_values_are_config_errors():
    for key in ("logit_softcap", "z_loss"):
        with pytest.raises(ConfigError, match=f"model.{key}"):
            make(**{key: -1.0})


def test_hf_export_maps_relu2_and_refuses_softcap():
    pytest.importorskip("transformers")
    from tokenmill.interop.hf import check_exportable, from_hf, to_hf

    gpt2 = dict(norm="layernorm", position="learned", ffn="mlp", activation="relu2", bias=True, n_kv_heads=4)
    ours = make(**gpt2, ffn_hidden=0)
    theirs = to_hf(ours)
    assert theirs.config.activation_function == "relu2"
    idx = windows()[:, :-1]
    with torch.no_grad():
        torch.testing.assert_close(theirs(idx).logits, ours(idx), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(from_hf(theirs)(idx), ours(idx), atol=1e-5, rtol=1e-5)
    with pytest.raises(UserError, match="logit_softcap"):
        check_exportable(make(logit_softcap=30.0).cfg)
    assert check_exportable(make(z_loss=1e-4).cfg) == "llama"  # training-only: nothing to export
