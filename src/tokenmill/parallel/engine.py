"""The training step under any strategy: wrap the model in the one documented order, run micro-steps,
clip over the whole job, and hand out state for checkpoints.

Wrapper order (`apply_parallelism`; model code stays single-device, parallelism is applied from outside), the
same as torchtitan's TP -> AC -> compile -> FSDP with TP absent and the pipeline split in front (torchtitan's
`pipeline_llm` splits first, then parallelises each stage):

  1. pipeline split  - cut `model.blocks` into this rank's stage modules (parallel.pp > 1);
     then FP8 (train.fp8) - swap the blocks' linear layers for torchao's Float8Linear, before AC, compile and
     FSDP2 as torchtitan converts them; with tensorwise under FSDP2 the weights are all-gathered in FP8 and
     their scales recomputed after each optimizer step (a step post-hook on the optimizer);
  2. activation checkpointing - wrap blocks, so the recomputed region is exactly one block;
  3. torch.compile, scope chosen by tokenmill.levers.compile (`train.compile_scope`): per block (FSDP2, pipeline
     stages, activation checkpointing, FP8, fused losses) in place (`Module.compile`), so the state-dict keys
     carry no `_orig_mod.`; compiled before FSDP so FSDP's hooks stay outside the graphs and each block's
     all-gather / reduce-scatter overlaps the neighbouring block's compute. Otherwise the whole loss function
     becomes one graph after wrapping (a function, not the module, is compiled: the keys stay plain);
  4. FSDP2 `fully_shard` per block then the root, or DDP around the loss.
  For DDP and ZeRO-1 the whole-model compile wraps the DDP module, as the PyTorch DDP documentation recommends:
  `torch.compile(DDP(m))` lets TorchDynamo's DDPOptimizer (torch/_dynamo/backends/distributed.py) split graphs
  at gradient-bucket boundaries so the all-reduce of one bucket overlaps the backward of the next.

The micro-step function is chosen once, when the engine is built (torchtitan's trainer separates its
`forward_backward_step` and `pp_forward_backward_step` the same way):
  - `_plain_step`: one process, or FSDP2 (which all-gathers around `model.loss`, registered as a forward method);
  - `_ddp_step`: DDP / ZeRO-1 synchronise only what runs through DDP's `forward`, so the loss runs inside a small
    `LossForward` module;
  - `_pipeline_step`: the schedule drives the stages; the last stage computes the summed cross-entropy.
The loss itself is the `loss_fn` slot: by default what `train.loss_impl` selects (tokenmill.levers.fused_loss: plain,
chunked or a fused head + cross-entropy kernel), or a policy loss. Every micro-step divides its summed loss by the
optimizer step's global count of valid targets (`loss_denominator`), so masked tokens weigh nothing and DDP/FSDP's
gradient average is the per-token mean.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from tokenmill.errors import UserError
from tokenmill.levers import fp8
from tokenmill.levers.activation_checkpointing import apply_activation_checkpointing
from tokenmill.levers.compile import compile_blocks, compile_loss, resolve_compile_scope
from tokenmill.levers.fused_loss import resolve_loss_impl, select_loss_fn
from tokenmill.levers.loss import IGNORE_INDEX, Batch, LossFn, count_valid_targets
from tokenmill.parallel.data_parallel import (
    allreduce_grads,
    apply_ddp,
    apply_fsdp,
    apply_zero1,
    full_optimizer_state,
    materialize,
    no_sync_context,
)
from tokenmill.parallel.dist import DistInfo, all_reduce
from tokenmill.parallel.global_ops import clip_grad_norm_, loss_denominator
from tokenmill.parallel.pipeline import (
    PipelineParts,
    build_schedule,
    check_microbatches,
    check_pipeline_config,
    split_model,
    summed_ce,
)

if TYPE_CHECKING:
    from tokenmill.config import Config
    from tokenmill.train.precision import Precision

SHARDED_STRATEGIES = ("fsdp",)  # strategies whose model/optimizer state is saved with DCP (so is any pp > 1)
MicroStep = Callable[[dict[str, torch.Tensor], torch.amp.GradScaler, torch.Tensor | float, bool], torch.Tensor]


class LossForward(nn.Module):
    """forward(batch) = loss_fn(model, batch): routes the loss through DDP's forward (DDP syncs only that)."""

    def __init__(self, model: nn.Module, loss_fn: LossFn) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.loss_fn(self.model, batch)


class LocalView(nn.Module):
    """This pp-rank's parameters under the full model's names (tok_emb, blocks.{i}, norm, head).

    The optimizer, the gradient norm and DCP checkpoints see this module; it shares the stage modules'
    parameters. It is never called; `loss()` runs a forward-only pipeline pass for evaluation.
    """

    def __init__(self, parts: PipelineParts, eval_loss: Callable[..., torch.Tensor]) -> None:
        super().__init__()
        self._eval_loss = eval_loss
        self.blocks = nn.ModuleDict()
        for stage in parts.stages:
            for name in ("tok_emb", "pos_emb", "norm", "head"):
                if getattr(stage, name, None) is not None:
                    self.add_module(name, getattr(stage, name))
            for key, block in stage.blocks.items():
                self.blocks[key] = block
        self.cfg = parts.stages[0].cfg

    def loss(
        self,
        window: torch.Tensor,
        doc_ids: torch.Tensor | None = None,
        ignore_index: int = IGNORE_INDEX,
        chunk_size: int = 0,
        reduction: str = "mean",
        targets: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Forward-only loss through the pipeline (for evaluation; every pp-rank gets the value).

        Causal only: `doc_ids` do not cross stages and are ignored (see pipeline.py).
        """
        return self._eval_loss(window, reduction, targets)


def _is_meta(module: nn.Module) -> bool:
    return any(p.is_meta for p in module.parameters())


def build_mesh(dist: DistInfo, pp: int) -> Any:
    """DeviceMesh ("dp", "pp") over the job (rank = dp_index * pp + pp_index), or None in one process."""
    if not dist.distributed:
        if pp > 1:
            raise UserError(f"parallel.pp={pp} needs {pp} processes: launch with torchrun --nproc-per-node={pp}")
        return None
    if dist.world_size % pp:
        raise UserError(
            f"parallel.pp={pp} does not divide the {dist.world_size} processes; launch a multiple of "
            f"{pp} processes (torchrun --nproc-per-node) or change parallel.pp"
        )
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(dist.device.type, (dist.world_size // pp, pp), mesh_dim_names=("dp", "pp"))


class Engine:
    """One rank's training mechanics for `cfg.parallel` (single, ddp, zero1, fsdp; any pp).

    Public attributes: `model` (the plain model - or, under pipeline parallelism, this rank's local view -
    that eval, monitors, the optimizer and checkpoints use), `dp_rank` / `dp_size` (what the data loader and
    batch plan use), `sharded` (checkpoint with DCP), `pipeline` (PipelineParts or None), `loss_fn`.
    `loss_fn` defaults to the loss `train.loss_impl` selects; pipeline stages always end in the plain
    summed cross-entropy of their logits, so a custom one needs parallel.pp=1.
    """

    def __init__(
        self, model: nn.Module, cfg: Config, dist: DistInfo, precision: Precision, loss_fn: LossFn | None = None
    ) -> None:
        self.cfg, self.dist, self.precision = cfg, dist, precision
        pcfg = cfg.parallel
        if pcfg.pp > 1 and pcfg.strategy == "zero1":
            raise UserError(
                "parallel.strategy=zero1 cannot be combined with parallel.pp > 1 (its optimizer state "
                "cannot be saved per stage); use parallel.strategy=ddp or fsdp with pipeline stages"
            )
        if pcfg.pp > 1 and loss_fn is not None:
            raise UserError(
                "a custom loss function needs parallel.pp=1: pipeline stages end in the plain "
                "cross-entropy of their logits"
            )
        for warning in fp8.check_fp8(cfg.train.fp8, dist.device, cfg.train.compile):
            warnings.warn(warning, stacklevel=2)
        self.loss_fn: LossFn = loss_fn or select_loss_fn(
            cfg.train.loss_impl, dist.device, cfg.train.loss_chunk_size, pcfg.pp
        )
        # the model's own torch / chunked loss (not a fused kernel or a caller's loss) may compile as one graph
        self._plain_loss = loss_fn is None and resolve_loss_impl(
            cfg.train.loss_impl, dist.device, cfg.train.loss_chunk_size, pcfg.pp
        ) in ("torch", "chunked")
        self._train_loss: LossFn = self.loss_fn  # what the plain micro-step calls: loss_fn, or it compiled whole
        self.strategy = pcfg.strategy if dist.distributed else "single"
        self.mesh = build_mesh(dist, pcfg.pp)
        self.pp = pcfg.pp
        self.dp_size = dist.world_size // pcfg.pp
        self.dp_rank = dist.rank // pcfg.pp
        self.pp_rank = dist.rank % pcfg.pp
        if self.dp_size > 1 and self.strategy == "single":
            raise UserError(
                f"parallel.strategy=single with {dist.world_size} processes would train "
                f"{self.dp_size} independent copies; set parallel.strategy=ddp, zero1 or fsdp"
            )
        self.sharded = self.strategy in SHARDED_STRATEGIES or self.pp > 1
        self.pipeline: PipelineParts | None = None
        self._schedule: Any = None
        self._ddp_module: nn.Module | None = None
        self._stage_dp_group: Any = None
        self._dp_group = self.mesh["dp"].get_group() if self.mesh is not None else None
        self._pp_group = self.mesh["pp"].get_group() if self.mesh is not None and self.pp > 1 else None
        self._denominator: torch.Tensor | float = 1.0  # read by the pipeline's loss callback
        self._scaler: torch.amp.GradScaler | None = None
        self.model: nn.Module = self.apply_parallelism(model)
        self._micro_step: MicroStep = self._choose_micro_step()

    def _choose_micro_step(self) -> MicroStep:
        """The micro-step of this layout, decided once after wrapping (see the module docstring)."""
        if self.pipeline is not None:
            return self._pipeline_step
        if self._ddp_module is not None:
            return self._ddp_step
        return self._plain_step

    # ---- wrapping ------------------------------------------------------------------------------------

    def _materialize(self, model: nn.Module, modules: list[nn.Module], wrapped: bool) -> None:
        """Allocate and initialise a model built on `meta`, at the one point of wrapping its layout allows.

        Called before wrapping (`wrapped=False`) and after it (`wrapped=True`); acts on one of the two:

        | layout                         | parallel.init=full            | parallel.init=sharded                 |
        |--------------------------------|-------------------------------|---------------------------------------|
        | one process, ddp, zero1 (pp=1) | whole model, before wrapping  | whole model, before wrapping          |
        | fsdp (pp=1)                    | whole model, before wrapping  | after fully_shard: this rank's shards |
        | pipeline (pp > 1)              | whole model, before the split | after the split: this rank's stages   |

        "Whole model" starts every layout from the weights one process would have (equality tests rely on
        it); "sharded" lets a model too big for one device start without ever existing whole. A model that
        is not on meta is left alone.
        """
        whole_first = self.cfg.parallel.init == "full" or (self.strategy != "fsdp" and self.pp == 1)
        if wrapped == whole_first:
            return
        if self.pipeline is None:
            materialize(model, self.dist.device)
        elif any(_is_meta(m) for m in modules):
            for m in modules:
                m.to_empty(device=self.dist.device)
            with torch.no_grad():
                model.init_weights()  # parameters of other ranks' stages are still on meta: no-ops there

    def apply_parallelism(self, model: nn.Module) -> nn.Module:
        """Pipeline split -> AC -> compile -> FSDP2 / DDP (see the module docstring); returns `self.model`."""
        cfg, dist = self.cfg, self.dist
        tcfg = cfg.train
        self._materialize(model, [model], wrapped=False)
        # 1. pipeline split
        modules: list[nn.Module] = [model]
        if self.pp > 1:
            check_pipeline_config(cfg)
            n_micro = check_microbatches(
                tcfg.micro_batch_size, self.pp, cfg.parallel.pp_schedule, cfg.parallel.pp_microbatch_scale
            )
            self.pipeline = split_model(model, self.pp, self.pp_rank, cfg.parallel.pp_schedule)
            self.pipeline.n_microbatches = n_micro
            modules = list(self.pipeline.stages)
        # 1b. FP8 linear layers
        for m in modules:
            fp8.apply_fp8(m, tcfg.fp8, fsdp_all_gather=self.strategy == "fsdp")
        # 2. activation checkpointing
        for m in modules:
            apply_activation_checkpointing(m, tcfg.activation_checkpointing, tcfg.ac_every)
        # 3. compile: each block here (before FSDP), or the whole step below (train.compile_scope)
        ddp_like = self.strategy in ("ddp", "zero1")
        scope = resolve_compile_scope(
            tcfg.compile,
            tcfg.compile_scope,
            strategy=self.strategy,
            pp=self.pp,
            activation_checkpointing=tcfg.activation_checkpointing,
            fp8=tcfg.fp8,
            plain_loss=self._plain_loss,
        )
        if scope.blocks:
            for m in modules:
                compile_blocks(m.blocks.values() if isinstance(m.blocks, nn.ModuleDict) else m.blocks)
        # 4. data parallel over the "dp" mesh dimension
        dp_mesh = self.mesh["dp"] if self.mesh is not None else None
        if self.strategy == "fsdp":
            from torch.distributed.fsdp import register_fsdp_forward_method

            for m in modules:
                apply_fsdp(m, cfg.parallel, mesh=dp_mesh)
            if self.pp == 1:
                register_fsdp_forward_method(model, "loss")
        self._materialize(model, modules, wrapped=True)
        if self.pipeline is not None:
            # DDP over stages: gradients are averaged by allreduce_grads after the last micro-step
            self._stage_dp_group = self._dp_group if ddp_like and self.dp_size > 1 else None
            self._schedule = build_schedule(
                self.pipeline,
                self.pipeline.n_microbatches,
                dist.device,
                self._pp_group,
                self._pipeline_loss,
                modules=modules,
            )
            return LocalView(self.pipeline, self._pipeline_eval_loss)
        if ddp_like:
            ddp: nn.Module = apply_ddp(LossForward(model, self.loss_fn), dist)
            self._ddp_module = torch.compile(ddp) if scope.step else ddp
        elif scope.step:
            self._train_loss = compile_loss(self.loss_fn)
        return model

    # ---- optimizer -----------------------------------------------------------------------------------

    def build_optimizer(self, build: Callable[[nn.Module], torch.optim.Optimizer]) -> torch.optim.Optimizer:
        """The optimizer over this rank's parameters; ZeRO-1 re-creates it with sharded state."""
        optimizer = build(self.model)
        if self.strategy == "zero1" and self.dp_size > 1:
            optimizer = apply_zero1(optimizer, self.dist, process_group=self._dp_group)
        if self.cfg.train.fp8 != "off" and fp8.uses_fp8_all_gather(self.model):
            optimizer.register_step_post_hook(lambda *_: fp8.precompute_fp8_scales(self.model))
        return optimizer

    def optimizer_state_dict(self, optimizer: torch.optim.Optimizer) -> dict[str, Any] | None:
        """Full optimizer state in the plain torch format (a collective under ZeRO-1; None off rank 0 there)."""
        return full_optimizer_state(optimizer, self.dist)

    # ---- micro-steps ---------------------------------------------------------------------------------

    def loss_denominator(self, micro_batches: Sequence[Batch]) -> torch.Tensor:
        """What every micro-step of one optimizer step divides its summed loss by (a float32 device tensor).

        The valid targets of all `micro_batches` of this rank, summed over the data-parallel ranks (one
        all-reduce per step; counted on the host-side batches, so no device sync), divided by the
        data-parallel size, because DDP/FSDP average gradients over those ranks (see global_ops).
        """
        local = torch.stack([count_valid_targets(b).to("cpu") for b in micro_batches]).sum()
        if self.dp_size == 1:
            return local.to(self.dist.device, torch.float32)
        return loss_denominator(local, self.dist, self.dp_size, group=self._dp_group).float()

    def forward_backward(
        self, batch: Batch, scaler: torch.amp.GradScaler, denominator: torch.Tensor | float, sync: bool
    ) -> torch.Tensor:
        """Summed token loss of one micro-batch / `denominator`, back-propagated; returns it detached.

        `denominator` is `loss_denominator(...)` of the step's micro-batches. Gradients are synchronised over
        the data-parallel ranks only when `sync` (the step's last micro-step). Under pipeline parallelism every
        pp-rank returns the same value (the last stage's, summed over its microbatches, shared over the pp group).
        """
        return self._micro_step(self._on_device(batch), scaler, denominator, sync)

    def _on_device(self, batch: Batch) -> dict[str, torch.Tensor]:
        """The micro-batch on this rank's device, with its targets (a view of the tokens unless the data masks)."""
        device = self.dist.device
        out = {"tokens": batch["tokens"].to(device, non_blocking=True)}
        out["targets"] = batch["targets"].to(device, non_blocking=True) if "targets" in batch else out["tokens"][:, 1:]
        if self.cfg.train.document_masking and "doc_ids" in batch:
            out["doc_ids"] = batch["doc_ids"].to(device, non_blocking=True)
        for key, value in batch.items():  # what a custom loss_fn needs besides tokens (e.g. RL advantages)
            if key not in out and key != "doc_ids":
                out[key] = value.to(device, non_blocking=True)
        return out

    def _plain_step(
        self,
        batch: dict[str, torch.Tensor],
        scaler: torch.amp.GradScaler,
        denominator: torch.Tensor | float,
        sync: bool,
    ) -> torch.Tensor:
        """One process, or FSDP2: `loss_fn` calls the model directly (FSDP skips its reduce-scatter unless `sync`)."""
        with no_sync_context(self.model, sync):
            with self.precision.autocast():
                loss = self._train_loss(self.model, batch) / denominator
            scaler.scale(loss).backward()
        return loss.detach()

    def _ddp_step(
        self,
        batch: dict[str, torch.Tensor],
        scaler: torch.amp.GradScaler,
        denominator: torch.Tensor | float,
        sync: bool,
    ) -> torch.Tensor:
        """DDP / ZeRO-1: the loss runs inside DDP's forward (`LossForward`), which all-reduces only when `sync`."""
        with no_sync_context(self._ddp_module, sync):
            with self.precision.autocast():
                loss = self._ddp_module(batch) / denominator
            scaler.scale(loss).backward()
        return loss.detach()

    def _pipeline_loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        loss = summed_ce(logits, targets) / self._denominator
        return self._scaler.scale(loss) if self._scaler is not None else loss

    def _pipeline_step(
        self,
        batch: dict[str, torch.Tensor],
        scaler: torch.amp.GradScaler,
        denominator: torch.Tensor | float,
        sync: bool,
    ) -> torch.Tensor:
        """The schedule runs every pipeline microbatch; FSDP stages reduce-scatter at its end, DDP-style stages
        all-reduce once here after the step's last micro-step."""
        parts = self.pipeline
        self._denominator, self._scaler = denominator, scaler
        inputs = batch["tokens"][:, :-1]
        losses: list[torch.Tensor] = []
        args = (inputs,) if parts.has_first else ()
        with self.precision.autocast():
            self._schedule.step(
                *args, target=batch["targets"] if parts.has_last else None, losses=losses, return_outputs=False
            )
        total = torch.zeros((), device=self.dist.device, dtype=torch.float32)
        if parts.has_last:
            total = torch.stack([loss.detach().float() for loss in losses]).sum()
            if scaler is not None and scaler.is_enabled():
                total = total / scaler.get_scale()
        all_reduce(total, "sum", group=self._pp_group)
        if sync and self._stage_dp_group is not None:
            allreduce_grads(list(self.model.parameters()), self._stage_dp_group, self.dp_size)
        return total

    @torch.no_grad()
    def _pipeline_eval_loss(
        self, window: torch.Tensor, reduction: str = "mean", targets: torch.Tensor | None = None
    ) -> torch.Tensor:
        parts = self.pipeline
        self._denominator, self._scaler = 1.0, None
        tokens = window.to(self.dist.device)
        inputs = tokens[:, :-1]
        targets = tokens[:, 1:] if targets is None else targets.to(self.dist.device)
        losses: list[torch.Tensor] = []
        self._schedule.eval(
            *((inputs,) if parts.has_first else ()), target=targets if parts.has_last else None, losses=losses
        )
        total = torch.zeros((), device=self.dist.device, dtype=torch.float32)
        if parts.has_last:
            total = torch.stack([loss.float() for loss in losses]).sum()
        all_reduce(total, "sum", group=self._pp_group)
        return total if reduction == "sum" else total / (targets != IGNORE_INDEX).sum()

    def inference_model(self) -> nn.Module | None:
        """A plain, whole model for generation on rank 0 (None on other ranks); a collective when sharded.

        FSDP shards and pipeline stages cannot run on one rank alone, so their full weights are gathered
        to rank 0 and loaded into a fresh model there (host memory for one copy of the weights). An FP8 model
        is copied into a plain one too: generation's one-row matmuls do not fit FP8 GEMMs.
        """
        if not self.sharded:
            if self.cfg.train.fp8 == "off":
                return self.model
            from tokenmill.model import build_model

            model = build_model(self.cfg.model, device=self.dist.device)
            model.load_state_dict(self.model.state_dict())
            return model
        import torch.distributed as tdist
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        from tokenmill.model import build_model

        # full tensors on every rank of a stage (cpu_offload would keep them on global rank 0 only)
        local = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True))
        parts: list[Any] = [None] * self.dist.world_size if self.dist.is_main else None
        tdist.gather_object({k: v.cpu() for k, v in local.items()} if self.dp_rank == 0 else {}, parts, dst=0)
        if not self.dist.is_main:
            return None
        full = {k: v for part in parts for k, v in part.items()}
        model = build_model(self.cfg.model, device=self.dist.device)
        model.load_state_dict(full)
        return model

    # ---- clip ----------------------------------------------------------------------------------------

    def clip_grad_norm(self, max_norm: float) -> torch.Tensor:
        """Pre-clip gradient norm over the whole model (all shards and stages); clips when max_norm > 0."""
        return clip_grad_norm_(self.model, max_norm, pp_group=self._pp_group)


def build_engine(
    model: nn.Module, cfg: Config, dist: DistInfo, precision: Precision, loss_fn: LossFn | None = None
) -> Engine:
    return Engine(model, cfg, dist, precision, loss_fn)
