"""`train.loss_impl`: every implementation that runs here equals the plain cross-entropy in value and gradient
(with and without ignored targets); the GPU-only ones refuse in one line; `auto` resolves as documented; the
trainer really uses the chosen loss for training and never for evaluation; the memory plan counts each one."""

from __future__ import annotations

import functools
import json

import pytest
import torch
import torch.nn.functional as F

from tokenmill.cli import main
from tokenmill.config import load_config
from tokenmill.errors import UserError
from tokenmill.levers import fused_loss
from tokenmill.levers.fused_loss import (
    DEFAULT_CHUNK_TOKENS,
    LOSS_IMPLS,
    LossImpl,
    cce_head_loss,
    check_loss_impl,
    resolve_loss_impl,
    select_loss_fn,
)
from tokenmill.metrics.estimate import estimate
from tokenmill.metrics.flops import GPUS
from tokenmill.metrics.memory import MODES, loss_bytes
from tokenmill.model import build_model
from tokenmill.train.config import LOSS_IMPL_NAMES
from tokenmill.train.loop import train
from train_helpers import one_thread, tiny_config  # noqa: F401 (one_thread: autouse fixture)

CPU, CUDA = torch.device("cpu"), torch.device("cuda")  # a device object only: nothing is allocated on it
HAS_CCE = fused_loss.is_installed("cut_cross_entropy")
IGNORED_TOKEN = 7  # a real token id used as ignore_index: it still embeds as an input, its targets carry no loss


def test_names_equal_the_config_choices():
    assert set(LOSS_IMPLS) | {"auto"} == set(LOSS_IMPL_NAMES)


def tiny_model():
    cfg = load_config(
        ["tiny"],
        None,
        [
            "model.n_layers=2",
            "model.d_model=64",
            "model.n_heads=4",
            "model.n_kv_heads=2",
            "model.vocab_size=96",
            "model.dropout=0.0",
        ],
    )
    torch.manual_seed(0)
    return build_model(cfg.model)


def window(seed: int = 1, batch: int = 3, length: int = 21) -> torch.Tensor:
    """(B, T+1) token ids; with IGNORED_TOKEN among the targets so a mask has something to drop."""
    tokens = torch.randint(0, 96, (batch, length), generator=torch.Generator().manual_seed(seed))
    tokens[:, 3::5] = IGNORED_TOKEN
    return tokens


def loss_and_grads(model, fn, tokens, ignore_index: int, reduction: str):
    model.zero_grad(set_to_none=True)
    loss = fn(model, tokens, ignore_index, reduction)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def reference(model, tokens, ignore_index, reduction):
    """Plain F.cross_entropy on full logits: the definition every implementation must meet."""
    logits = model(tokens[:, :-1])  # (B, T, V)
    return F.cross_entropy(
        logits.flatten(0, 1).float(), tokens[:, 1:].flatten(), ignore_index=ignore_index, reduction=reduction
    )


def through_model(head_loss=None, chunk_size=0):
    return lambda model, tokens, ignore_index, reduction: model.loss(
        tokens, ignore_index=ignore_index, reduction=reduction, chunk_size=chunk_size, head_loss=head_loss
    )


def plain_head_loss(h, weight, targets, ignore_index, reduction):
    return F.cross_entropy(F.linear(h, weight).float(), targets, ignore_index=ignore_index, reduction=reduction)


RUNNABLE = {
    "torch": through_model(),
    "chunked": through_model(chunk_size=16),
    "cce-torch_compile": through_model(functools.partial(cce_head_loss, kernel="torch_compile")),
}
REDUCTIONS = pytest.mark.parametrize("reduction", ["mean", "sum"])
MASKS = pytest.mark.parametrize("ignore_index", [-100, IGNORED_TOKEN], ids=["no-mask", "mask"])


@REDUCTIONS
@MASKS
@pytest.mark.parametrize("impl", ["torch", "chunked"])
def test_value_and_gradients_equal_the_reference(impl, ignore_index, reduction):
    check_against_reference(impl, ignore_index, reduction)


@pytest.mark.slow  # torch.compile of cut cross-entropy's pure-PyTorch kernel: ~20-50 s per reduction on 1 thread
@REDUCTIONS
@MASKS
def test_cut_cross_entropy_torch_compile_kernel_equals_the_reference(ignore_index, reduction):
    if not HAS_CCE:
        pytest.skip("cut-cross-entropy is not installed (pip install 'tokenmill[kernels]')")
    check_against_reference("cce-torch_compile", ignore_index, reduction)


def check_against_reference(impl: str, ignore_index: int, reduction: str) -> None:
    model, tokens = tiny_model(), window()
    expected, expected_grads = loss_and_grads(model, reference, tokens, ignore_index, reduction)
    loss, grads = loss_and_grads(model, RUNNABLE[impl], tokens, ignore_index, reduction)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)
    for name, grad in expected_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    if ignore_index == IGNORED_TOKEN:  # the mask really drops targets: the unmasked loss differs
        unmasked = reference(model, tokens, -100, reduction).detach()
        assert not torch.allclose(unmasked, expected)


def test_selected_loss_sums_over_tokens_for_every_runnable_impl():
    model, tokens = tiny_model(), window()
    expected = reference(model, tokens, -100, "sum")
    for name in ("torch", "chunked", "auto"):
        got = select_loss_fn(name, CPU, chunk_size=8)(model, {"tokens": tokens})
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4)


def test_every_selected_loss_hands_masked_targets_to_the_model(monkeypatch):
    """A batch's "targets" (prompt or padding positions set to ignore_index) reach model.loss unchanged."""

    class Recorder(torch.nn.Module):
        def loss(self, tokens, doc_ids=None, **kwargs):
            self.seen = kwargs
            return tokens.sum()

    monkeypatch.setitem(LOSS_IMPLS, "cce", LossImpl(head_loss=plain_head_loss))  # a fused entry that runs here
    model, tokens = Recorder(), window()
    targets = tokens[:, 1:].clone()
    targets[:, :4] = -100
    for name, chunk in (("torch", 0), ("chunked", 8), ("cce", 0)):
        select_loss_fn(name, CPU, chunk_size=chunk)(model, {"tokens": tokens, "targets": targets})
        assert model.seen["targets"] is targets and model.seen["reduction"] == "sum", name
        assert model.seen.get("chunk_size", 0) == chunk and (model.seen.get("head_loss") is not None) == (name == "cce")


@pytest.mark.parametrize("impl", ["liger", "cce"])
def test_gpu_kernels_refuse_on_cpu_in_one_line(impl):
    with pytest.raises(UserError) as err:
        select_loss_fn(impl, CPU)
    message = str(err.value)
    assert "\n" not in message and f"train.loss_impl={impl}" in message and "CUDA" in message
    assert "chunked" in message  # says what to use instead


@pytest.mark.parametrize("impl", ["liger", "cce"])
def test_missing_kernel_package_names_the_pip_install(impl, monkeypatch):
    monkeypatch.setattr(fused_loss, "is_installed", lambda package: False)
    with pytest.raises(UserError) as err:
        check_loss_impl(impl, CUDA)
    assert "\n" not in str(err.value) and "pip install 'tokenmill[kernels]'" in str(err.value)
    assert LOSS_IMPLS[impl].pip_name in str(err.value)


def test_auto_probes_a_kernel_before_choosing_it(monkeypatch):
    probe = fused_loss.kernel_works.__wrapped__  # uncached
    monkeypatch.setitem(LOSS_IMPLS, "cce", LossImpl(head_loss=plain_head_loss))
    assert probe("cce", CPU)

    def broken(*args):
        raise RuntimeError("0 active drivers ([]). There should only be one.")

    monkeypatch.setitem(LOSS_IMPLS, "cce", LossImpl(head_loss=broken))
    with pytest.warns(UserWarning, match="cce fails on cpu .*0 active drivers"):
        assert not probe("cce", CPU)
    monkeypatch.setitem(LOSS_IMPLS, "cce", LossImpl(head_loss=lambda *args: 1.5 * plain_head_loss(*args)))
    with pytest.warns(UserWarning, match="cce disagrees with the plain loss"):
        assert not probe("cce", CPU)


def test_fused_kernels_need_a_single_pipeline_stage(monkeypatch):
    monkeypatch.setattr(fused_loss, "is_installed", lambda package: True)
    with pytest.raises(UserError, match="parallel.pp=1"):
        check_loss_impl("cce", CUDA, pp=2)
    assert resolve_loss_impl("auto", CUDA, pp=2) == "torch"


def test_auto_resolution(monkeypatch):
    assert resolve_loss_impl("auto", CPU) == "torch"
    assert resolve_loss_impl("auto", CPU, chunk_size=512) == "chunked"
    assert resolve_loss_impl("liger", CPU) == "liger"  # explicit names are kept (and checked elsewhere)
    for installed, working, expected in [
        ({"cut_cross_entropy", "liger_kernel"}, {"cce", "liger"}, "cce"),
        ({"liger_kernel"}, {"cce", "liger"}, "liger"),
        ({"cut_cross_entropy", "liger_kernel"}, {"liger"}, "liger"),  # cce installed but failing its probe
        ({"cut_cross_entropy"}, set(), "torch"),
        (set(), {"cce", "liger"}, "torch"),
    ]:
        monkeypatch.setattr(fused_loss, "is_installed", lambda package, have=installed: package in have)
        monkeypatch.setattr(fused_loss, "kernel_works", lambda name, device, ok=working: name in ok)
        assert resolve_loss_impl("auto", CUDA) == expected


def test_torch_with_a_chunk_size_is_a_config_error():
    with pytest.raises(UserError, match="train.loss_chunk_size"):
        load_config(["tiny"], None, ["train.loss_impl=torch", "train.loss_chunk_size=64"])


def test_cli_refuses_a_gpu_kernel_on_cpu_before_touching_files(tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text('{"kind": "old"}\n')
    args = [
        "train",
        "--preset",
        "tiny",
        "--train.device=cpu",
        "--data.tokenizer=byte",
        "--train.max_steps=1",
        f"--train.out_dir={run_dir}",
        "--train.loss_impl=liger",
    ]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: train.loss_impl=liger") and "Traceback" not in err[0]
    assert sorted(p.name for p in run_dir.iterdir()) == ["metrics.jsonl"]
    assert (run_dir / "metrics.jsonl").read_text() == '{"kind": "old"}\n'


# ---- the trainer uses the chosen loss for training, the model's own for evaluation ---------------------------


def test_training_runs_the_chosen_head_loss_and_evaluation_does_not(tmp_path, monkeypatch):
    """A plain-PyTorch spy stands in for the cce kernel, allowed on the CPU for this test."""
    calls = []

    def spy(*args):
        calls.append(torch.is_grad_enabled())
        return plain_head_loss(*args)

    monkeypatch.setitem(LOSS_IMPLS, "cce", LossImpl(head_loss=spy))
    steps = 3
    fused = train(tiny_config(tmp_path / "cce", steps, "train.loss_impl=cce", "eval.interval_steps=2"))
    plain = train(tiny_config(tmp_path / "torch", steps, "train.loss_impl=torch", "eval.interval_steps=2"))
    assert fused.status == plain.status == "completed"
    assert calls == [True] * steps  # one micro-step per step, all with gradients: none from the evaluations
    assert fused.losses == pytest.approx(plain.losses, rel=1e-5)
    assert fused.last_eval["loss"] == pytest.approx(plain.last_eval["loss"], rel=1e-5)


# ---- memory ---------------------------------------------------------------------------------------------------


def test_loss_bytes_per_impl():
    cfg = load_config(["gpt2-124m"], None, []).model
    bf16, n, v, d = MODES["bf16-mixed"], 4 * 1024, cfg.vocab_size, cfg.d_model
    assert loss_bytes(cfg, bf16, n, "torch") == {"logits": 4 * n * v, "loss_backward": 8 * n * v}
    assert loss_bytes(cfg, bf16, n, "chunked", 1024) == {"logits": 4 * 1024 * v, "loss_backward": 8 * 1024 * v}
    assert loss_bytes(cfg, bf16, n, "cce") == {"logits": 4 * n, "loss_backward": 0}
    # Liger: ceil(50257 / 768) = 66 chunks -> next_pow2(ceil(4096 / 66) = 63) = 64 tokens of logits at a time
    assert loss_bytes(cfg, bf16, n, "liger") == {"logits": 64 * v * 2, "loss_backward": n * d * 2 + v * d * 4}


def test_estimate_plans_the_configured_loss_and_lists_every_impl(capsys):
    gpu = GPUS["H100 SXM"]
    by_impl = estimate(load_config(["gpt2-124m"], None, []), gpu, micro_batch=8)["loss"]["by_impl"]
    assert set(by_impl) == set(LOSS_IMPLS)
    assert by_impl["cce"]["total"] < by_impl["liger"]["total"] < by_impl["chunked"]["total"] < by_impl["torch"]["total"]
    plans = {}
    for impl in ("torch", "chunked", "liger", "cce", "auto"):
        report = estimate(load_config(["gpt2-124m"], None, [f"train.loss_impl={impl}"]), gpu, micro_batch=8)
        acts = report["memory"]["plan"]["bf16-mixed"]["activations"]["none"]
        plans[impl] = (report["loss"]["impl"], acts["logits"] + acts["loss_backward"], report["max_micro_batch"])
    for impl in ("torch", "chunked", "liger", "cce"):
        assert plans[impl][0] == impl and plans[impl][1] == by_impl[impl]["total"]
    assert plans["auto"][0] == "torch"  # planned portably: the same on every machine
    assert plans["chunked"][1] == by_impl["chunked"]["total"] == 12 * DEFAULT_CHUNK_TOKENS * 50257
    assert plans["cce"][2]["bf16-mixed"]["none"] > plans["torch"][2]["bf16-mixed"]["none"]  # less loss memory
    assert main(["estimate", "--preset", "gpt2-124m", "--json", "--train.loss_impl=cce"]) == 0
    assert json.loads(capsys.readouterr().out)["loss"]["impl"] == "cce"
