"""The `parallel` config section: strategy, pipeline and FSDP options.

The names of the choices live here, so validating a config imports no torch; `PP_SCHEDULES` in
parallel/pipeline.py and `FSDP_DTYPES` in parallel/data_parallel.py must have exactly these keys.
"""

from __future__ import annotations

from dataclasses import dataclass

from tokenmill.config.fields import opt, require_choice, require_positive

STRATEGIES = ("single", "ddp", "zero1", "fsdp")
PP_SCHEDULE_NAMES = ("GPipe", "1F1B", "Interleaved1F1B", "LoopedBFS", "InterleavedZeroBubble", "ZBVZeroBubble")
INIT_MODES = ("full", "sharded")
FSDP_DTYPE_NAMES = ("fp32", "bf16")


@dataclass
class ParallelConfig:
    strategy: str = opt("single", "single, ddp, zero1 or fsdp (torchrun sets the world size)")
    pp: int = opt(1, "pipeline-parallel degree")
    pp_schedule: str = opt("1F1B", "GPipe, 1F1B, Interleaved1F1B, LoopedBFS, InterleavedZeroBubble, ZBVZeroBubble")
    pp_microbatch_scale: int = opt(1, "multiply the number of pipeline microbatches by this")
    fsdp_reshard_after_forward: bool = opt(True, "free gathered parameters after forward (ZeRO-3); false = ZeRO-2")
    fsdp_param_dtype: str = opt("fp32", "FSDP compute dtype for parameters: fp32 or bf16")
    fsdp_reduce_dtype: str = opt("fp32", "FSDP gradient reduce dtype: fp32 or bf16")
    fsdp_cpu_offload: bool = opt(False, "keep FSDP parameters and optimizer state on the CPU")
    timeout_s: int = opt(600, "collective timeout: a stuck rank fails the job after this many seconds")
    init: str = opt(
        "full",
        "full: each rank initialises the whole model, then shards/splits it (same weights as one "
        "process); sharded: each rank initialises only its shards/stages (models too big for one device)",
    )

    def validate(self) -> None:
        require_choice("parallel.strategy", self.strategy, STRATEGIES)
        require_positive(self, "parallel", "pp", "pp_microbatch_scale", "timeout_s")
        require_choice("parallel.pp_schedule", self.pp_schedule, PP_SCHEDULE_NAMES)
        require_choice("parallel.init", self.init, INIT_MODES)
        require_choice("parallel.fsdp_param_dtype", self.fsdp_param_dtype, FSDP_DTYPE_NAMES)
        require_choice("parallel.fsdp_reduce_dtype", self.fsdp_reduce_dtype, FSDP_DTYPE_NAMES)
