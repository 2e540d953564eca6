"""The generation engine: every caller (`tokenmill generate`, training samples, eval, the server, RL) uses it.

    gen = Generator(model, tokenizer)
    gen.generate(["def ", "import "], SamplingParams(max_new_tokens=50, temperature=0.8, seed=0))
    for delta in gen.stream("def ", SamplingParams(stop=("\\n\\n",))):
        print(delta.text, end="")

Scheduling. A Generator keeps a KV cache (model/kv_cache.py) of up to `max_batch_size` rows, one row per
sample. Requests wait in a queue until a step boundary; `step()` then
  1. admits waiting requests into free rows: one prefill per prompt (right-padded with the other prompts
     admitted in the same step; each row's positions are its own, so padding changes nothing), copied into
     the rows of its n samples, each sampled from its first token on with its own generator (nanochat #38);
     a healed prompt (SamplingParams.heal_prompt, generation/healing.py) is prefilled without its last token
     and its first token is chosen among those that start with that token's text;
  2. decodes one token for every active row, each at its own position;
  3. retires finished rows, moving the last active row into each freed one, so active rows stay in front
     and finished ones cost nothing.
Requests submitted from other threads therefore join a running batch at the next step boundary.

Context limit: a sample stops with finish_reason "length" when prompt + completion reach model.max_seq_len
(the window is not slid, so every token saw its whole prefix); a prompt must leave room for one new token.
An empty prompt is a single EOS: documents are EOS-joined in training, so EOS is what precedes a document.

Threads: `submit` may be called from any thread. Without a worker, whichever consumer waits drives `step()`
(a lock makes steps exclusive; each step serves every request); `start()` runs the steps on a worker thread.

Compiled decode (`compile=True`): the cache is allocated once at full size (max_batch_size rows x
model.max_seq_len), every decode step runs all rows with the same shapes and buffer addresses, and the
step is `torch.compile(fullgraph=True)`d ("reduce-overhead", i.e. CUDA graphs, on GPU) with positions as
tensors, so it compiles once and never recompiles (the recompile guards of torchtune#1663 cannot occur).
"""

from __future__ import annotations

import contextlib
import random
import secrets
import threading
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from tokenmill.errors import UserError
from tokenmill.generation.decode_step import build_decode_step
from tokenmill.generation.healing import Healing, PrefixIndex
from tokenmill.generation.layout import apply_column_major
from tokenmill.generation.params import Completion, SamplingParams, StreamDelta
from tokenmill.generation.request import Request
from tokenmill.generation.sampling import BatchSampler
from tokenmill.generation.text import TextStream
from tokenmill.model.kv_cache import KVCache

Prompt = str | Sequence[int]
CAPACITY_STEP = 64  # cache slots grow in multiples of this, so rising demand does not reallocate every request


def sample_seed(seed: int | None, sample_index: int) -> int:
    """Seed of one sample's generator: distinct per sample, equal for equal (seed, sample_index)."""
    if seed is None:
        return secrets.randbits(63)
    return random.Random(f"{seed}/{sample_index}").getrandbits(63)


@dataclass
class _Row:
    """One sample in one cache row: the token it feeds next is `last_token`, at `position`."""

    request: Request
    sample_index: int
    generator: torch.Generator
    text: TextStream
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish_reason: str | None = None

    @property
    def prompt_len(self) -> int:
        return len(self.request.prompt_ids)

    @property
    def position(self) -> int:
        return self.prompt_len + len(self.token_ids) - 1

    @property
    def alive(self) -> bool:
        return self.finish_reason is None and not self.request.cancelled


def _decode_step(model: torch.nn.Module, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache) -> torch.Tensor:
    return model.next_logits(tokens, positions, cache)


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Dropout off while generating; a model in training (samples during a run) is put back afterwards."""
    was_training = model.training
    if was_training:
        model.eval()
    try:
        yield
    finally:
        if was_training:
            model.train()


class Generator:
    """Batched KV-cache generation for one model and tokenizer (see the module docstring)."""

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        device: str | torch.device | None = None,
        max_batch_size: int = 8,
        compile: bool = False,
        exclusive: bool = False,
    ) -> None:
        """`exclusive`: nothing but this generator uses `model` (loaded just to generate). On a CPU its weights
        are then stored in the layout that decodes fastest (generation/layout.py), which a model still being
        trained or saved must not get, and eager one-token steps run through a fused step attached to the model
        as `model.decode_step`: one call into a compiled C kernel (generation/native_step.py), or the Python one
        (generation/decode_step.py) without a C compiler."""
        if not isinstance(max_batch_size, int) or max_batch_size < 1:
            raise UserError(f"max_batch_size={max_batch_size!r} is not allowed: give an integer >= 1")
        if device is not None:
            model = model.to(device)
        self.model = model
        self.tokenizer = tokenizer
        self.cfg = model.cfg
        self.device = next(model.parameters()).device
        if exclusive and self.device.type == "cpu":
            if compile:  # a compiled step traces the model's modules: they get the column-major layout only
                apply_column_major(model)
            elif (step := build_decode_step(model)) is not None:
                model.decode_step = step  # the model's next_logits runs one-token steps through it
        # a fused step reads only its rows and filled slots of the cache it is given, so one-token steps pass the
        # whole cache rather than a view of it built every step (8 indexing ops for a 4-layer model)
        self._whole_cache = not compile and getattr(model, "decode_step", None) is not None
        self.dtype = model.output_weight().dtype
        self.max_batch_size = max_batch_size
        self.vocab_limit = min(tokenizer.vocab_size, self.cfg.vocab_size)
        self._rows: list[_Row] = []
        self._waiting: deque[Request] = deque()
        self._cache: KVCache | None = None
        self._seen: torch.Tensor | None = None  # (rows, V) bool, for repetition penalties
        self._sampler: BatchSampler | None = None  # for self._rows; rebuilt when they change
        self._step_lock = threading.Lock()
        self._wake = threading.Condition()  # guards _waiting; wakes the worker
        self._worker: threading.Thread | None = None
        self._closing = False
        self._compiled: Any = None
        self._prefix_index: PrefixIndex | None = None  # token healing's index, built on first use
        if compile and self.cfg.attention == "flex" and self.device.type != "cuda":
            # Inductor's C++ code generation fails on FlexAttention's cached mask (torch 2.13, CPU)
            raise UserError(
                "compile=True with model.attention=flex only runs on CUDA: on CPU use compile=False "
                "or model.attention=sdpa"
            )
        if compile:
            self._cache = KVCache.allocate(self.cfg, max_batch_size, self.cfg.max_seq_len, self.device, self.dtype)
            on_gpu = self.device.type == "cuda"
            if on_gpu:
                for t in (*self._cache.keys, *self._cache.values):
                    torch._dynamo.mark_static_address(t)  # CUDA graphs may keep reading the same buffers
            self._compiled = torch.compile(_decode_step, fullgraph=True, mode="reduce-overhead" if on_gpu else None)

    # -- public entry points -----------------------------------------------------------------------------
    def generate(self, prompts: Sequence[Prompt], params: SamplingParams | None = None) -> list[Completion]:
        """Completions of every prompt (text or token ids), ordered by prompt then sample."""
        if isinstance(prompts, str) or (len(prompts) > 0 and isinstance(prompts[0], int)):
            prompts = [prompts]  # one prompt given bare
        params = params or SamplingParams()
        ids = [self.prompt_ids(p) for p in prompts]  # validate every prompt before queueing any
        requests = [self._enqueue(p, params, i) for i, p in enumerate(ids)]
        return [c for r in requests for c in r.completions()]

    def stream(self, prompt: Prompt, params: SamplingParams | None = None) -> Iterator[StreamDelta]:
        """Deltas of one prompt's samples as they are generated (`sample_index` tells samples apart)."""
        return iter(self.submit(prompt, params))

    def submit(self, prompt: Prompt, params: SamplingParams | None = None, prompt_index: int = 0) -> Request:
        """Queue one prompt (thread-safe); it joins the running batch at the next step boundary."""
        return self._enqueue(self.prompt_ids(prompt), params or SamplingParams(), prompt_index)

    def prompt_ids(self, prompt: Prompt) -> list[int]:
        """Token ids of a prompt, checked against the vocabulary and the context (UserError otherwise)."""
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else [int(i) for i in prompt]
        if not ids:
            ids = [self.tokenizer.eos_id]
        bad = [i for i in ids if not 0 <= i < self.cfg.vocab_size]
        if bad:
            raise UserError(f"prompt token id {bad[0]} is outside the model's vocabulary 0..{self.cfg.vocab_size - 1}")
        if len(ids) >= self.cfg.max_seq_len:
            raise UserError(
                f"prompt of {len(ids)} tokens leaves no room in the model's context of "
                f"model.max_seq_len={self.cfg.max_seq_len} tokens: shorten it to at most "
                f"{self.cfg.max_seq_len - 1} tokens"
            )
        return ids

    def start(self) -> Generator:
        """Run steps on a background thread (for servers); consumers then just wait for their deltas."""
        with self._wake:
            if self._worker is None:
                self._closing = False
                self._worker = threading.Thread(target=self._work, name="tokenmill-generator", daemon=True)
                self._worker.start()
        return self

    def close(self) -> None:
        """Stop the background thread (requests still running stay queued for whoever drives next)."""
        with self._wake:
            self._closing = True
            self._wake.notify_all()
            worker, self._worker = self._worker, None
        if worker is not None:
            worker.join()

    @property
    def has_worker(self) -> bool:
        return self._worker is not None

    def step(self) -> bool:
        """One step boundary: admit waiting requests, decode one token per active row. False once idle."""
        with self._step_lock:
            try:
                with torch.inference_mode(), _eval_mode(self.model):
                    self._admit()
                    self._retire()
                    if self._rows:
                        self._decode()
                        self._retire()
            except BaseException as err:
                self._fail(err)
                raise
            with self._wake:
                return bool(self._rows or self._waiting)

    # -- scheduling --------------------------------------------------------------------------------------
    def _enqueue(self, ids: list[int], params: SamplingParams, prompt_index: int) -> Request:
        request = Request(self, ids, params, prompt_index, self._heal(ids) if params.heal_prompt else None)
        with self._wake:
            self._waiting.append(request)
            self._wake.notify()
        return request

    def _work(self) -> None:
        while True:
            with self._wake:
                while not self._closing and not self._waiting and not self._rows:
                    self._wake.wait()
                if self._closing:
                    return
            with contextlib.suppress(Exception):  # the error already went to every request it touched
                self.step()

    def _take_waiting(self) -> list[tuple[Request, int, int]]:
        """(request, first sample, samples) groups for the free rows, in arrival order."""
        groups = []
        free = self.max_batch_size - len(self._rows)
        with self._wake:
            while free > 0 and self._waiting:
                request = self._waiting[0]
                if request.cancelled:
                    self._waiting.popleft()
                    request.drop(request.params.n - request.admitted)
                    continue
                take = min(free, request.params.n - request.admitted)
                groups.append((request, request.admitted, take))
                request.admitted += take
                free -= take
                if request.admitted == request.params.n:
                    self._waiting.popleft()
        return groups

    def _admit(self) -> None:
        """Prefill the prompts of newly admitted requests and sample their samples' first tokens."""
        groups = self._take_waiting()
        if not groups:
            return
        first = len(self._rows)
        prompts = [request.prompt_ids for request, _, _ in groups]
        T = max(len(p) for p in prompts)
        self._reserve(
            first + sum(take for _, _, take in groups),
            max(len(r.prompt_ids) + r.params.max_new_tokens for r, _, _ in groups),
        )
        # one prefill row per prompt, right-padded: positions are 0..T-1 in every row, padding sits past the
        # prompt in slots the row's own tokens overwrite before any query can see them
        idx = torch.tensor([p + [0] * (T - len(p)) for p in prompts], device=self.device)
        positions = torch.arange(T, device=self.device).expand(len(prompts), T)
        last = torch.tensor([len(p) - 1 for p in prompts], device=self.device)
        logits = self.model.next_logits(idx, positions, self._cache.view(slice(first, first + len(prompts)), T), last)
        rows = [self._new_row(request, start) for request, start, _ in groups]
        heads, src, dst = list(range(len(groups))), [], []
        for g, (request, start, take) in enumerate(groups):
            for j in range(1, take):
                src.append(first + g)
                dst.append(first + len(rows))
                heads.append(g)
                rows.append(self._new_row(request, start + j))
        if src:
            self._cache.copy_rows(
                self._cache, torch.tensor(src, device=self.device), torch.tensor(dst, device=self.device), T
            )
        self._rows.extend(rows)
        self._sampler = None
        if any(r.request.params.repetition_penalty != 1.0 for r in rows):
            self._mark_prompts_seen(rows, first)
        sampler = BatchSampler(
            [r.request.params for r in rows], [r.generator for r in rows], self.vocab_limit, self.device
        )
        self._accept(rows, first, logits[torch.tensor(heads, device=self.device)], sampler, self._first_choices(rows))

    def _decode(self) -> None:
        """Feed every active row's last token at its position; sample the next one."""
        rows = self._rows
        logits = self._next_logits(rows)
        if self._sampler is None:
            self._sampler = BatchSampler(
                [r.request.params for r in rows], [r.generator for r in rows], self.vocab_limit, self.device
            )
        self._accept(rows, 0, logits, self._sampler)

    def _next_logits(self, rows: list[_Row]) -> torch.Tensor:
        """(n, V) logits after each row's last token, fed at its position (its keys/values go into the cache)."""
        n = len(rows)
        token_ids, positions = [r.token_ids[-1] for r in rows], [r.position for r in rows]
        if self._compiled is not None:
            full = self._cache.batch_size  # static shapes: all rows, all slots; rows past n are idle
            pad = [0] * (full - n)
            tokens = torch.tensor(token_ids + pad, device=self.device)[:, None]  # (full, 1)
            where = torch.tensor(positions + pad, device=self.device)[:, None]
            return self._compiled(self.model, tokens, where, self._cache)[:n].clone()  # CUDA graphs reuse outputs
        # attention reads the filled slots only: the fused step narrows the whole cache itself, the modules get a view
        cache = self._cache if self._whole_cache else self._cache.view(slice(0, n), max(positions) + 1)
        tokens = torch.tensor(token_ids, device=self.device)[:, None]  # (n, 1)
        return self.model.next_logits(tokens, torch.tensor(positions, device=self.device)[:, None], cache)

    def _accept(
        self,
        rows: list[_Row],
        first: int,
        logits: torch.Tensor,
        sampler: BatchSampler,
        allowed: torch.Tensor | None = None,
    ) -> None:
        """Sample a token for each of `rows` (cache rows first, first+1, ...) and report it; `allowed` (rows, V)
        bool limits the choice (token healing's first token)."""
        seen = None if self._seen is None else self._seen[first : first + len(rows)]
        tokens, logprobs = sampler(logits, seen, allowed)
        if seen is not None:
            seen.scatter_(1, tokens[:, None], True)
        token_list = tokens.tolist()  # host sync: stop checks and streaming need the ids
        logprob_list = logprobs.tolist() if logprobs is not None else [None] * len(rows)
        for row, token, logprob in zip(rows, token_list, logprob_list, strict=False):
            self._advance(row, token, logprob)

    def _advance(self, row: _Row, token: int, logprob: float | None) -> None:
        """Append one token to a sample; decide whether it finished; deliver its delta (and completion)."""
        params = row.request.params
        row.token_ids.append(token)
        if params.logprobs:
            row.logprobs.append(logprob)
        if token == self.tokenizer.eos_id:
            text, row.finish_reason = row.text.flush(), "stop"
        else:
            text = row.text.add(token)
            if row.text.stopped:
                row.finish_reason = "stop"
            elif (
                len(row.token_ids) >= params.max_new_tokens
                or row.prompt_len + len(row.token_ids) >= self.cfg.max_seq_len
            ):
                text, row.finish_reason = text + row.text.flush(), "length"
        request = row.request
        request.deliver(
            StreamDelta(text, [token], row.finish_reason, row.sample_index, [logprob] if params.logprobs else None)
        )
        if row.finish_reason is not None:
            request.complete(
                Completion(
                    request.prompt_index,
                    row.sample_index,
                    row.token_ids,
                    row.text.text,
                    row.finish_reason,
                    row.logprobs if params.logprobs else None,
                )
            )

    def _retire(self) -> None:
        """Drop finished and cancelled rows; move the last active rows into the freed ones."""
        rows = self._rows
        alive = [r.alive for r in rows]
        if all(alive):
            return
        for r in rows:
            if r.finish_reason is None and r.request.cancelled:
                r.request.drop(1)
        keep = sum(alive)
        holes = [i for i in range(keep) if not alive[i]]
        movers = [i for i in range(keep, len(rows)) if alive[i]]
        if movers:
            src = torch.tensor(movers, device=self.device)
            dst = torch.tensor(holes, device=self.device)
            self._cache.copy_rows(self._cache, src, dst, max(rows[i].position for i in movers) + 1)
            if self._seen is not None:
                self._seen[dst] = self._seen[src]
        survivors = rows[:keep]
        for hole, mover in zip(holes, movers, strict=False):
            survivors[hole] = rows[mover]
        self._rows = survivors
        self._sampler = None

    def _reserve(self, rows: int, capacity: int) -> None:
        """Make the cache hold `rows` rows of `capacity` positions (capped at the context), keeping its contents."""
        capacity = min(-(-capacity // CAPACITY_STEP) * CAPACITY_STEP, self.cfg.max_seq_len)
        cache = self._cache
        if cache is not None and cache.batch_size >= rows and cache.span >= capacity:
            return
        rows = min(self.max_batch_size, max(rows, 2 * cache.batch_size if cache is not None else rows))
        if cache is None:
            self._cache = KVCache.allocate(self.cfg, rows, capacity, self.device, self.dtype)
        else:
            self._cache = cache.resized(rows, max(capacity, cache.span))
        if self._seen is not None and self._seen.shape[0] < rows:
            seen = torch.zeros(rows, self._seen.shape[1], dtype=torch.bool, device=self.device)
            seen[: self._seen.shape[0]] = self._seen
            self._seen = seen

    def _heal(self, ids: list[int]) -> Healing | None:
        """Token healing of one prompt (generation/healing.py); the vocabulary is indexed once per generator."""
        if self._prefix_index is None:
            self._prefix_index = PrefixIndex(self.tokenizer, self.vocab_limit)
        return self._prefix_index.heal(ids)

    def _first_choices(self, rows: list[_Row]) -> torch.Tensor | None:
        """(rows, V) bool: the tokens each new row may start with (all, unless its prompt was healed)."""
        if all(r.request.healing is None for r in rows):
            return None
        allowed = torch.ones(len(rows), self.cfg.vocab_size, dtype=torch.bool, device=self.device)
        for i, row in enumerate(rows):
            if row.request.healing is not None:
                allowed[i] = False
                allowed[i, torch.tensor(row.request.healing.allowed_ids, device=self.device)] = True
        return allowed

    def _mark_prompts_seen(self, rows: list[_Row], first: int) -> None:
        if self._seen is None:
            self._seen = torch.zeros(self._cache.batch_size, self.cfg.vocab_size, dtype=torch.bool, device=self.device)
        for i, row in enumerate(rows, start=first):
            self._seen[i] = False
            self._seen[i, torch.tensor(row.request.prompt_ids, device=self.device)] = True

    def _new_row(self, request: Request, sample_index: int) -> _Row:
        generator = torch.Generator(device=self.device)
        generator.manual_seed(sample_seed(request.params.seed, sample_index))
        shown = request.healing.removed_text if request.healing is not None else ""  # already in the prompt
        text = TextStream(self.tokenizer.decode, request.params.stop, shown)
        return _Row(request, sample_index, generator, text)

    def _fail(self, err: BaseException) -> None:
        """A step raised: every running and waiting request gets the error; the engine starts empty again."""
        with self._wake:
            requests = {id(r.request): r.request for r in self._rows}
            requests.update({id(r): r for r in self._waiting})
            self._waiting.clear()
        for request in requests.values():
            request.fail(err)
        self._rows = []
        self._sampler = None
