"""Per-step training metrics and the progress bar: what the loop reports at each log step.

Cost model: on ordinary steps the monitor only reads a clock and advances the progress bar. On a log
step it computes gradient statistics on the device and brings every device scalar to the host with
one stacked `.tolist()` - the single host-device sync it adds.

The loop calls, per optimizer step:
    monitor.step_start()
    ... forward/backward, unscale, clip (grad_norm = the pre-clip norm) ...
    monitor.before_optimizer_step(model)     # grad stats (+ parameter snapshot for update ratios)
    optimizer.step(); scheduler.step()
    monitor.after_optimizer_step(model)      # update/param ratios, progress bar
    if cadence.is_log_step(step): monitor.log_step(step, loss, grad_norm, lr, tokens_seen)
Which steps are log steps (and which also get per-layer statistics) is the loop's `Cadence`, shared with the
monitor, so the statistics queued before an optimizer step are always the ones logged after it.
Eval and checkpoints between steps are not step time; `with monitor.paused():` excludes work inside a step.
"""

from __future__ import annotations

import contextlib
import math
import os
import resource
import sys
import time
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from tokenmill.parallel.wrappers import canonical_name

if TYPE_CHECKING:
    from tokenmill.train.cadence import Cadence

# Every per-log-step metric; each train event carries all of them (None where not
# measurable: MFU and CUDA memory on a CPU, MFU on a GPU missing from the peak table).
STEP_METRICS = (
    "loss",
    "ppl",
    "lr",
    "step_time_s",
    "tokens_per_s",
    "mfu",
    "tflops",
    "mem_allocated_gib",
    "mem_peak_gib",
    "mem_reserved_gib",
    "grad_norm",
    "grad_mean",
    "grad_std",
    "tokens_seen",
    "eta_s",
)
GIB = 2**30
ETA_SMOOTHING = 0.3  # weight of the newest interval in the step-time average behind the ETA
MAX_PPL_LOSS = 50.0  # exp() beyond this overflows to inf without telling anything useful


def peak_tflops_for(spec: Any, precision: str) -> float | None:
    """The dense peak the MFU denominator uses for `precision` (bf16 peak for bf16/auto and fp8, as in
    metrics/flops.py; fp16 its own; fp32 the TF32 tensor-core peak when matmuls may use TF32)."""
    if spec is None:
        return None
    if precision == "fp16":
        return spec.fp16_tflops or None
    if precision == "fp32":
        tf32 = torch.backends.cuda.matmul.allow_tf32 and spec.tf32_tflops
        return (spec.tf32_tflops if tf32 else spec.fp32_tflops) or None
    return spec.bf16_tflops or None


def detect_peak_tflops(device: torch.device | str, precision: str) -> tuple[float | None, str | None]:
    """(peak TFLOPS per device, device name) from the GPU table; (None, name) on CPUs and unknown GPUs."""
    device = torch.device(device)
    if device.type != "cuda":
        return None, None
    from tokenmill.metrics.flops import lookup_gpu

    name = torch.cuda.get_device_name(device)
    return peak_tflops_for(lookup_gpu(name), precision), name


def memory_stats(device: torch.device | str) -> dict[str, float | None]:
    """CUDA allocator numbers (GiB; no sync) and this process's RSS (current and peak, GiB)."""
    device = torch.device(device)
    out: dict[str, float | None] = {"mem_allocated_gib": None, "mem_peak_gib": None, "mem_reserved_gib": None}
    if device.type == "cuda":
        out["mem_allocated_gib"] = torch.cuda.memory_allocated(device) / GIB
        out["mem_peak_gib"] = torch.cuda.max_memory_allocated(device) / GIB
        out["mem_reserved_gib"] = torch.cuda.memory_reserved(device) / GIB
    out["rss_gib"] = _rss_bytes() / GIB if _rss_bytes() else None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    out["rss_peak_gib"] = peak / (GIB if sys.platform == "darwin" else GIB / 1024)
    return out


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def group_of(name: str) -> str:
    """Per-layer grouping of a parameter name: `blocks.3.attn.q_proj.weight` -> `blocks.3`, `tok_emb.weight`
    -> `tok_emb`."""
    parts = canonical_name(name).split(".")
    return ".".join(parts[:2]) if parts[0] == "blocks" and len(parts) > 2 else parts[0]


class ProgressBar:
    """A rich progress bar with ETA; disabled off a terminal, off rank 0 or when log.progress_bar is false."""

    def __init__(self, total: int, start: int, enabled: bool, console: Any = None) -> None:
        self.progress = None
        if not enabled:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        from tokenmill.metrics.sinks import get_console

        console = console or get_console()
        if not console.is_terminal:
            return
        self.progress = Progress(
            TextColumn("[bold]train"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeRemainingColumn(),
            console=console,
            transient=False,
        )
        self.task = self.progress.add_task("train", total=total, completed=start, info="")
        self.progress.start()

    def advance(self) -> None:
        if self.progress is not None:
            self.progress.update(self.task, advance=1)

    def set_info(self, info: str) -> None:
        if self.progress is not None:
            self.progress.update(self.task, info=info)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


class StepMonitor:
    """Computes the STEP_METRICS at each log step and sends them to the sinks as a "train" event.

    `cfg` is the run Config, `plan` the BatchPlan (tokens_per_step, total_steps), `cadence` the loop's
    Cadence (log steps, per-layer steps), `dist` the DistInfo (device, world size). `peak_tflops` overrides
    the GPU table (tests; unusual hardware); `flops_per_token` overrides metrics.flops.
    """

    def __init__(
        self,
        cfg: Any,
        plan: Any,
        cadence: Cadence,
        counts: Mapping[str, int] | None = None,
        dist: Any = None,
        sinks: Any = None,
        start_step: int = 0,
        *,
        precision: str | None = None,
        peak_tflops: float | None | str = "auto",
        flops_per_token: float | None = None,
        console: Any = None,
    ) -> None:
        self.sinks = sinks
        self.counts = dict(counts or {})
        self.device = torch.device(getattr(dist, "device", "cpu"))
        self.world_size = getattr(dist, "world_size", 1)
        self.total_steps = plan.total_steps
        self.tokens_per_step = plan.tokens_per_step
        self.cadence = cadence
        precision = precision or _resolve_precision(cfg.train.precision, self.device)
        if peak_tflops == "auto":
            peak_tflops, _ = detect_peak_tflops(self.device, precision)
        self.peak_tflops = peak_tflops
        if flops_per_token is None and cfg.model.vocab_size > 0:
            from tokenmill.metrics.flops import flops_per_token as fpt

            flops_per_token = fpt(cfg.model, cfg.train.seq_len)
        self.flops_per_token = flops_per_token
        self.completed = start_step  # optimizer steps done
        self.progress = ProgressBar(
            self.total_steps, start_step, cfg.log.progress_bar and getattr(dist, "is_main", True), console
        )
        # interval state (reset at each log step)
        self._window_start: float | None = None
        self._busy = 0.0
        self._iterations = 0
        self._step_time_avg: float | None = None
        self._grad: dict[str, Any] | None = None
        self._snapshot: dict[str, list[torch.Tensor]] | None = None
        self._updates: dict[str, torch.Tensor] | None = None

    def is_log_step(self, step: int) -> bool:
        """The loop's rule (its Cadence): every log interval and at the last step."""
        return self.cadence.is_log_step(step)

    # ---- timing ----------------------------------------------------------------------------------------
    # Step time is the sum of step windows (step_start -> after_optimizer_step), so eval, checkpoints and
    # logging between steps never count; a skipped (non-finite) step's window closes at the next start.
    def step_start(self) -> None:
        """Mark the start of one optimizer step."""
        now = time.perf_counter()
        if self._window_start is not None:  # the previous step was skipped before its optimizer step
            self._busy += now - self._window_start
        self._window_start = now
        self._iterations += 1

    def _close_window(self) -> None:
        if self._window_start is not None:
            self._busy += time.perf_counter() - self._window_start
            self._window_start = None

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Time inside (e.g. an eval in the middle of a step) is not step time."""
        start = time.perf_counter()
        try:
            yield
        finally:
            if self._window_start is not None:
                self._busy -= time.perf_counter() - start

    # ---- gradients and updates -------------------------------------------------------------------------
    def before_optimizer_step(self, model: nn.Module) -> None:
        """On a log step: queue gradient statistics (device ops, no sync) and snapshot parameters."""
        if not self.is_log_step(self.completed + 1):
            return
        named = [(n, p) for n, p in model.named_parameters() if p.grad is not None]
        if not named:
            return
        grads = [_local(p.grad) for _, p in named]
        norms = torch.stack(torch._foreach_norm(grads)).float()  # (P,)
        sums = torch.stack([g.sum(dtype=torch.float32) for g in grads])  # (P,)
        numel = sum(g.numel() for g in grads)
        stats = torch.stack([sums.sum(), norms.square().sum()])
        # FSDP shards: totals are sums over ranks. (Per-layer norms and update ratios stay local to the shard.)
        if any(_is_dtensor(p.grad) for _, p in named):
            import torch.distributed as tdist

            stats = stats.clone()
            tdist.all_reduce(stats)
            numel_t = torch.tensor([float(numel)], device=stats.device)
            tdist.all_reduce(numel_t)
            numel = int(numel_t.item())  # (host sync, log steps only, sharded runs only)
        self._grad = {"stats": stats, "numel": numel}
        if self.cadence.is_per_layer_step(self.completed + 1):
            groups: dict[str, list[int]] = {}
            for i, (name, _) in enumerate(named):
                groups.setdefault(group_of(name), []).append(i)
            sq = norms.square()
            self._grad["groups"] = {g: sq[idx].sum() for g, idx in groups.items()}
            self._snapshot = {}
            for name, param in named:
                self._snapshot.setdefault(group_of(name), []).append(_local(param.detach()).clone())

    def after_optimizer_step(self, model: nn.Module) -> None:
        """Count the step, advance the progress bar; on a log step queue update/param ratios."""
        self.completed += 1
        if self.is_log_step(self.completed) and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # host sync (log steps only): queued GPU work counts as step time
        self._close_window()
        if self._snapshot is not None:
            named = [(n, p) for n, p in model.named_parameters() if p.grad is not None]
            olds = {g: iter(v) for g, v in self._snapshot.items()}
            delta: dict[str, torch.Tensor] = {}
            base: dict[str, torch.Tensor] = {}
            for name, param in named:
                group = group_of(name)
                old = next(olds[group])
                new = _local(param.detach())
                delta[group] = delta.get(group, 0) + (new.float() - old.float()).square().sum()
                base[group] = base.get(group, 0) + old.float().square().sum()
            self._updates = {g: (delta[g] / base[g].clamp_min(1e-30)).sqrt() for g in delta}
            self._snapshot = None
        self.progress.advance()

    # ---- the log step ----------------------------------------------------------------------------------
    def log_step(
        self,
        step: int,
        loss: float | torch.Tensor,
        grad_norm: float | torch.Tensor | None = None,
        lr: float | None = None,
        tokens_seen: int | None = None,
        **extra: Any,
    ) -> dict[str, Any]:
        """Assemble the STEP_METRICS for `step`, send them to the sinks ("train") and return them.

        `grad_norm` is the pre-clip global norm (clip_grad_norm_'s return value); extra keyword values
        (e.g. skipped=3) are logged as given.
        """
        device_values = [_as_tensor(loss), _as_tensor(grad_norm)]
        grad, updates = self._grad, self._updates or {}
        if grad is not None:
            device_values += [grad["stats"][0], grad["stats"][1]]
            device_values += list(grad.get("groups", {}).values()) + list(updates.values())
        on_device = [v.detach().float().reshape(()) for v in device_values if isinstance(v, torch.Tensor)]
        host = iter(
            torch.stack([v.to(on_device[0].device) for v in on_device]).tolist() if on_device else []
        )  # the one host-device sync of a log step
        loss_v = next(host) if isinstance(device_values[0], torch.Tensor) else _maybe_float(loss)
        norm_v = next(host) if isinstance(device_values[1], torch.Tensor) else _maybe_float(grad_norm)

        metrics: dict[str, Any] = {"loss": loss_v, "ppl": _ppl(loss_v), "lr": lr}
        metrics.update(self._throughput(step))
        metrics.update(memory_stats(self.device))
        metrics["grad_norm"], metrics["grad_mean"], metrics["grad_std"] = norm_v, None, None
        if grad is not None:
            grad_sum, post_sq = next(host), next(host)
            # Clipping scales every gradient by one factor c = post/pre: undo it so mean/std are pre-clip too.
            scale = norm_v / math.sqrt(post_sq) if norm_v and post_sq > 0 else 1.0
            n = grad["numel"]
            mean = grad_sum / n
            var = max(post_sq / n - mean * mean, 0.0)
            metrics["grad_mean"], metrics["grad_std"] = mean * scale, math.sqrt(var) * scale
            for group in grad.get("groups", {}):
                metrics[f"grad_norm/{group}"] = math.sqrt(max(next(host), 0.0)) * scale
            for group in updates:
                metrics[f"update_ratio/{group}"] = next(host)
        metrics["tokens_seen"] = tokens_seen
        metrics["total_steps"] = self.total_steps
        metrics.update(extra)
        self._grad, self._updates = None, None
        if loss_v is not None:
            self.progress.set_info(f"loss {loss_v:.4f}")
        if self.sinks is not None:
            self.sinks.log(step, metrics, kind="train")
        return metrics

    def _throughput(self, step: int) -> dict[str, float | None]:
        self._close_window()
        out: dict[str, float | None] = dict.fromkeys(("step_time_s", "tokens_per_s", "mfu", "tflops", "eta_s"))
        if self._iterations:
            elapsed = max(self._busy, 1e-9)
            step_time = elapsed / self._iterations
            tokens_per_s = self.tokens_per_step / step_time  # global: all ranks
            self._step_time_avg = (
                step_time
                if self._step_time_avg is None
                else (ETA_SMOOTHING * step_time + (1 - ETA_SMOOTHING) * self._step_time_avg)
            )
            out.update(
                step_time_s=step_time,
                tokens_per_s=tokens_per_s,
                eta_s=max(self.total_steps - step, 0) * self._step_time_avg,
            )
            if self.flops_per_token:
                out["tflops"] = tokens_per_s * self.flops_per_token / self.world_size / 1e12  # per device
                if self.peak_tflops:
                    from tokenmill.metrics.flops import mfu

                    out["mfu"] = mfu(tokens_per_s, self.flops_per_token, self.peak_tflops, self.world_size)
        self._busy, self._iterations = 0.0, 0
        return out

    def close(self) -> None:
        self.progress.close()


def _resolve_precision(name: str, device: torch.device) -> str:
    from tokenmill.train.precision import resolve_precision

    return resolve_precision(name, device)


def _is_dtensor(t: Any) -> bool:
    return type(t).__name__ == "DTensor"


def _local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of an FSDP2 DTensor (else the tensor itself)."""
    return t.to_local() if _is_dtensor(t) else t


def _as_tensor(value: Any) -> Any:
    return value if isinstance(value, torch.Tensor) else None


def _maybe_float(value: Any) -> float | None:
    return None if value is None else float(value)


def _ppl(loss: float | None) -> float | None:
    if loss is None or not math.isfinite(loss):
        return None
    return math.exp(min(loss, MAX_PPL_LOSS))
