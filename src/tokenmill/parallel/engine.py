"""The training step under any strategy: wrap the model in the one documented order, run micro-steps,
clip over the whole job, and hand out state for checkpoints.

Wrapper order (`apply_parallelism`, STYLE rule 1), the same as torchtitan's TP -> AC -> compile -> FSDP
with TP absent and the pipeline split in front (torchtitan's `pipeline_llm` splits first, then
parallelises each stage; research/user_needs.md item 19):

  1. pipeline split  - cut `model.blocks` into this rank's stage modules (parallel.pp > 1);
  2. activation checkpointing - wrap blocks, so the recomputed region is exactly one block;
  3. torch.compile per block (single, fsdp, pipeline) - in place (`Module.compile`), so the state-dict keys
     carry no `_orig_mod.`; compiled before FSDP so FSDP's hooks stay outside the graphs and each block's
     all-gather / reduce-scatter overlaps the neighbouring block's compute;
  4. FSDP2 `fully_shard` per block then the root, or DDP around the loss.
  For DDP and ZeRO-1 the compile comes *after* wrapping instead, as the PyTorch DDP docs recommend
  (SPEC P1): `torch.compile(DDP(m))` lets TorchDynamo's DDPOptimizer split graphs at gradient-bucket
  boundaries so the all-reduce of one bucket overlaps the backward of the next.

DDP only synchronises what runs through its `forward`, so under DDP the loss is computed by a small
`LossForward` module (forward = model.loss(reduction="sum")); FSDP2 is told the same with
`register_fsdp_forward_method(model, "loss")`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn

from tokenmill.errors import UserError
from tokenmill.levers.activation_checkpointing import apply_activation_checkpointing
from tokenmill.parallel.data_parallel import (allreduce_grads, apply_ddp, apply_fsdp, apply_zero1, full_optimizer_state,
                                              materialize, no_sync_context)
from tokenmill.parallel.dist import DistInfo, all_reduce
from tokenmill.parallel.global_ops import clip_grad_norm_
from tokenmill.parallel.pipeline import (PipelineParts, build_schedule, check_microbatches, check_pipeline_config,
                                         split_model, summed_ce)

SHARDED_STRATEGIES = ("fsdp",)  # strategies whose model/optimizer state is saved with DCP (so is any pp > 1)


class LossForward(nn.Module):
    """forward(tokens, doc_ids) = model.loss(..., reduction="sum"): routes the loss through DDP's forward."""

    def __init__(self, model: nn.Module, chunk_size: int = 0) -> None:
        super().__init__()
        self.model = model
        self.chunk_size = chunk_size

    def forward(self, tokens: torch.Tensor, doc_ids: torch.Tensor | None = None) -> torch.Tensor:
        return self.model.loss(tokens, doc_ids, chunk_size=self.chunk_size, reduction="sum")


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

    def loss(self, window: torch.Tensor, doc_ids: torch.Tensor | None = None, ignore_index: int = -100,
             chunk_size: int = 0, reduction: str = "mean") -> torch.Tensor:
        """Forward-only loss through the pipeline (for evaluation; every pp-rank gets the value).

        Causal only: `doc_ids` do not cross stages and are ignored (see pipeline.py).
        """
        return self._eval_loss(window, reduction)


def _is_meta(module: nn.Module) -> bool:
    return any(p.is_meta for p in module.parameters())


def build_mesh(dist: DistInfo, pp: int) -> Any:
    """DeviceMesh ("dp", "pp") over the job (rank = dp_index * pp + pp_index), or None in one process."""
    if not dist.distributed:
        if pp > 1:
            raise UserError(f"parallel.pp={pp} needs {pp} processes: launch with torchrun --nproc-per-node={pp}")
        return None
    if dist.world_size % pp:
        raise UserError(f"parallel.pp={pp} does not divide the {dist.world_size} processes; launch a multiple of "
                        f"{pp} processes (torchrun --nproc-per-node) or change parallel.pp")
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(dist.device.type, (dist.world_size // pp, pp), mesh_dim_names=("dp", "pp"))


class Engine:
    """One rank's training mechanics for `cfg.parallel` (single, ddp, zero1, fsdp; any pp).

    Public attributes: `model` (what eval and monitors call; the plain model, or the local view under
    pipeline parallelism), `unwrapped` (the same, for saving), `dp_rank` / `dp_size` (what the data loader
    and batch plan use), `sharded` (checkpoint with DCP), `pipeline` (PipelineParts or None).
    """

    def __init__(self, model: nn.Module, cfg: Any, dist: DistInfo, precision: Any) -> None:
        self.cfg, self.dist, self.precision = cfg, dist, precision
        pcfg = cfg.parallel
        if pcfg.pp > 1 and pcfg.strategy == "zero1":
            raise UserError("parallel.strategy=zero1 cannot be combined with parallel.pp > 1 (its optimizer state "
                            "cannot be saved per stage); use parallel.strategy=ddp or fsdp with pipeline stages")
        self.strategy = pcfg.strategy if dist.distributed else "single"
        self.mesh = build_mesh(dist, pcfg.pp)
        self.pp = pcfg.pp
        self.dp_size = dist.world_size // pcfg.pp
        self.dp_rank = dist.rank // pcfg.pp
        self.pp_rank = dist.rank % pcfg.pp
        if self.dp_size > 1 and self.strategy == "single":
            raise UserError(f"parallel.strategy=single with {dist.world_size} processes would train "
                            f"{self.dp_size} independent copies; set parallel.strategy=ddp, zero1 or fsdp")
        self.sharded = self.strategy in SHARDED_STRATEGIES or self.pp > 1
        self.pipeline: PipelineParts | None = None
        self.schedule = None
        self._denominator = 1.0
        self._scaler: Any = None
        self._stage_dp_group: Any = None
        self.train_module = self.apply_parallelism(model)

    # ---- wrapping ------------------------------------------------------------------------------------

    def apply_parallelism(self, model: nn.Module) -> nn.Module:
        """Pipeline split -> AC -> compile -> FSDP2 / DDP (see the module docstring); returns what to call."""
        cfg, dist = self.cfg, self.dist
        tcfg = cfg.train
        # 0. a meta-built model is initialised whole on this rank's device (parallel.init=full): every layout
        #    then starts from the weights one process would have. init=sharded defers it to after step 4.
        if _is_meta(model) and (cfg.parallel.init == "full" or (self.strategy != "fsdp" and self.pp == 1)):
            materialize(model, dist.device)
        # 1. pipeline split
        modules: list[nn.Module] = [model]
        if self.pp > 1:
            check_pipeline_config(cfg)
            n_micro = check_microbatches(tcfg.micro_batch_size, self.pp, cfg.parallel.pp_schedule,
                                         cfg.parallel.pp_microbatch_scale)
            self.pipeline = split_model(model, self.pp, self.pp_rank, cfg.parallel.pp_schedule)
            self.pipeline.n_microbatches = n_micro
            modules = list(self.pipeline.stages)
        # 2. activation checkpointing
        for m in modules:
            apply_activation_checkpointing(m, tcfg.activation_checkpointing, tcfg.ac_every)
        # 3. compile per block (all but DDP/ZeRO-1 without pipeline, which compile after wrapping)
        ddp_like = self.strategy in ("ddp", "zero1")
        if tcfg.compile and not (ddp_like and self.pp == 1):
            for m in modules:
                for block in m.blocks.values() if isinstance(m.blocks, nn.ModuleDict) else m.blocks:
                    block.compile()
        # 4. data parallel over the "dp" mesh dimension
        dp_mesh = self.mesh["dp"] if self.mesh is not None else None
        if self.strategy == "fsdp":
            from torch.distributed.fsdp import register_fsdp_forward_method

            for m in modules:
                apply_fsdp(m, cfg.parallel, mesh=dp_mesh)
            if self.pp == 1:
                register_fsdp_forward_method(model, "loss")
        # init=sharded: allocate and initialise only this rank's shards / stages, after sharding
        if self.pipeline is not None and any(_is_meta(m) for m in modules):
            for m in modules:
                m.to_empty(device=dist.device)
            with torch.no_grad():
                model.init_weights()  # parameters of other ranks' stages are still on meta: no-ops there
        elif self.pipeline is None:
            materialize(model, dist.device)
        self.model = LocalView(self.pipeline, self._pipeline_eval_loss) if self.pipeline else model
        self.unwrapped = self.model
        if self.pipeline:
            # DDP over stages: gradients are averaged by allreduce_grads after the last micro-step
            self._stage_dp_group = dp_mesh.get_group() if ddp_like and self.dp_size > 1 else None
            pp_group = self.mesh["pp"].get_group()
            self.schedule = build_schedule(self.pipeline, self.pipeline.n_microbatches, dist.device, pp_group,
                                           self._pipeline_loss, modules=modules)
            return None  # the stages are driven by the schedule (the full model is no longer referenced)
        if ddp_like:
            train_module: nn.Module = apply_ddp(LossForward(model, tcfg.loss_chunk_size), dist)
            if tcfg.compile:
                train_module = torch.compile(train_module)
            return train_module
        return model

    # ---- optimizer -----------------------------------------------------------------------------------

    def build_optimizer(self, build: Callable[[nn.Module], torch.optim.Optimizer]) -> torch.optim.Optimizer:
        """The optimizer over this rank's parameters; ZeRO-1 re-creates it with sharded state."""
        optimizer = build(self.unwrapped)
        if self.strategy == "zero1" and self.dp_size > 1:
            optimizer = apply_zero1(optimizer, self.dist, process_group=self.mesh["dp"].get_group())
        return optimizer

    def optimizer_state_dict(self, optimizer: torch.optim.Optimizer) -> dict[str, Any] | None:
        """Full optimizer state in the plain torch format (a collective under ZeRO-1; None off rank 0 there)."""
        return full_optimizer_state(optimizer, self.dist)

    # ---- micro-step ----------------------------------------------------------------------------------

    def sync_context(self, sync: bool) -> contextlib.AbstractContextManager:
        """Gradient sync only on the last accumulation micro-step.

        Pipeline stages: FSDP reduce-scatters at the end of every schedule step (the schedule forces it),
        DDP-style stages all-reduce once after the last micro-step (forward_backward does it).
        """
        if self.pipeline is not None:
            return contextlib.nullcontext()
        return no_sync_context(self.train_module, sync)

    def forward_backward(self, batch: dict[str, torch.Tensor], scaler: Any, denominator: float,
                         sync: bool) -> torch.Tensor:
        """Summed token loss of one micro-batch / `denominator`, back-propagated; returns it detached.

        `denominator` is the step's token count per data-parallel rank (global tokens / dp size, see
        global_ops.loss_denominator): DDP/FSDP then average gradients into the per-token mean over the job.
        Under pipeline parallelism every pp-rank returns the same value (the last stage's, summed over its
        microbatches and shared over the pp group).
        """
        device = self.dist.device
        tokens = batch["tokens"].to(device, non_blocking=True)
        if self.pipeline is not None:
            loss = self._pipeline_step(tokens, scaler, denominator)
            if sync and self._stage_dp_group is not None:
                allreduce_grads(list(self.unwrapped.parameters()), self._stage_dp_group, self.dp_size)
            return loss
        use_docs = getattr(self.cfg.train, "document_masking", False)
        doc_ids = batch["doc_ids"].to(device, non_blocking=True) if use_docs and "doc_ids" in batch else None
        with self.sync_context(sync):
            with self.precision.autocast():
                if self.train_module is self.model:
                    loss = self.model.loss(tokens, doc_ids, chunk_size=self.cfg.train.loss_chunk_size,
                                           reduction="sum")
                else:
                    loss = self.train_module(tokens, doc_ids)
                loss = loss / denominator
            scaler.scale(loss).backward()
        return loss.detach()

    def _pipeline_loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        loss = summed_ce(logits, targets) / self._denominator
        return self._scaler.scale(loss) if self._scaler is not None else loss

    def _pipeline_step(self, tokens: torch.Tensor, scaler: Any, denominator: float) -> torch.Tensor:
        parts = self.pipeline
        self._denominator, self._scaler = denominator, scaler
        inputs, targets = tokens[:, :-1], tokens[:, 1:]
        losses: list[torch.Tensor] = []
        args = (inputs,) if parts.has_first else ()
        with self.precision.autocast():
            self.schedule.step(*args, target=targets if parts.has_last else None, losses=losses,
                               return_outputs=False)
        total = torch.zeros((), device=self.dist.device, dtype=torch.float32)
        if parts.has_last:
            total = torch.stack([loss.detach().float() for loss in losses]).sum()
            if scaler is not None and scaler.is_enabled():
                total = total / scaler.get_scale()
        all_reduce(total, "sum", group=self.mesh["pp"].get_group())
        return total

    @torch.no_grad()
    def _pipeline_eval_loss(self, window: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        parts = self.pipeline
        self._denominator, self._scaler = 1.0, None
        tokens = window.to(self.dist.device)
        inputs, targets = tokens[:, :-1], tokens[:, 1:]
        losses: list[torch.Tensor] = []
        self.schedule.eval(*((inputs,) if parts.has_first else ()), target=targets if parts.has_last else None,
                           losses=losses)
        total = torch.zeros((), device=self.dist.device, dtype=torch.float32)
        if parts.has_last:
            total = torch.stack([loss.float() for loss in losses]).sum()
        all_reduce(total, "sum", group=self.mesh["pp"].get_group())
        return total if reduction == "sum" else total / targets.numel()

    def inference_model(self) -> nn.Module | None:
        """A plain, whole model for generation on rank 0 (None on other ranks); a collective when sharded.

        FSDP shards and pipeline stages cannot run on one rank alone, so their full weights are gathered
        to rank 0 and loaded into a fresh model there (host memory for one copy of the weights).
        """
        if not self.sharded:
            return self.unwrapped
        import torch.distributed as tdist
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        from tokenmill.model import build_model

        # full tensors on every rank of a stage (cpu_offload would keep them on global rank 0 only)
        local = get_model_state_dict(self.unwrapped, options=StateDictOptions(full_state_dict=True))
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
        pp_group = self.mesh["pp"].get_group() if self.pipeline is not None else None
        return clip_grad_norm_(self.unwrapped, max_norm, pp_group=pp_group)


def build_engine(model: nn.Module, cfg: Any, dist: DistInfo, precision: Any) -> Engine:
    return Engine(model, cfg, dist, precision)
