"""Batches made on a background thread, so tokenizing and packing overlap the training step.

With `data.num_workers=0` the loader would tokenize in the training thread, between two steps: on a GPU the
device then idles, on a CPU the step waits. `Prefetcher` pulls from the loader's iterator on one thread, up
to `depth` batches ahead. The tokenizers library and PyTorch kernels release the GIL, so the two threads
run at once on separate cores. Everything the producer touches (sources, packer, counter-based shuffle
RNG) belongs to the data pipeline alone, so the batches and their order are the same as without the thread.

For an exact resume the loader reads its state while the producer is held between two batches
(`paused()`), and saves the batches made but not yet handed out alongside it; a resumed Prefetcher hands those
out first (`ahead`). `paused()` first lets the producer fill the look-ahead, so the saved state does not
depend on thread timing: the same run always saves the same bytes.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

_END = object()  # the producer's iterator is exhausted


class _Shared:
    """What the producer thread and the consumer share (the thread holds no reference to the Prefetcher,
    so a dropped Prefetcher is collected and its `__del__` stops the thread)."""

    def __init__(self, depth: int, ahead: list[Any]) -> None:
        self.depth = depth
        self.items: deque[Any] = deque(ahead)
        self.error: BaseException | None = None
        self.stop = False
        self.lock = threading.Lock()  # held by the producer while it makes one item
        self.changed = threading.Condition()  # items appended or taken, or stop requested


def _produce(iterator: Iterator[Any], shared: _Shared) -> None:
    while True:
        with shared.changed:
            shared.changed.wait_for(lambda: shared.stop or len(shared.items) < shared.depth)
            if shared.stop:
                return
        with shared.lock:
            if shared.stop:
                return
            try:
                item = next(iterator)
            except StopIteration:
                item = _END
            except BaseException as err:  # handed to the consumer, which raises it in the training thread
                shared.error, item = err, _END
            with shared.changed:
                shared.items.append(item)
                shared.changed.notify_all()
        if item is _END:
            return


class Prefetcher:
    """An iterator over `ahead` (items made before a resume), then `iterator`'s items, made up to `depth` ahead
    on a daemon thread."""

    def __init__(self, iterator: Iterator[Any], depth: int = 2, ahead: list[Any] | None = None) -> None:
        if depth < 1:
            raise ValueError(f"prefetch depth must be >= 1, not {depth}")
        self._iterator = iterator
        self._shared = _Shared(depth, list(ahead or []))
        self._thread = threading.Thread(target=_produce, args=(iterator, self._shared), daemon=True, name="prefetch")
        self._thread.start()

    def __iter__(self) -> Prefetcher:
        return self

    def __next__(self) -> Any:
        shared = self._shared
        with shared.changed:
            shared.changed.wait_for(lambda: bool(shared.items))
            item = shared.items[0]
            if item is not _END:
                shared.items.popleft()
                shared.changed.notify_all()
        if item is _END:
            if shared.error is not None:
                raise shared.error
            raise StopIteration
        return item

    @contextmanager
    def paused(self) -> Iterator[list[Any]]:
        """Wait until `depth` items are made (or the iterator ended), then hold the producer between two items;
        yields the items made but not handed out yet, in order."""
        shared = self._shared
        with shared.changed:
            shared.changed.wait_for(lambda: len(shared.items) >= shared.depth or _END in shared.items)
        with shared.lock, shared.changed:
            yield [item for item in shared.items if item is not _END]

    def close(self) -> None:
        """Stop the producer (it finishes the item it is making) and wait for it."""
        with self._shared.changed:
            self._shared.stop = True
            self._shared.changed.notify_all()
        if self._thread is not threading.current_thread():
            self._thread.join()

    def __del__(self) -> None:
        shared = getattr(self, "_shared", None)
        if shared is not None:
            with shared.changed:
                shared.stop = True
                shared.changed.notify_all()
