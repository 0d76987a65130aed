"""Asynchronous rounds (FedBuff, Nguyen et al. 2022, "Federated Learning with Buffered
Asynchronous Aggregation"): a plain state machine like ``server.rounds.Coordinator``, whose
"round" is the buffer of the next global version.

Every online device trains whenever it can, on the latest version it holds, and sends its
change with the version it started from (the envelope's ``base_version``). An update ``s =
version - base_version`` versions behind counts with its change scaled by ``staleness_weight(s)``
and its usual weight (examples, capped); one more than ``max_staleness`` behind is refused
(``too_stale``). After ``buffer_size`` accepted updates (or ``round_timeout`` seconds with at
least ``min_updates``) the buffer is applied: ``Strategy.finalize`` (one server optimizer step)
makes the next version, and the next buffer opens at once.

The math. The aggregator hands a strategy full local tensors: ``current + w_s * delta`` for
an update with change ``delta`` computed against an older version, where ``current`` is the
global it holds now. For the strategies whose aggregate is a weighted mean of the factors the
new global is then ``current + sum_i n_i w_i delta_i / sum_i n_i``: FedBuff's server step
``(1/K) sum_i s(tau_i) delta_i`` with example weights in place of ``1/K`` (the server
optimizer's rate ``server_lr`` is its ``eta_g``). Staleness weights scale the change, not the
weight, so a buffer of equally stale updates moves the global less than a fresh one.

Which strategies compose: those whose global evolves by averaging the factors (``fedavg``,
``ffa-lora``, ``fedsa-lora``, ``hetlora`` with its zero-padding). Those that refactor or fold
each version (``flexlora``, ``flexlora-delta``, ``flora``, ``fedex-lora``) say why not in their
``async_unsupported``, and the configuration is refused (``check_async``). So are differential
privacy (its accountant counts sampled rounds, and devices would not be sampled), secure
aggregation (masks cancel within one round's set of devices) and robust aggregation other
than ``mean`` (not yet validated on buffers).

Protocol: the announcement of an async job is version 2 with ``mode: async``, open whenever a
buffer is, with no selection (every device of the job may train) and the current version as
``global_version`` (docs/protocol.md).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from core.errors import ConfigError, UpdateRejected
from server.rounds import Accepted, Bounded, Coordinator, OpenRound, RoundOutcome, RoundSettings
from server.strategies.base import ClientUpdate

ASYNC = "async"
# The RoundSettings fields of async rounds (``fedlora simulate`` has a flag for each).
ASYNC_SETTINGS = (
    "mode",
    "buffer_size",
    "staleness_weighting",
    "staleness_exponent",
    "staleness_hinge",
    "max_staleness",
)


def staleness_weight(staleness: int, weighting: str, exponent: float, hinge: int) -> float:
    """How much the change of an update ``staleness`` versions behind counts (1: fully).

    ``polynomial``: ``(1 + s) ** -exponent`` (FedBuff's ``1 / sqrt(1 + s)`` at 0.5);
    ``hinge``: 1 while ``s <= hinge``, then ``1 / (1 + exponent * (s - hinge))`` (Xie et al.
    2019, FedAsync); ``constant``: 1."""
    if staleness < 0:
        raise ValueError(f"staleness {staleness} is negative")
    if weighting == "constant":
        return 1.0
    if weighting == "polynomial":
        return float((1.0 + staleness) ** -exponent)
    if weighting == "hinge":
        return 1.0 if staleness <= hinge else 1.0 / (1.0 + exponent * (staleness - hinge))
    raise ValueError(f"unknown staleness weighting {weighting!r}")


def settings_weight(settings: RoundSettings, staleness: int) -> float:
    return staleness_weight(
        staleness, settings.staleness_weighting, settings.staleness_exponent, settings.staleness_hinge
    )


def check_async(
    settings: RoundSettings, strategy: str, async_unsupported: str, privacy: bool, robust: str, secure: bool = False
) -> None:
    """Refuse, at configuration time, what async rounds cannot do (see the module docstring)."""
    if settings.mode != ASYNC:
        return
    if secure:
        raise ConfigError(
            "rounds.mode async does not work with secure_aggregation: its masks cancel only in the sum of "
            "one round's devices, which all start from the same version; use rounds.mode sync"
        )
    if async_unsupported:
        raise ConfigError(
            f"rounds.mode async cannot use strategy {strategy}: {async_unsupported}; "
            "use fedavg, ffa-lora, fedsa-lora or hetlora, or rounds.mode sync"
        )
    if privacy:
        raise ConfigError(
            "rounds.mode async does not work with privacy: the accountant counts sampled rounds of "
            "devices that start from the same version; use rounds.mode sync"
        )
    if robust != "mean":
        raise ConfigError(f"rounds.mode async supports robust.method mean only, not {robust!r}")


def buffer_summary(outcome: RoundOutcome) -> dict:
    """The history row's async fields: the updates in the buffer and their staleness."""
    s = outcome.staleness
    return {
        "version": outcome.round,
        "buffer_updates": len(s),
        "staleness_mean": round(float(np.mean(s)), 4) if s else 0.0,
        "staleness_max": int(max(s)) if s else 0,
    }


class AsyncCoordinator(Coordinator):
    """The Coordinator of async rounds: the open "round" is the buffer of the next version
    (round id = that version), open to every device; see the module docstring."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._opened: OpenRound | None = None  # a buffer opened by maybe_close, for maybe_open to report

    def expects_update_from(self, device: str) -> bool:
        return self.open is not None

    def starts_from(self, base_version: int) -> bool:
        return 0 <= self.version - base_version <= self.settings.max_staleness

    def resume(self, state: OpenRound, replay: Iterable[Accepted] = ()) -> None:
        """Re-install a buffer persisted before a restart. The aggregator commits async buffers
        whole (``Aggregator.commit_batch``): a logged update would lack its staleness."""
        if list(replay):
            raise ValueError(f"buffer {state.round}: logged updates to replay; async buffers are committed whole")
        super().resume(state)

    # -- buffers -------------------------------------------------------------------------
    def _new_buffer(self, contributed: dict[str, int]) -> OpenRound:
        online = self.online()
        now = self.clock()
        self.open = OpenRound(
            self.next_round,
            [],
            now,
            now + self.settings.round_timeout,
            self.version,
            partial=self.strategy.new_partial(),
            max_weight=self.weight_cap(online),
            max_norm=self.norm_cap(len(online)),
            contributed=dict(contributed),
        )
        self.next_round += 1
        return self.open

    def maybe_open(self) -> OpenRound | None:
        """The buffer opened since the last call, if any. The first buffer waits for
        ``min_devices``; later ones open as soon as the previous one is applied."""
        if self._opened is not None:
            opened, self._opened = self._opened, None
            return opened
        if self.open is not None or self.finished:
            return None
        if self.next_round == 1 and len(self.online()) < self.settings.min_devices:
            return None
        return self._new_buffer({})

    # -- updates -------------------------------------------------------------------------
    def judge(self, job: str, update: ClientUpdate, base_version: int | None = None) -> Bounded:
        """Raise UpdateRejected unless the update may go into the buffer; else the update with
        its change clipped (``bounded``) and scaled by its staleness weight."""
        rnd = self.open
        if job != self.job:
            raise UpdateRejected("wrong_job", f"update for job {job!r}, this aggregator runs {self.job!r}")
        if rnd is None:
            raise UpdateRejected(
                "no_open_round", f"round {update.round} from {update.device} arrived while no buffer is open"
            )
        if update.round > rnd.round:
            raise UpdateRejected("future_round", f"update for round {update.round}, the open buffer is {rnd.round}")
        last = rnd.contributed.get(update.device)
        if last is not None and update.round <= last:
            raise UpdateRejected("duplicate", f"device {update.device} already contributed its round {last}")
        base = update.round - 1 if base_version is None else base_version
        staleness = self.version - base
        if staleness < 0 or base >= update.round:
            raise UpdateRejected(
                "wrong_base", f"update of round {update.round} starts from version {base}; the latest is {self.version}"
            )
        if staleness > self.settings.max_staleness:
            raise UpdateRejected(
                "too_stale",
                f"update starts from version {base}, {staleness} versions behind {self.version} "
                f"(at most {self.settings.max_staleness}); train on the latest version",
            )
        self.strategy.check(update)
        bounded = self.bounded(update)
        weight = settings_weight(self.settings, staleness)
        kept = bounded.update
        if weight != 1.0:
            factor = np.float32(weight)
            kept = ClientUpdate(
                kept.device, kept.round, kept.rank, kept.num_examples, {k: v * factor for k, v in kept.tensors.items()}
            )
        return Bounded(kept, bounded.norm, bounded.clipped, bounded.weight_capped, staleness, weight)

    def savepoint(self) -> Callable[[], None]:
        """An undo back to the buffer as it is now (with its staleness and contributions)."""
        rnd = self.open
        assert rnd is not None
        undo_round = super().savepoint()
        before = (list(rnd.staleness), dict(rnd.contributed))

        def undo() -> None:
            undo_round()
            rnd.staleness, rnd.contributed = before

        return undo

    def add(self, update: ClientUpdate, norm: float = 0.0, staleness: int = 0) -> Accepted:
        """Add a judged update to the buffer (no undo), with its staleness."""
        rnd = self.open
        assert rnd is not None
        rnd.partial = self.strategy.accumulate(rnd.partial, update)
        # A device may have two updates in one buffer (a stale one, then one from the latest version).
        rnd.accepted[f"{update.device}/{update.round}"] = update.num_examples
        rnd.norms.append(norm)
        rnd.staleness.append(staleness)
        rnd.contributed[update.device] = update.round
        return Accepted(len(rnd.accepted), update, norm)

    def buffer_full(self) -> bool:
        return self.open is not None and len(self.open.accepted) >= self.settings.buffer_size

    # -- applying the buffer -------------------------------------------------------------
    def maybe_close(self) -> RoundOutcome | None:
        """Apply the buffer when it holds ``buffer_size`` updates, or at its deadline with at
        least ``min_updates``; the next buffer opens in the same step (the state saved with the
        new version holds it, and the devices' last contributions with it)."""
        rnd = self.open
        if rnd is None:
            return None
        now = self.clock()
        count = len(rnd.accepted)
        full = count >= self.settings.buffer_size
        if not full and not (now >= rnd.deadline and count >= self.settings.min_updates):
            return None
        median_norm = float(np.median(rnd.norms)) if rnd.norms else 0.0
        self.open = None
        self.completed += 1
        self.version = rnd.round
        self.median_norm = median_norm or self.median_norm
        if not self.finished:
            self._opened = self._new_buffer(rnd.contributed)
        return RoundOutcome(
            rnd.round,
            True,
            "buffer_full" if full else "buffer_deadline",
            [],
            dict(rnd.accepted),
            rnd.partial,
            now - rnd.opened_at,
            median_norm,
            1.0,
            list(rnd.norms),
            list(rnd.staleness),
        )
