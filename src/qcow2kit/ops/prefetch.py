"""prefetch: Prefetch, an iterator's items produced on a background thread a few items
ahead of their consumer. Used where reading and the work on what was read can overlap
(commit, rebase): os.pread and the buffer copies release the interpreter. (convert and
compare read a Source's chunks into recycled buffers with convert/source.ReadAhead.)

Owns only the thread, the bounded queue and the hand-over of an error to the consumer;
knows nothing of images.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from typing import Generic, TypeVar

# items produced ahead of the consumer
PREFETCH = 4
T = TypeVar("T")


class Prefetch(Generic[T]):
    """Runs `produce` on a background thread, at most PREFETCH items ahead of the
    consumer, which iterates this object; an error in `produce` is raised where the
    consumer reaches it. close() (also on leaving a `with` block) stops the thread early."""

    def __init__(self, produce: Iterator[T]) -> None:
        self.results: queue.Queue[tuple[bool, T | BaseException | None]] = queue.Queue(PREFETCH)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(produce,), daemon=True)
        self.thread.start()

    def _run(self, produce: Iterator[T]) -> None:
        try:
            for item in produce:
                if self.stop.is_set():
                    return
                self.results.put((True, item))
            self.results.put((False, None))
        except BaseException as exc:  # handed to the consumer, which reports it
            self.results.put((False, exc))

    def __iter__(self) -> Iterator[T]:
        while True:
            more, item = self.results.get()
            if not more:
                if isinstance(item, BaseException):
                    raise item
                return
            yield item  # type: ignore[misc]

    def close(self) -> None:
        """Stop the thread once the item it is producing is done, and wait for that."""
        self.stop.set()
        while True:
            try:  # room for a put() that waits for it
                while True:
                    self.results.get_nowait()
            except queue.Empty:
                pass
            self.thread.join(0.001)
            if not self.thread.is_alive():
                return

    def __enter__(self) -> Prefetch[T]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["Prefetch", "PREFETCH"]
