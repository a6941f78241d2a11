"""Iteration-level (continuous) batching of greedy decoding: one `DecodeLoop` per replica.

A background thread owns one `decode.DecodeBatch` and runs decode steps for whatever rows are live:
a row submitted while others decode joins at the next stop check (its cache merged in with padding),
and a finished row's future resolves as soon as its stop is seen, so a short answer never waits for a
long one. At most `max_rows` rows are live; the rest wait in arrival order.

Interface (the whole of it): the engine prefills a request (direct: layers K..N-1 after pass 1; zoom:
the fused prefill) and hands over a `decode.DecodeItem` -- last hidden state (1, D) after the final
norm, a batch-1 DynamicCache holding all N layers for the prompt, the M-RoPE position (3, 1, 1) of the
last prompt token, the prompt ids for the repetition penalty, the token budget, the penalty and the
stop ids -- and gets back a future of the generated ids (the stop id included, as `generate` does).

The language-model seam. This loop is the one place a faster decode backend (a vLLM or SGLang engine
serving the Qwen2.5-VL language model on GPU) would plug in, by replacing `DecodeBatch` behind the same
`submit(item) -> Future[list[int]]`. What such a backend needs, and why it is not a drop-in:
- the prompt as embeddings, not token ids: the fused sequence carries two images' features, with the
  RoI block inserted after the coarse image (`zoom.splice_roi`), so the backend must accept multi-image
  prompts or prompt embeddings (vLLM: `prompt_embeds` / multi-modal inputs);
- M-RoPE positions per prompt token passed explicitly (3, L): with `reuse_src_pos` the RoI tokens take
  interpolated, non-integer (h, w) positions that no processor-side `get_rope_index` reproduces; generated
  tokens then advance all three axes by 1 from the last prompt position;
- the KV cache: either import our layer 0..K-1 prefix cache (the reason the zoom prefill is cheap) into
  the backend's paged cache, or let the backend re-prefill the whole fused sequence (simpler, costs the
  prefix again);
- per-request greedy settings: repetition penalty over prompt + generated ids, stop ids, max tokens.
The hand-over stays `DecodeItem` in, token ids out; nothing outside this module would change.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from concurrent.futures import Future

from .decode import DecodeBatch, DecodeItem
from .errors import Unavailable

__all__ = ["DecodeLoop"]

log = logging.getLogger(__name__)


class DecodeLoop:
    """Decodes submitted items together on a background thread; `close()` (or `with`) stops it.

    `max_rows`: most rows decoded at once. `check_every`: steps between stop checks (each is one small
    device-to-host transfer; a row may then run up to `check_every - 1` steps past its stop, discarded,
    and new rows join only at a check).
    """

    def __init__(self, model, max_rows: int = 16, check_every: int = 1):
        if max_rows < 1:
            raise ValueError(f"max_rows must be at least 1, got {max_rows}")
        self.model = model
        self.max_rows = max_rows
        self.check_every = check_every
        self._batch = DecodeBatch(model, check_every)
        self._queue: deque[tuple[DecodeItem, Future]] = deque()
        self._wake = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="qzoom-decode-loop", daemon=True)
        self._thread.start()

    def submit(self, item: DecodeItem) -> Future:
        """Queue one row; the future resolves to its generated ids, or to the error that stopped it."""
        future: Future = Future()
        with self._wake:
            if self._closed:
                raise Unavailable("the decode loop is shut down")
            self._queue.append((item, future))
            self._wake.notify()
        return future

    async def decode(self, item: DecodeItem) -> list[int]:
        """`submit` for asyncio callers (a Ray Serve replica's handler)."""
        return await asyncio.wrap_future(self.submit(item))

    @property
    def live(self) -> int:
        """Rows decoding now (not counting those waiting for a place)."""
        return len(self._batch)

    def close(self, timeout: float | None = None) -> None:
        """Refuse new items, finish the submitted ones, stop the thread."""
        with self._wake:
            self._closed = True
            self._wake.notify()
        self._thread.join(timeout)

    def __enter__(self) -> DecodeLoop:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _run(self) -> None:
        try:
            while True:
                with self._wake:
                    while not (self._queue or self._batch or self._closed):
                        self._wake.wait()
                    if self._closed and not (self._queue or self._batch):
                        return
                    joining = self._take() if self._batch.can_join else []
                if joining:
                    self._join(joining)
                if self._batch:
                    self._step()
        except BaseException as exc:  # the thread must not die with futures pending
            log.exception("decode loop stopped")
            with self._wake:
                self._closed = True
                waiting = [future for _, future in self._queue]
                self._queue.clear()
            _fail(waiting + self._batch.keys, exc)
            raise

    def _take(self) -> list[tuple[DecodeItem, Future]]:
        """Up to the free places' worth of queued items whose callers still want them (holds the lock)."""
        taken = []
        while self._queue and len(self._batch) + len(taken) < self.max_rows:
            item, future = self._queue.popleft()
            if future.set_running_or_notify_cancel():
                taken.append((item, future))
        return taken

    def _join(self, joining: list[tuple[DecodeItem, Future]]) -> None:
        try:
            _resolve(self._batch.join([item for item, _ in joining], [future for _, future in joining]))
        except Exception as exc:
            if len(joining) == 1:
                joining[0][1].set_exception(exc)
                return
            for one in joining:  # find the item that cannot join; the others still decode
                self._join([one])

    def _step(self) -> None:
        try:
            finished = self._batch.step()
        except Exception as exc:
            log.exception("decode step failed; failing its %d rows", len(self._batch))
            _fail(self._batch.keys, exc)
            self._batch = DecodeBatch(self.model, self.check_every)
            return
        _resolve(finished)


def _resolve(finished: list[tuple[Future, list[int]]]) -> None:
    for future, ids in finished:
        future.set_result(ids)


def _fail(futures: list[Future], exc: BaseException) -> None:
    for future in futures:
        if not future.done():
            future.set_exception(exc)
