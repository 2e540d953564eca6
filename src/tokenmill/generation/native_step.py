"""The fused decode step as one compiled C function (native/decode_step.c), for an exclusive CPU generator.

Why: at batch 1 a small model's step is ~20 matrix-vector products and ~100 small ops; each small op dispatched
from Python (PyTorch or NumPy) costs 3-7 us on an idle core and 3-5x that inside a step, whose products have just
streamed megabytes of weights through the caches (docs/performance.md, "Generation"). In C those ops are loops
that cost next to nothing, so the step costs about what its products cost.

The kernel is compiled on first use with the system C compiler (`$CC`, default `cc`; `-O3 -march=native`) into
`$TOKENMILL_CACHE/kernels` (default `~/.cache/tokenmill/kernels`), keyed by the source, the flags, the compiler
and the CPU's feature flags, and loaded with ctypes. Without a compiler, or with `TOKENMILL_NATIVE_DECODE=0`,
the generator keeps the Python fused step (generation/decode_step.py), which gives the same logits up to the
order of floating-point sums.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import subprocess
import tempfile
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from tokenmill.model.kv_cache import KVCache
from tokenmill.model.norms import RMSNorm
from tokenmill.model.transformer import Transformer

if TYPE_CHECKING:
    from tokenmill.generation.decode_step import FusedDecodeStep

FLAGS = (
    "-O3",
    "-march=native",
    # reassociation lets the compiler vectorise sums (norms, attention's dot products); NaN and inf keep IEEE
    # semantics (attention's -inf start)
    "-fno-math-errno",
    "-fassociative-math",
    "-fno-signed-zeros",
    "-fno-trapping-math",
    "-ffp-contract=fast",
    "-std=c11",
    "-fPIC",
    "-shared",
)
LOG = logging.getLogger("tokenmill.generation")
ACTIVATIONS = {"gelu": 0, "gelu_tanh": 1, "silu": 2, "relu": 3, "leaky_relu": 4, "relu2": 5}  # decode_step.c
_POINTER = ctypes.c_void_p


class _Layer(ctypes.Structure):
    """One block's weights and cache buffers: `Layer` in decode_step.c (NULL where the model has none)."""

    _fields_ = [
        (name, _POINTER)
        for name in [
            "attn_norm_w",
            "attn_norm_b",
            "qkv_t",
            "qkv_b",
            "q_gain",
            "k_gain",
            "o_t",
            "o_b",
            "ffn_norm_w",
            "ffn_norm_b",
            "up_t",
            "up_b",
            "down_t",
            "down_b",
            "keys",
            "values",
        ]
    ]


class _Model(ctypes.Structure):
    """Shapes, options and the weights outside the blocks: `Model` in decode_step.c."""

    _fields_ = [
        *[
            (name, ctypes.c_int64)
            for name in [
                "n_layers",
                "d",
                "n_heads",
                "n_kv_heads",
                "head_dim",
                "hidden",
                "up_width",
                "vocab",
                "norm_kind",
                "gated",
                "activation",
                "has_final_norm",
                "cache_row_stride",
                "cache_head_stride",
                "tok_emb_row_stride",
                "tok_emb_col_stride",
            ]
        ],
        *[(name, ctypes.c_float) for name in ("norm_eps", "qk_eps", "scale")],
        *[
            (name, _POINTER)
            for name in ["tok_emb", "pos_emb", "rope_cos", "rope_sin", "final_norm_w", "final_norm_b", "head_t"]
        ],
        ("layers", ctypes.POINTER(_Layer)),
    ]


def _source() -> bytes:
    return resources.files("tokenmill.generation").joinpath("native/decode_step.c").read_bytes()


def _cpu_flags() -> str:
    """The CPU's feature flags: a kernel built with -march=native runs only where they are the same."""
    cpuinfo = Path("/proc/cpuinfo")  # Linux; elsewhere the processor's name stands in
    lines = cpuinfo.read_text().splitlines() if cpuinfo.is_file() else []
    return next((line for line in lines if line.startswith(("flags", "Features"))), platform.processor())


def kernel_dir() -> Path:
    """$TOKENMILL_CACHE/kernels; TOKENMILL_CACHE defaults to $XDG_CACHE_HOME/tokenmill or ~/.cache/tokenmill."""
    root = (
        os.environ.get("TOKENMILL_CACHE")
        or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tokenmill"
    )
    return Path(root) / "kernels"


def compile_kernel(cache_dir: Path, compiler: str) -> Path | None:
    """The shared library of the kernel, compiled into `cache_dir` unless already there; None if it cannot be."""
    source = _source()
    parts = [source, " ".join(FLAGS).encode(), compiler.encode(), _cpu_flags().encode(), platform.machine().encode()]
    key = hashlib.sha256(b"\0".join(parts)).hexdigest()[:20]
    library = cache_dir / f"decode_step_{key}.so"
    if library.exists():
        return library
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache_dir) as work:
            c_file, built = Path(work) / "decode_step.c", Path(work) / "decode_step.so"
            c_file.write_bytes(source)
            command = [compiler, *FLAGS, str(c_file), "-o", str(built), "-lm"]
            subprocess.run(command, check=True, capture_output=True, timeout=120)
            os.replace(built, library)  # atomic: a concurrent process sees no half-written library
    except (OSError, subprocess.SubprocessError) as err:
        detail = getattr(err, "stderr", None) or str(err)
        detail = " ".join((detail.decode(errors="replace") if isinstance(detail, bytes) else detail).split())
        LOG.warning("the native decode step did not compile with %s, decoding in Python: %s", compiler, detail[-300:])
        return None
    return library


@functools.cache
def load_kernel() -> ctypes.CDLL | None:
    """The compiled kernel, once per process (None: no compiler or a failed build; the Python step is used)."""
    path = compile_kernel(kernel_dir(), os.environ.get("CC") or "cc")
    if path is None:
        return None
    try:
        library = ctypes.CDLL(str(path))
    except OSError as err:  # a damaged file in the cache: removing it makes the next process compile again
        LOG.warning("the native decode step in %s did not load, decoding in Python: %s", path, err)
        return None
    library.tm_scratch_floats.argtypes = [ctypes.POINTER(_Model), ctypes.c_int64, ctypes.c_int64]
    library.tm_scratch_floats.restype = ctypes.c_int64
    library.tm_decode_step.argtypes = [ctypes.POINTER(_Model), ctypes.c_int64, _POINTER, _POINTER, _POINTER, _POINTER]
    library.tm_decode_step.restype = None
    return library


def native_enabled(model: Transformer) -> bool:
    """Whether the kernel computes this model (an activation it knows) and TOKENMILL_NATIVE_DECODE=0 does not ask
    for the Python step."""
    return model.cfg.activation in ACTIVATIONS and os.environ.get("TOKENMILL_NATIVE_DECODE", "1") != "0"


class NativeDecodeStep:
    """`next_logits` for one new token per row through the compiled kernel, on the Python step's weight layout."""

    def __init__(self, model: Transformer, fused: FusedDecodeStep, library: ctypes.CDLL) -> None:
        cfg = model.cfg
        self.library, self.fused = library, fused
        self.vocab, self.softcap, self.max_seq_len = model.tok_emb.weight.shape[0], cfg.logit_softcap, cfg.max_seq_len
        self._held: list[np.ndarray] = []  # everything the structs point into, alive as long as this step
        first = fused.layers[0]
        cos = sin = None
        if model.rope is not None:
            cos, sin = model.rope.cos.float().contiguous(), model.rope.sin.float().contiguous()
        self.spec = _Model(
            n_layers=len(fused.layers),
            d=cfg.d_model,
            n_heads=fused.n_heads,
            n_kv_heads=fused.n_kv_heads,
            head_dim=fused.head_dim,
            hidden=first.down_t.shape[0],
            up_width=first.up_t.shape[1],
            vocab=self.vocab,
            norm_kind=0 if isinstance(model.blocks[0].attn_norm, RMSNorm) else 1,
            gated=int(first.gated),
            activation=ACTIVATIONS[cfg.activation],
            has_final_norm=int(not isinstance(model.norm, nn.Identity)),
            tok_emb_row_stride=fused.tok_emb.stride(0),  # a tied table is stored column-major (layout.py)
            tok_emb_col_stride=fused.tok_emb.stride(1),
            norm_eps=model.blocks[0].attn_norm.eps,
            qk_eps=cfg.norm_eps if model.blocks[0].attn.q_norm is None else model.blocks[0].attn.q_norm.eps,
            scale=fused.head_dim**-0.5,
            tok_emb=self._address(fused.tok_emb, contiguous=False),
            pos_emb=self._address(fused.pos_emb),
            rope_cos=self._address(cos),
            rope_sin=self._address(sin),
            final_norm_w=self._address(getattr(model.norm, "weight", None)),
            final_norm_b=self._address(getattr(model.norm, "bias", None)),
            head_t=self._address(fused.head_t),
        )
        self.layers = (_Layer * len(fused.layers))()
        for slot, mine, block in zip(self.layers, fused.layers, model.blocks, strict=True):
            attn = block.attn
            addresses = {
                "attn_norm_w": block.attn_norm.weight,
                "attn_norm_b": getattr(block.attn_norm, "bias", None),
                "qkv_t": mine.qkv_t,
                "qkv_b": mine.qkv_bias,
                "q_gain": None if attn.q_norm is None else attn.q_norm.weight,
                "k_gain": None if attn.k_norm is None else attn.k_norm.weight,
                "o_t": mine.o_t,
                "o_b": mine.o_bias,
                "ffn_norm_w": block.ffn_norm.weight,
                "ffn_norm_b": getattr(block.ffn_norm, "bias", None),
                "up_t": mine.up_t,
                "up_b": mine.up_bias,
                "down_t": mine.down_t,
                "down_b": mine.down_bias,
            }
            for field, value in addresses.items():
                setattr(slot, field, self._address(value))
        self.spec.layers = self.layers
        self._cache: KVCache | None = None
        self._scratch: dict[int, np.ndarray] = {}

    def _address(self, array: np.ndarray | torch.Tensor | None, contiguous: bool = True) -> int | None:
        """The address of a float32 array (None stays NULL), which this step now holds."""
        if array is None:
            return None
        if isinstance(array, torch.Tensor):
            array = array.detach().numpy()
        if array.dtype != np.float32 or (contiguous and not array.flags.c_contiguous):
            raise ValueError(
                f"the native decode step needs C-contiguous float32 weights, not {array.dtype} {array.strides}"
            )
        self._held.append(array)
        return array.ctypes.data

    def _bind(self, cache: KVCache) -> None:
        """Point the layers at this cache's buffers (once per cache object: the engine passes the same one)."""
        if cache is self._cache:
            return
        hd = self.fused.head_dim
        if len(cache.keys) != len(self.layers) or len(cache.values) != len(self.layers):
            raise ValueError(f"the native decode step needs a cache of {len(self.layers)} layers")
        strides = set()
        for t in (*cache.keys, *cache.values):  # all checked before any pointer changes
            if t.dtype != torch.float32 or t.device.type != "cpu" or t.stride()[2:] != (hd, 1):
                raise ValueError("the native decode step needs a float32 CPU cache with (slot, head_dim) contiguous")
            strides.add(t.stride()[:2])
        if len(strides) != 1:
            raise ValueError(f"the native decode step needs one cache layout for every layer, got strides {strides}")
        for slot, keys, values in zip(self.layers, cache.keys, cache.values, strict=True):
            slot.keys, slot.values = keys.data_ptr(), values.data_ptr()
        ((self.spec.cache_row_stride, self.spec.cache_head_stride),) = strides
        self._cache = cache

    def _scratch_for(self, batch_size: int) -> np.ndarray:
        if batch_size not in self._scratch:
            size = self.library.tm_scratch_floats(ctypes.byref(self.spec), batch_size, self.max_seq_len)
            self._scratch[batch_size] = np.empty(size, dtype=np.float32)
        return self._scratch[batch_size]

    def __call__(self, tokens: list[int], positions: list[int], cache: KVCache) -> torch.Tensor:
        """As `FusedDecodeStep.__call__`: keys/values go into rows 0..B-1 of `cache`, at the rows' positions."""
        B = len(tokens)
        if B != len(positions) or not 0 < B <= cache.batch_size:
            raise ValueError(f"{B} tokens and {len(positions)} positions for a cache of {cache.batch_size} rows")
        if min(tokens) < 0 or max(tokens) >= self.vocab:
            raise IndexError(f"token ids must be in [0, {self.vocab}), got {tokens}")
        limit = min(cache.span, self.max_seq_len)  # the cache's slots; the position tables' rows
        if min(positions) < 0 or max(positions) >= limit:
            raise IndexError(f"positions must be in [0, {limit}) for this cache, got {positions}")
        self._bind(cache)
        logits = torch.empty(B, self.vocab)
        self.library.tm_decode_step(
            ctypes.byref(self.spec),
            B,
            (ctypes.c_int64 * B)(*tokens),
            (ctypes.c_int64 * B)(*positions),
            self._scratch_for(B).ctypes.data,
            logits.data_ptr(),
        )
        return logits if self.softcap <= 0 else self.softcap * torch.tanh(logits / self.softcap)
