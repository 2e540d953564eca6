"""`train.fp8`: which layers are converted, checkpoints stay plain and interchangeable with non-FP8 runs, the
emulated FP8 forward/backward stays within FP8 tolerance of the plain model, FSDP2 FP8 all-gather keeps plain
state dicts, and the hardware gate refuses in one line before any file is touched.

No FP8 GPU here: torchao's `emulate=True` runs the FP8 casts and GEMMs in high precision on the CPU (eager).
"""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file, save_file

from dist_helpers import run_ranks
from tokenmill.cli import main
from tokenmill.config import load_config
from tokenmill.errors import UserError
from tokenmill.levers import fp8
from tokenmill.metrics.banner import fp8_line
from tokenmill.model import build_model
from tokenmill.train.config import FP8_MODE_NAMES
from tokenmill.train.loop import train
from train_helpers import checkpoint_contents, checkpoints, one_thread, tiny_config  # noqa: F401 (autouse fixture)

pytest.importorskip("torchao.float8", reason="torchao is not installed (pip install 'tokenmill[fp8]')")

# 2 layers, d=64, untied head, SwiGLU width 72: q/k/v/o (64 -> 64/32) are multiples of 16, the FFN's 72 is not
SHAPE = [
    "model.n_layers=2",
    "model.d_model=64",
    "model.n_heads=4",
    "model.n_kv_heads=2",
    "model.vocab_size=96",
    "model.tie_embeddings=false",
    "model.ffn_hidden=72",
    "model.dropout=0.0",
]
ATTENTION = [f"blocks.{i}.attn.{p}_proj" for i in range(2) for p in "qkvo"]


def model_cfg(*extra: str):
    return load_config(["tiny"], None, [*SHAPE, *extra]).model


def fresh_model(*extra: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(model_cfg(*extra))


def test_names_equal_the_config_choices():
    assert set(fp8.FP8_RECIPES) | {"off"} == set(FP8_MODE_NAMES)


@pytest.mark.parametrize("mode", ["tensorwise", "rowwise"])
def test_conversion_skips_the_head_and_dims_not_multiple_of_16(mode):
    from torchao.float8.float8_linear import Float8Linear

    model = fresh_model()
    converted = fp8.apply_fp8(model, mode, emulate=True)
    assert converted == ATTENTION  # gate/up (64 -> 72) and down (72 -> 64) skipped, head skipped
    float8 = sorted(name for name, m in model.named_modules() if isinstance(m, Float8Linear))
    assert float8 == sorted(ATTENTION)
    assert not isinstance(model.head, Float8Linear) and not isinstance(model.blocks[0].ffn.up_proj, Float8Linear)


def test_every_eligible_linear_converts_when_all_dims_divide():
    model = fresh_model("model.ffn_hidden=128")
    converted = fp8.apply_fp8(model, "tensorwise", emulate=True)
    ffn = [f"blocks.{i}.ffn.{p}_proj" for i in range(2) for p in ("gate", "up", "down")]
    assert sorted(converted) == sorted(ATTENTION + ffn)


def test_state_dict_keys_shapes_and_dtypes_unchanged_and_checkpoints_interchange(tmp_path):
    plain, converted = fresh_model(), fresh_model()
    fp8.apply_fp8(converted, "tensorwise", emulate=True)
    before, after = plain.state_dict(), converted.state_dict()
    assert list(after) == list(before)
    for key, value in before.items():
        assert type(after[key]) is torch.Tensor and after[key].shape == value.shape and after[key].dtype == value.dtype
    # an FP8 model's checkpoint loads into a plain one, and the other way round
    save_file({k: v.contiguous() for k, v in after.items()}, tmp_path / "fp8.safetensors")
    target = fresh_model("model.init_std=0.5")  # different weights, so loading must change them
    target.load_state_dict(load_file(tmp_path / "fp8.safetensors"))
    x = torch.randint(0, 96, (2, 9))
    torch.testing.assert_close(target(x), plain(x))
    back = fresh_model("model.init_std=0.5")
    fp8.apply_fp8(back, "tensorwise", emulate=True)
    back.load_state_dict(before)
    for key, value in back.state_dict().items():
        torch.testing.assert_close(value, before[key])


@pytest.mark.parametrize("mode", ["tensorwise", "rowwise"])
def test_emulated_forward_backward_within_fp8_tolerance(mode):
    plain = fresh_model("model.ffn_hidden=128")
    converted = copy.deepcopy(plain)
    fp8.apply_fp8(converted, mode, emulate=True)
    window = torch.randint(0, 96, (4, 33), generator=torch.Generator().manual_seed(3))
    losses = []
    for model in (plain, converted):
        loss = model.loss(window)
        loss.backward()
        losses.append(loss.detach())
    # e4m3 keeps 3 mantissa bits (relative step 2^-3 per element); averaged over the GEMMs the loss moves far less
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-2, atol=0)
    assert not torch.equal(losses[1], losses[0])  # FP8 really ran (emulated): not bit-identical
    for (name, p), q in zip(plain.named_parameters(), converted.parameters()):
        cosine = torch.nn.functional.cosine_similarity(p.grad.flatten(), q.grad.flatten(), dim=0)
        assert cosine > 0.99, (name, float(cosine))


def _fsdp_fp8_state_dict() -> dict:
    """One gloo rank: FSDP2 with FP8 all-gather; a step, the scale precompute, then the full state dict's types."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    dist.init_process_group("gloo")
    model = fresh_model("model.ffn_hidden=128")
    fp8.apply_fp8(model, "tensorwise", fsdp_all_gather=True, emulate=True)
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    register_fsdp_forward_method(model, "loss")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    window = torch.randint(0, 96, (2, 17), generator=torch.Generator().manual_seed(dist.get_rank()))
    model.loss(window).backward()
    optimizer.step()
    fp8.precompute_fp8_scales(model)
    loss = float(model.loss(window))
    local = {k: type(getattr(v, "_local_tensor", v)).__name__ for k, v in model.state_dict().items()}
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    return {
        "all_gather": fp8.uses_fp8_all_gather(model),
        "loss": loss,
        "local": local,
        "full": {k: (type(v).__name__, tuple(v.shape)) for k, v in full.items()},
    }


@pytest.mark.slow  # two spawned gloo ranks importing torch and torchao: about a minute on a busy 2-core machine
def test_fsdp_fp8_all_gather_trains_and_saves_plain_tensors():
    results = run_ranks(_fsdp_fp8_state_dict, 2, timeout=240)
    expected = {k: ("Tensor", tuple(v.shape)) for k, v in fresh_model("model.ffn_hidden=128").state_dict().items()}
    for result in results:
        assert result["all_gather"] and torch.isfinite(torch.tensor(result["loss"]))
        assert set(result["local"].values()) == {"Tensor"}  # shards are plain tensors, not torchao's wrapper
        assert result["full"] == expected


# ---- the trainer ----------------------------------------------------------------------------------------------


@pytest.fixture
def emulated_fp8(monkeypatch):
    """Pretend this CPU has FP8 hardware: the gate passes and torchao emulates (records converted layers)."""
    converted: list[list[str]] = []
    real_apply, real_config = fp8.apply_fp8, fp8.fp8_config
    monkeypatch.setattr(fp8, "check_fp8", lambda mode, device, compile=True: [])
    monkeypatch.setattr(
        fp8,
        "fp8_config",
        lambda mode, fsdp_all_gather=False, emulate=False: real_config(mode, fsdp_all_gather, emulate=True),
    )
    monkeypatch.setattr(fp8, "apply_fp8", lambda *a, **k: converted.append(real_apply(*a, **k)) or converted[-1])
    return converted


def test_fp8_run_resumes_without_fp8_and_back(tmp_path, emulated_fp8):
    run = tmp_path / "run"
    extra = ("model.tie_embeddings=false", "model.ffn_hidden=128", "model.dropout=0.0")
    first = train(tiny_config(run, 2, "train.fp8=tensorwise", *extra))
    assert first.status == "completed" and len(emulated_fp8[-1]) == 14  # 2 x (q, k, v, o, gate, up, down)
    fp8_weights, _ = checkpoint_contents(checkpoints(run)[-1])
    assert all(type(v) is torch.Tensor and v.dtype == torch.float32 for v in fp8_weights.values())
    second = train(tiny_config(run, 4, "train.fp8=off", *extra), resume=True)
    assert second.status == "completed" and second.state.step == 4
    plain_weights, _ = checkpoint_contents(checkpoints(run)[-1])
    assert {k: v.shape for k, v in plain_weights.items()} == {k: v.shape for k, v in fp8_weights.items()}
    third = train(tiny_config(run, 6, "train.fp8=rowwise", *extra), resume=True)
    assert third.status == "completed" and third.state.step == 6 and len(emulated_fp8[-1]) == 14


FSDP_RUN = (
    "model.tie_embeddings=false",
    "model.ffn_hidden=128",
    "model.dropout=0.0",
    "parallel.strategy=fsdp",
    "parallel.timeout_s=60",
)


def _fsdp_training(out: str, steps: int, mode: str) -> dict:
    """One of two gloo ranks: train() under FSDP2 (emulated FP8 all-gathered in FP8 unless mode=off, resumed if
    `out` holds a checkpoint); how often the FP8 scales were precomputed."""
    real_config, real_precompute = fp8.fp8_config, fp8.precompute_fp8_scales
    calls = []
    fp8.check_fp8 = lambda mode, device, compile=True: []
    fp8.fp8_config = lambda mode, fsdp_all_gather=False, emulate=False: real_config(mode, fsdp_all_gather, True)
    fp8.precompute_fp8_scales = lambda model: calls.append(1) or real_precompute(model)
    result = train(tiny_config(out, steps, f"train.fp8={mode}", *FSDP_RUN), resume=mode == "off")
    return {"status": result.status, "step": result.state.step, "precomputes": len(calls), "losses": result.losses}


@pytest.mark.slow  # two spawned gloo ranks, twice
def test_fsdp_fp8_run_precomputes_scales_each_step_and_resumes_without_fp8(tmp_path):
    run = str(tmp_path / "run")
    for mode, steps, precomputes in (("tensorwise", 2, 2), ("off", 3, 0)):
        results = run_ranks(_fsdp_training, 2, run, steps, mode, timeout=240)
        for result in results:
            assert result["status"] == "completed" and result["step"] == steps, mode
            assert result["precomputes"] == precomputes, mode  # once per optimizer step under FP8, never without
            assert all(torch.isfinite(torch.tensor(result["losses"])))
        assert results[0]["losses"] == results[1]["losses"]  # the job's loss, the same on both ranks


def test_fp8_refused_on_cpu_in_one_line_before_touching_files(tmp_path, capsys):
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
        "--train.fp8=tensorwise",
        "--overwrite",
    ]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: train.fp8=tensorwise needs an NVIDIA GPU")
    assert "compute capability >= 8.9" in err[0] and "train.fp8=off" in err[0]
    assert sorted(p.name for p in run_dir.iterdir()) == ["metrics.jsonl"]
    assert (run_dir / "metrics.jsonl").read_text() == '{"kind": "old"}\n'


def test_off_reads_as_off_from_the_command_line_and_yaml(tmp_path):
    """YAML 1.1 turns a bare `off` into False; a string field takes it back as "off"."""
    assert load_config(["tiny"], None, ["train.fp8=off"]).train.fp8 == "off"
    (tmp_path / "run.yaml").write_text("train:\n  fp8: off\n")
    assert load_config([], tmp_path / "run.yaml", []).train.fp8 == "off"


def test_unknown_mode_is_a_config_error():
    with pytest.raises(UserError, match="train.fp8"):
        load_config(["tiny"], None, ["train.fp8=e5m2"])


def test_check_warns_without_compile_on_an_fp8_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    cuda = torch.device("cuda")
    assert fp8.check_fp8("tensorwise", cuda, compile=True) == []
    [warning] = fp8.check_fp8("tensorwise", cuda, compile=False)
    assert "train.compile=true" in warning
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    with pytest.raises(UserError, match="A100.*8.0"):
        fp8.check_fp8("rowwise", cuda)


def test_banner_line_states_the_published_benefit():
    assert fp8_line("off") == "off"
    assert "1.17x" in fp8_line("tensorwise") and "published" in fp8_line("tensorwise")
    assert "0.90x" in fp8_line("rowwise")
