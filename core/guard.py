"""Containment helpers shared by the device and the aggregator: per-sender rate limits, refusal
counts and throttled logs, so one noisy or hostile peer costs the process a bounded amount of
work and log volume, never its life.
"""

from __future__ import annotations

import logging
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass


@dataclass
class TokenBucket:
    """``rate`` tokens a second up to ``burst``; ``take(n)`` spends n if there are that many."""

    rate: float
    burst: float
    tokens: float = -1.0
    stamp: float = 0.0

    def take(self, n: float, now: float) -> bool:
        if self.tokens < 0:
            self.tokens, self.stamp = self.burst, now
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if n > self.tokens:
            return False
        self.tokens -= n
        return True


class SenderLimits:
    """A message budget and a byte budget per sender (token buckets), for at most
    ``max_senders`` senders at a time (least recently seen forgotten first: a forgotten sender
    starts again with a full bucket, which is what a new sender gets anyway).

    A rate of 0 turns that budget off.
    """

    def __init__(
        self,
        messages_per_s: float,
        message_burst: float,
        bytes_per_s: float,
        byte_burst: float,
        max_senders: int = 100_000,
        clock=time.monotonic,
    ):
        self.messages_per_s, self.message_burst = messages_per_s, message_burst
        self.bytes_per_s, self.byte_burst = bytes_per_s, byte_burst
        self.max_senders = max_senders
        self.clock = clock
        self._buckets: OrderedDict[str, tuple[TokenBucket, TokenBucket]] = OrderedDict()

    def allow(self, sender: str, nbytes: int) -> bool:
        """True if ``sender`` may send one more message of ``nbytes`` now (and charge it)."""
        now = self.clock()
        buckets = self._buckets.get(sender)
        if buckets is None:
            buckets = self._buckets[sender] = (
                TokenBucket(self.messages_per_s, self.message_burst),
                TokenBucket(self.bytes_per_s, self.byte_burst),
            )
            if len(self._buckets) > self.max_senders:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(sender)
        messages, data = buckets
        if self.messages_per_s and not messages.take(1, now):
            return False
        return not self.bytes_per_s or data.take(nbytes, now)


class Refusals:
    """Counts refused messages by (kind, reason) and logs each pair at most once per
    ``log_every_s`` (with how many were suppressed), so a flood cannot flood the log."""

    def __init__(self, log: logging.Logger, log_every_s: float = 10.0, clock=time.monotonic):
        self.log = log
        self.log_every_s = log_every_s
        self.clock = clock
        self.counts: Counter[tuple[str, str]] = Counter()
        self._last_log: dict[tuple[str, str], tuple[float, int]] = {}

    def refuse(self, kind: str, reason: str, detail: str, unexpected: bool = False) -> None:
        key = (kind, reason)
        self.counts[key] += 1
        now = self.clock()
        last, suppressed_at = self._last_log.get(key, (-float("inf"), 0))
        if now - last < self.log_every_s:
            return
        suppressed = self.counts[key] - suppressed_at - 1
        self._last_log[key] = (now, self.counts[key])
        more = f" ({suppressed} more since the last such line)" if suppressed > 0 else ""
        if unexpected:
            self.log.error("refused a %s message (%s): %s%s", kind, reason, detail[:300], more, exc_info=True)
        else:
            self.log.warning("refused a %s message (%s): %s%s", kind, reason, detail[:300], more)
