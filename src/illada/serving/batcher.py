"""Dynamic batching: one worker thread owns the model; requests wait in a bounded queue; the worker batches
queued rows with the same sampler settings (up to `max_batch`), left-padded, and runs `illada.sampling.stream` on
them, so concurrent requests share every forward pass.

Variable-length rows (the default) run one block at a time: after each block finished rows leave and queued rows
join, so a batch stays full under steady load. Other rows (fixed canvas, CFG, seeded sampling) run as a whole.
At temperature 0 the sampler is batch-invariant (a left-padded row gives what it gives alone), so batching never
changes an answer. Each `StepEvent` is fanned out to the rows' own asyncio queues on the event loop. A cancelled
request (client gone, timeout) leaves the queue, gets nothing more, and a batch whose rows are all cancelled stops
at the next step.
"""
from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import threading
import time
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch

from illada.serving.metrics import Metrics
from illada.serving.protocol import GenerationRequest, RowResult, cut_at_stop

log = logging.getLogger("illada.serve")
_unique = itertools.count()


class _Stopped(Exception):
    """Every row of an infill batch was cancelled: stop between passes."""


class ServingError(Exception):
    """What the worker reports instead of an answer; the app maps each kind to its HTTP status."""


class QueueFull(ServingError):
    def __init__(self, queued: int, limit: int) -> None:
        super().__init__(f"the server is busy: {queued} rows are queued (limit {limit}); retry later")


class ShuttingDown(ServingError):
    def __init__(self) -> None:
        super().__init__("the server is shutting down")


class GenerationFailed(ServingError):
    def __init__(self) -> None:
        super().__init__("internal error while generating")


@dataclass(eq=False)
class Ticket:
    """One HTTP request: its rows' results come back on `queue` as (row index, kind, payload) tuples, kind being
    "text" (a streamed delta), "canvas" (a denoising update), "done" (a RowResult) or "error" (a ServingError)."""

    request: GenerationRequest
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: bool = False  # set by the event loop; read by the worker between steps

    def push(self, index: int, kind: str, payload: Any) -> None:
        """Called from the worker thread."""
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, (index, kind, payload))
        except RuntimeError:  # the event loop has closed (server shutting down)
            self.cancelled = True


@dataclass(eq=False)
class Row:
    """One choice row. Rows in block mode carry their progress between blocks."""

    ticket: Ticket
    index: int  # choice index within the request
    tokens: list[int]  # the prompt
    key: tuple  # rows with equal keys may share a batch
    by_block: bool  # scheduled one block at a time (rows join and leave at block boundaries)
    left: int = 0  # tokens of the row's budget not yet generated (max_tokens, capped by the context)
    generated: list[int] = field(default_factory=list)  # block mode: finished blocks so far
    steps: int = 0  # block mode: denoising steps so far (offsets the canvas stream's step numbers)
    nfe: int = 0  # forward passes this row took part in
    text: "TextStream | None" = None  # streaming rows: their text deltas
    finished: bool = False  # answered
    dropped: bool = False  # cancelled, and counted


def schedule(config) -> tuple[tuple, bool]:
    """(batch key, block mode) of a request's rows, from its `SamplingConfig` (or InfillConfig).

    Block mode: a variable-length generation is exactly the same when cut after any block and resumed with the
    finished blocks as part of the prompt (each block is denoised from the canvas so far alone; caches are
    rebuilt at every block), so such rows are run one block at a time and new rows join the batch at block
    boundaries. Their key leaves out the per-row budget and stop strings. Not in block mode: a fixed canvas
    (future masks take part in attention), classifier-free guidance (its unconditional input masks the prompt
    only), the committed cache (its keys/values of finished blocks are those of the passes that finished them,
    which a resumed run would recompute), and a seeded stochastic request, which runs alone: its random draws
    would depend on the other rows of a batch, and a seed promises a reproducible answer.
    """
    seeded = config.is_random and config.seed is not None
    by_block = (bool(getattr(config, "variable_length", False)) and not config.cfg_scale and not seeded
                and config.cache != "committed")
    if by_block:  # the block that all rows run is what must agree, not each row's budget
        config = config.replace(gen_length=1, block_length=config.resolved_block_length,
                                steps=config.resolved_steps, stop_strings=())
    key = (type(config).__name__,) + tuple(dataclasses.astuple(config))
    if seeded:
        key += (("alone", next(_unique)),)
    return key + (("by_block", by_block),), by_block


class TextStream:
    """Text deltas of one row while it is denoised: the decoded run of committed tokens from the start of the
    generation up to the first mask, cut at a stop token or stop string. Text that could still change is held
    back (a partial UTF-8 character, a possible start of a stop string), so the deltas always add up to a prefix
    of the final text."""

    def __init__(self, decode: Callable[[list[int]], str], mask_id: int, stop_ids: set[int],
                 stop: tuple[str, ...]) -> None:
        self.decode, self.mask_id, self.stop_ids, self.stop = decode, mask_id, stop_ids, stop
        self.hold = max((len(s) for s in stop), default=1) - 1
        self.sent = ""
        self.done_tokens = -1

    def update(self, generation: list[int]) -> str:
        n = next((i for i, t in enumerate(generation) if t == self.mask_id or t in self.stop_ids), len(generation))
        if n == self.done_tokens:
            return ""
        self.done_tokens = n
        text, stopped = cut_at_stop(self.decode(generation[:n]), self.stop)
        if not stopped:
            text = text.rstrip("\ufffd")
            text = text[:len(text) - self.hold] if self.hold else text
        return self._advance(text)

    def finish(self, text: str) -> str:
        return self._advance(text)

    def _advance(self, text: str) -> str:
        if len(text) <= len(self.sent) or not text.startswith(self.sent):
            return ""
        delta, self.sent = text[len(self.sent):], text
        return delta


class Batcher:
    """The model worker and its queue. `submit` is called on the event loop; everything else runs in the worker."""

    def __init__(self, handle, max_batch: int = 8, queue_size: int = 64, metrics: Metrics | None = None) -> None:
        if max_batch < 1 or queue_size < 1:
            raise ValueError("max_batch and queue_size must be >= 1")
        self.handle, self.max_batch, self.queue_size = handle, max_batch, queue_size
        self.metrics = metrics or Metrics()
        self.metrics.queue_depth = lambda: len(self._pending)
        self.metrics.active_rows = lambda: len(self._running)
        self._pending: deque[Row] = deque()
        self._running: list[Row] = []  # rows in the current batch (block mode: carried between blocks)
        self._cond = threading.Condition()
        self._held = 0
        self._stopping = False
        self._thread: threading.Thread | None = None
        tokenizer = handle.tokenizer
        self._decode = tokenizer.decode
        self._mask_id = handle.mask_token_id
        self._pad_id = handle.special.prompt_pad
        self._stop_ids = set(handle.special.stops)

    # -- event-loop side -----------------------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name="illada-model-worker", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the worker after its current step; rows still queued get a 503."""
        with self._cond:
            self._stopping = True
            pending, self._pending = list(self._pending), deque()
            for row in self._running:
                row.ticket.cancelled = True
            self._cond.notify_all()
        for row in pending:
            row.ticket.push(row.index, "error", ShuttingDown())
        if self._thread is not None:
            self._thread.join(timeout)

    def submit(self, request: GenerationRequest, loop: asyncio.AbstractEventLoop) -> Ticket:
        """Queue the request's rows; raises QueueFull when the queue is full (a request larger than the whole
        queue is still taken when the queue is empty, so it is never refused forever)."""
        self.start()  # normally started by the app's lifespan already
        ticket = Ticket(request, loop)
        key, by_block = schedule(request.config)
        if request.infill is not None:  # canvases with holes: batched only with each other, run whole
            rows = [Row(ticket, i, [], key + (("infill", True),), False) for i in range(len(request.infill))]
        else:
            rows = [Row(ticket, i, tokens, key, by_block, self._budget(tokens, request.config.gen_length))
                    for i, tokens in enumerate(request.rows)]
        with self._cond:
            if self._stopping:
                raise ShuttingDown()
            if self._pending and len(self._pending) + len(rows) > self.queue_size:
                self.metrics.add(rejected=1)
                raise QueueFull(len(self._pending), self.queue_size)
            self._pending.extend(rows)
            self._cond.notify_all()
        return ticket

    def _budget(self, tokens: list[int], wanted: int) -> int:
        """A row's budget: exactly max_tokens, capped by the context after its own prompt (logged)."""
        context = self.handle.config.max_seq_len
        budget = min(wanted, context - len(tokens))
        if budget < wanted:
            log.info("max_tokens %d capped to %d: the prompt (%d tokens) leaves %d of the model context (%d tokens)",
                     wanted, budget, len(tokens), budget, context)
        return budget

    @contextmanager
    def hold(self) -> Iterator[None]:
        """Keep the worker from starting another batch or block while inside (queued rows wait): for
        maintenance, tests and benchmarks that need requests to pile up."""
        with self._cond:
            self._held += 1
        try:
            yield
        finally:
            with self._cond:
                self._held -= 1
                self._cond.notify_all()

    @property
    def queue_depth(self) -> int:
        return len(self._pending)

    def idle(self) -> bool:
        return not self._pending and not self._running

    # -- worker side ---------------------------------------------------------------------------------------------
    def _admit(self) -> None:
        """Move queued rows into the batch. An empty batch takes the first live row and every queued row with its
        key, up to max_batch. A running (block-mode) batch takes queued rows with its key in queue order only,
        up to the first row that cannot join, so a request with other settings is never passed over for long."""
        self._running = [row for row in self._running if not self._cancelled(row)]
        running = bool(self._running)
        keep: deque[Row] = deque()
        closed = False
        while self._pending:
            row = self._pending.popleft()
            if self._cancelled(row):
                continue
            if not self._running:
                self._running.append(row)
            elif not closed and row.key == self._running[0].key and len(self._running) < self.max_batch:
                self._running.append(row)
            else:
                keep.append(row)
                closed = running
        self._pending = keep

    def _drop(self, row: Row) -> None:
        if not row.dropped:
            row.dropped = True
            self.metrics.add(rows_cancelled=1)

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._stopping and (self._held or not (self._pending or self._running)):
                    self._cond.wait()
                if self._stopping:
                    return
                self._admit()
                rows = list(self._running)
            if not rows:
                continue
            began = time.perf_counter()
            try:
                with torch.inference_mode():
                    self._run(rows)
            except Exception:  # a bug must not kill the worker: the rows get a 500, the server stays up
                log.exception("generation failed")
                for row in rows:
                    row.finished = True
                    row.ticket.push(row.index, "error", GenerationFailed())
            finally:
                self.metrics.add(busy_seconds=time.perf_counter() - began)
            with self._cond:  # a whole batch is over; block-mode rows with budget left stay for the next block
                self._running = [row for row in self._running
                                 if row.by_block and not row.finished and not row.dropped]

    def _run(self, rows: list[Row]) -> None:
        """One batch (whole generation) or, in block mode, one block of every row; finished rows are answered."""
        from illada.sampling import left_pad, stream

        lm = self.handle
        if rows[0].ticket.request.infill is not None:
            self._run_infill(rows)
            return
        by_block = rows[0].by_block
        config = rows[0].ticket.request.config
        budgets = None
        if by_block:  # one block; stop strings are checked here on the whole text, which spans blocks
            block = config.resolved_block_length
            config = config.replace(gen_length=block, block_length=block, steps=config.resolved_steps,
                                    stop_strings=())
            budgets = [min(block, row.left) for row in rows]  # a shorter last block
        for row in rows:
            if row.ticket.request.stream and row.text is None:
                row.text = TextStream(lambda t: self._decode(t, skip_special_tokens=True), self._mask_id,
                                      self._stop_ids, row.ticket.request.stop)
        ids, mask = left_pad([row.tokens + row.generated for row in rows], self._pad_id)
        ids, mask = ids.to(lm.device), mask.to(lm.device)
        width = ids.shape[1]
        self.metrics.batch(len(rows))
        last_nfe = 0
        events = stream(lm.model, ids, config=config, attention_mask=mask, decode=self._decode, row_budgets=budgets)
        try:
            for event in events:
                self.metrics.add(nfe=event.nfe - last_nfe)
                last_nfe = event.nfe
                if all(self._cancelled(row) for row in rows):
                    self.metrics.add(batches_stopped=1)
                    return
                if event.done:
                    self._finish(rows, event)
                    return
                if any(row.text is not None for row in rows):
                    self._step(rows, event, width)
        finally:
            events.close()

    def _run_infill(self, rows: list[Row]) -> None:
        """One batch of infill rows (`DiffusionLM.fill_pieces`): padded canvases, every row as it is alone."""
        self.metrics.batch(len(rows))
        seen = {"nfe": 0}
        for row in rows:
            if row.ticket.request.stream:
                row.text = TextStream(lambda t: self._decode(t, skip_special_tokens=True), self._mask_id,
                                      self._stop_ids, ())

        def step(event, mask) -> None:
            self.metrics.add(nfe=event.nfe - seen["nfe"])
            seen["nfe"] = event.nfe
            if all(self._cancelled(row) for row in rows):
                raise _Stopped()
            if not event.done and any(row.text is not None for row in rows):
                self._infill_step(rows, event, mask)

        try:
            texts, output = self.handle.fill_pieces(
                [row.ticket.request.infill[row.index] for row in rows], callback=step,
                config=rows[0].ticket.request.config)
        except _Stopped:
            self.metrics.add(batches_stopped=1)
            return
        for b, row in enumerate(rows):
            if self._cancelled(row):
                continue
            request = row.ticket.request
            kept = output.span_tokens[b]
            row.generated = [t for hole in kept for t in hole]
            row.nfe = int(output.row_nfe[b])
            full = sum(e - s for s, e in output.spans[b])
            text = texts[b] if request.infill_whole else output.fills[b][0]
            self._answer(row, text, "length" if len(row.generated) == full else "stop")

    def _infill_step(self, rows: list[Row], event, mask) -> None:
        """Stream one pass over infill canvases: the text (the gap, or the whole text with its holes) is final up
        to its first position still masked; `illada_stream_canvas` adds the commits (columns of the row's canvas,
        padding left out)."""
        for b, row in enumerate(rows):
            if row.text is None or row.ticket.cancelled:
                continue
            real = mask[b].bool()
            canvas, step_of = event.canvas[b][real].tolist(), event.step_of[b][real].tolist()
            hole = [s >= 0 or t == self._mask_id for t, s in zip(canvas, step_of)]
            request = row.ticket.request
            # the whole text, or just the gap's tokens (insert mode: the one hole)
            shown = canvas if request.infill_whole else [t for t, h in zip(canvas, hole) if h]
            if request.stream_canvas:
                columns = event.committed[b][real].nonzero().flatten().tolist()
                commits = [[c, self._decode([canvas[c]]), event.step] for c in columns]
                update = {"step": event.step, "nfe": event.nfe, "width": len(canvas), "commits": commits}
                if event.step == 0:  # the text around the holes once: token texts, null for a hole
                    update["initial"] = [None if h else self._decode([t]) for t, h in zip(canvas, hole)]
                row.ticket.push(row.index, "canvas", update)
            delta = row.text.update(shown)
            if delta:
                row.ticket.push(row.index, "text", delta)

    def _cancelled(self, row: Row) -> bool:
        if row.ticket.cancelled:
            self._drop(row)
        return row.ticket.cancelled

    def _step(self, rows: list[Row], event, width: int) -> None:
        """Stream one denoising step to the rows that asked for it."""
        fresh = event.canvas[:, width:].tolist()
        for b, row in enumerate(rows):
            if row.text is None or row.ticket.cancelled:
                continue
            generation = row.generated + fresh[b][:row.left]  # past the row's budget: padding
            if row.ticket.request.stream_canvas:
                offset = len(row.generated)
                columns = event.committed[b, width:].nonzero().flatten().tolist()
                commits = [[offset + c, self._decode([fresh[b][c]]), row.steps + event.step] for c in columns]
                row.ticket.push(row.index, "canvas", {"step": row.steps + event.step, "nfe": row.nfe + event.nfe,
                                                      "width": len(generation), "commits": commits})
            delta = row.text.update(generation)
            if delta:
                row.ticket.push(row.index, "text", delta)

    def _finish(self, rows: list[Row], event) -> None:
        """Take in the batch's output: answer finished rows; block-mode rows with budget left go on."""
        output = event.output
        new_tokens = output.generated_tokens()
        budgets = output.budgets.tolist()
        for b, row in enumerate(rows):
            if self._cancelled(row):
                continue
            request = row.ticket.request
            row.nfe += output.nfe
            row.steps += event.step
            row.generated += new_tokens[b]
            # a stop token (cut before it) or the sampler's stop string ended the row before its budget
            stopped = len(new_tokens[b]) < budgets[b]
            row.left -= len(new_tokens[b])
            text, hit = cut_at_stop(self._decode(row.generated, skip_special_tokens=True), request.stop)
            if row.by_block:
                if not (stopped or hit or row.left <= 0):
                    continue  # next block
                if hit:  # count the tokens up to the end of the stop string, as the sampler does
                    row.generated = row.generated[:self._stop_string_end(row.generated, request.stop)]
            self._answer(row, text, "stop" if stopped or hit else "length")

    def _answer(self, row: Row, text: str, finish: str) -> None:
        request = row.ticket.request
        if row.text is not None:
            if request.stream_canvas:
                row.ticket.push(row.index, "canvas", {"done": True, "length": len(row.generated), "nfe": row.nfe})
            delta = row.text.finish(text)
            if delta:
                row.ticket.push(row.index, "text", delta)
        row.finished = True
        self.metrics.finished(len(row.generated))
        row.ticket.push(row.index, "done", RowResult(text, finish, len(row.generated), row.nfe))

    def _stop_string_end(self, tokens: list[int], stop: tuple[str, ...]) -> int:
        """Fewest leading tokens whose text contains a stop string (binary search: the text only grows)."""
        lo, hi = 1, len(tokens)
        while lo < hi:
            mid = (lo + hi) // 2
            if cut_at_stop(self._decode(tokens[:mid], skip_special_tokens=True), stop)[1]:
                hi = mid
            else:
                lo = mid + 1
        return lo
