"""Server counters, shared by the event loop (requests) and the model worker (batches, tokens, NFE); served at
/metrics in the Prometheus text format, or as JSON with `?format=json`."""
from __future__ import annotations

import threading
import time
from collections import Counter, deque

WINDOW_S = 60.0  # tokens/s is measured over the last minute of finished rows


class Metrics:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.started = time.time()
        self._started_monotonic = time.monotonic()
        self.requests: Counter[tuple[str, int]] = Counter()  # (route, status) -> count
        self.rejected = 0  # 429: queue full
        self.timed_out = 0  # rows past the per-request timeout
        self.rows_cancelled = 0  # rows whose client went away (or timed out) before they finished
        self.rows_finished = 0
        self.batches = 0
        self.batch_rows = 0  # rows summed over batches: batch_rows / batches is the mean batch size
        self.max_batch_rows = 0
        self.batches_stopped = 0  # batches ended early because every row was cancelled
        self.generated_tokens = 0
        self.nfe = 0  # forward passes (a batch's pass counts once, whatever its size)
        self.busy_seconds = 0.0  # time the worker spent running batches
        self._recent: deque[tuple[float, int]] = deque()  # (finish time, tokens) of recent rows
        self.queue_depth = lambda: 0  # set by the batcher
        self.active_rows = lambda: 0

    def add(self, **amounts: float) -> None:
        with self._lock:
            for name, amount in amounts.items():
                setattr(self, name, getattr(self, name) + amount)

    def request(self, route: str, status: int) -> None:
        with self._lock:
            self.requests[(route, status)] += 1

    def batch(self, rows: int) -> None:
        with self._lock:
            self.batches += 1
            self.batch_rows += rows
            self.max_batch_rows = max(self.max_batch_rows, rows)

    def finished(self, tokens: int) -> None:
        now = time.monotonic()
        with self._lock:
            self.rows_finished += 1
            self.generated_tokens += tokens
            self._recent.append((now, tokens))

    def tokens_per_second(self) -> float:
        """Generated tokens per second over the last minute."""
        now = time.monotonic()
        with self._lock:
            while self._recent and self._recent[0][0] < now - WINDOW_S:
                self._recent.popleft()
            span = max(min(WINDOW_S, now - self._started_monotonic), 1e-3)
            return sum(t for _, t in self._recent) / span

    def snapshot(self) -> dict:
        tokens_per_second = self.tokens_per_second()
        with self._lock:
            return {
                "uptime_seconds": time.time() - self.started,
                "requests_total": sum(self.requests.values()),
                "requests": {f"{route} {status}": n for (route, status), n in sorted(self.requests.items())},
                "rejected_total": self.rejected,
                "timed_out_total": self.timed_out,
                "rows_finished_total": self.rows_finished,
                "rows_cancelled_total": self.rows_cancelled,
                "batches_total": self.batches,
                "batches_stopped_total": self.batches_stopped,
                "batch_rows_total": self.batch_rows,
                "max_batch_rows": self.max_batch_rows,
                "generated_tokens_total": self.generated_tokens,
                "generated_tokens_per_second": tokens_per_second,
                "nfe_total": self.nfe,
                "busy_seconds_total": self.busy_seconds,
                "queue_depth": self.queue_depth(),
                "active_rows": self.active_rows(),
            }

    def prometheus(self) -> str:
        """The snapshot in the Prometheus text exposition format."""
        snap = self.snapshot()
        lines = []

        def metric(name: str, kind: str, help_text: str, value: float, labels: str = "") -> None:
            if not any(line.startswith(f"# TYPE illada_{name} ") for line in lines):
                lines.append(f"# HELP illada_{name} {help_text}")
                lines.append(f"# TYPE illada_{name} {kind}")
            lines.append(f"illada_{name}{labels} {value:g}" if isinstance(value, float) else
                         f"illada_{name}{labels} {value}")

        with self._lock:
            requests = sorted(self.requests.items())
        for (route, status), n in requests:
            metric("requests_total", "counter", "HTTP requests by route and status", n,
                   f'{{route="{route}",status="{status}"}}')
        if not requests:
            metric("requests_total", "counter", "HTTP requests by route and status", 0)
        docs = {
            "rejected_total": ("counter", "requests refused with 429 because the queue was full"),
            "timed_out_total": ("counter", "rows stopped by the per-request timeout"),
            "rows_finished_total": ("counter", "choice rows generated to the end"),
            "rows_cancelled_total": ("counter", "rows cancelled (client gone or timed out)"),
            "batches_total": ("counter", "batched sampler runs of the model worker (variable length: one per block)"),
            "batches_stopped_total": ("counter", "batches stopped early because all their rows were cancelled"),
            "batch_rows_total": ("counter", "rows summed over batches"),
            "max_batch_rows": ("gauge", "largest batch so far"),
            "generated_tokens_total": ("counter", "generated tokens of finished rows"),
            "generated_tokens_per_second": ("gauge", "generated tokens per second over the last minute"),
            "nfe_total": ("counter", "model forward passes"),
            "busy_seconds_total": ("counter", "seconds the model worker spent generating"),
            "queue_depth": ("gauge", "rows waiting for the model"),
            "active_rows": ("gauge", "rows being generated now"),
            "uptime_seconds": ("gauge", "seconds since the server started"),
        }
        for name, (kind, help_text) in docs.items():
            metric(name, kind, help_text, snap[name])
        return "\n".join(lines) + "\n"
