"""Each speed/memory lever (SPEC M6, T4) trains like the plain path: activation checkpointing (all, every_k),
the chunked loss, fused vs foreach AdamW, bf16 autocast and torch.compile. Tiny fp32 runs without dropout;
every lever is also checked to be really in effect, so a lever that silently did nothing would fail.
"""

from __future__ import annotations

import pytest
import torch

from tokenmill.levers.activation_checkpointing import is_checkpointed
from tokenmill.parallel.engine import Engine
from tokenmill.train.loop import train
from train_helpers import checkpoint_contents, checkpoints, logged_curve, one_thread, tiny_config  # noqa: F401 (one_thread: autouse fixture)

STEPS = 5
PLAIN = ("model.dropout=0.0", "train.precision=fp32", "optim.fused=true")


class Run:
    """One tiny run: losses, (step, loss, grad norm, lr) per step, final weights, and the live engine/optimizer."""

    def __init__(self, out_dir, monkeypatch, *extra: str) -> None:
        import tokenmill.train.loop as train_module

        seen = {}
        real_fb, real_build = Engine.forward_backward, train_module.build_optimizer

        def forward_backward(engine, *args, **kwargs):
            seen.setdefault("engine", engine)
            return real_fb(engine, *args, **kwargs)

        def build_optimizer(*args, **kwargs):
            seen["optimizer"] = real_build(*args, **kwargs)
            return seen["optimizer"]

        with monkeypatch.context() as patch:
            patch.setattr(Engine, "forward_backward", forward_backward)
            patch.setattr(train_module, "build_optimizer", build_optimizer)
            result = train(tiny_config(out_dir, STEPS, *PLAIN, *extra))
        assert result.status == "completed"
        self.losses = result.losses
        self.curve = logged_curve(result.run_dir)
        self.weights, _ = checkpoint_contents(checkpoints(result.run_dir)[-1])
        self.engine, self.optimizer = seen["engine"], seen["optimizer"]

    def blocks(self) -> list[torch.nn.Module]:
        return list(self.engine.model.blocks)


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return Run(tmp_path_factory.mktemp("plain") / "run", patch)
        finally:
            torch.set_num_threads(threads)


def assert_trains_like(run: Run, ref: Run, rtol: float, atol: float) -> None:
    """Same per-step loss, pre-clip grad norm and lr, and the same final weights, within tolerance."""
    assert len(run.curve) == len(ref.curve) == STEPS
    assert [c[0] for c in run.curve] == [c[0] for c in ref.curve]
    torch.testing.assert_close(torch.tensor(run.losses), torch.tensor(ref.losses), rtol=rtol, atol=atol)
    torch.testing.assert_close(
        torch.tensor([c[2] for c in run.curve]), torch.tensor([c[2] for c in ref.curve]), rtol=rtol, atol=atol
    )
    assert [c[3] for c in run.curve] == [c[3] for c in ref.curve]
    assert set(run.weights) == set(ref.weights)
    for key in ref.weights:
        torch.testing.assert_close(run.weights[key], ref.weights[key], rtol=rtol, atol=atol, msg=key)


@pytest.mark.parametrize("mode, every, wrapped", [("all", 1, [True, True]), ("every_k", 2, [False, True])])
def test_activation_checkpointing_equals_plain(tmp_path, monkeypatch, plain, mode, every, wrapped):
    run = Run(tmp_path / "run", monkeypatch, f"train.activation_checkpointing={mode}", f"train.ac_every={every}")
    assert [is_checkpointed(b) for b in run.blocks()] == wrapped
    assert not any(is_checkpointed(b) for b in plain.blocks())
    assert_trains_like(run, plain, rtol=1e-6, atol=1e-7)  # recomputation repeats the same ops: exact in practice


def test_chunked_loss_equals_plain(tmp_path, monkeypatch, plain):
    import tokenmill.model.transformer as transformer

    chunks = []
    real_loss = transformer.Transformer.loss

    def loss(self, *args, **kwargs):
        chunks.append(kwargs.get("chunk_size"))
        return real_loss(self, *args, **kwargs)

    monkeypatch.setattr(transformer.Transformer, "loss", loss)
    run = Run(tmp_path / "run", monkeypatch, "train.loss_chunk_size=8")  # 4 chunks of each 32-token row
    assert chunks and set(chunks) == {8}
    assert_trains_like(run, plain, rtol=1e-5, atol=1e-6)


def test_fused_adamw_equals_foreach(tmp_path, monkeypatch):
    fused = Run(tmp_path / "fused", monkeypatch, "optim.name=adamw")  # the default recipe is Muon + AdamW
    run = Run(tmp_path / "run", monkeypatch, "optim.name=adamw", "optim.fused=false")
    assert fused.optimizer.defaults.get("fused") is True  # the reference run really used the fused CPU kernel
    assert not run.optimizer.defaults.get("fused") and run.optimizer.defaults.get("foreach") is True
    assert_trains_like(run, fused, rtol=1e-5, atol=1e-6)


def test_bf16_autocast_tracks_fp32(tmp_path, monkeypatch, plain):
    run = Run(tmp_path / "run", monkeypatch, "train.precision=bf16")
    assert run.losses != plain.losses  # autocast was really on
    assert all(w.dtype == torch.float32 for w in run.weights.values())  # fp32 master weights
    torch.testing.assert_close(torch.tensor(run.losses), torch.tensor(plain.losses), rtol=1e-2, atol=0)
    torch.testing.assert_close(
        torch.tensor([c[2] for c in run.curve]), torch.tensor([c[2] for c in plain.curve]), rtol=3e-2, atol=0
    )
    for key, ref in plain.weights.items():  # Adam's sign-like steps on tiny gradients differ: compare in norm
        drift = (run.weights[key] - ref).norm() / ref.norm()
        assert drift < 5e-2, (key, float(drift))


@pytest.mark.parametrize("scope", ["auto", pytest.param("blocks", marks=pytest.mark.slow)])
def test_torch_compile_equals_eager(tmp_path, monkeypatch, scope):
    """One tiny compiled run (one block: ~30 s of Inductor compile on a busy 2-core CPU; the cache is under tmp).
    `auto` compiles the whole loss as one graph in one process; `blocks` compiles each block in place."""
    from torch._dynamo.utils import counters

    one_block = ("model.n_layers=1", "eval.sample_prompts=[]")
    eager = Run(tmp_path / "eager", monkeypatch, *one_block)
    torch._dynamo.reset()
    counters.clear()
    compiled = Run(tmp_path / "compiled", monkeypatch, *one_block, "train.compile=true", f"train.compile_scope={scope}")
    assert counters["stats"]["unique_graphs"] >= 1  # Dynamo compiled something
    assert all((b._compiled_call_impl is not None) == (scope == "blocks") for b in compiled.blocks())
    assert not any(k.startswith("_orig_mod") or "._orig_mod." in k for k in compiled.weights)
    assert_trains_like(compiled, eager, rtol=1e-5, atol=1e-5)
