"""Simulated availability: when a device is online, in wall-clock time (``fedlora simulate``).

A device alternates online and offline sessions whose lengths are exponential (an alternating
renewal process): online sessions last ``mean_session_s`` on average and offline ones
``mean_session_s * (1 - availability) / availability``, so that in the long run the device is
online ``availability`` of the time. The first state is online with probability
``availability`` and its length is exponential too (memoryless), so the fraction holds from
the start, not only in the long run. Each device's sessions come from its own seeded stream:
the same seed and index give the same schedule in every mode, process and worker.

The same model serves both round modes, which is the point: in synchronous rounds the
aggregator samples among the devices online when a round opens (their retained status), and a
selected device that goes offline drops out of the round; in asynchronous rounds a device
trains whenever it is online. Either way an update whose device went offline at any moment
between the start of its training and its sending is lost (the app was closed mid-round); the
device trains again once it is back online, on the newest version.

Pure: times are passed in (unix seconds); the device reads its clock and asks.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import numpy as np

from core.errors import ConfigError

# Schedules cover this many sessions at most per device (a bound on a device.json's size).
MAX_PERIODS = 100_000


@dataclass(frozen=True)
class OnlineSchedule:
    """One device's online periods: ``periods`` as ``(start, end)`` seconds after ``origin``
    (a unix time), sorted and disjoint; the device is offline between them until ``horizon_s``
    after ``origin``, and online from then on (a run that outlives its schedule is not starved)."""

    origin: float
    horizon_s: float
    periods: tuple[tuple[float, float], ...]

    def __post_init__(self) -> None:
        if self.horizon_s <= 0:
            raise ConfigError(f"an online schedule's horizon must be positive, got {self.horizon_s}")
        if len(self.periods) > MAX_PERIODS:
            raise ConfigError(f"an online schedule holds at most {MAX_PERIODS} periods, got {len(self.periods)}")
        last = 0.0
        for start, end in self.periods:
            if not last <= start < end:
                raise ConfigError(f"online periods must be sorted, disjoint and non-empty; ({start}, {end}) is not")
            last = end
        object.__setattr__(self, "_starts", [p[0] for p in self.periods])

    def online_at(self, now: float) -> bool:
        """Whether the device is online at unix time ``now``."""
        t = now - self.origin
        if t >= self.horizon_s:
            return True
        i = bisect.bisect_right(self._starts, t) - 1  # type: ignore[attr-defined]
        return i >= 0 and t < self.periods[i][1]

    def online_throughout(self, since: float, now: float) -> bool:
        """Whether the device was online at every moment from ``since`` to ``now`` (unix times)."""
        if not self.online_at(since):
            return False
        t0, t1 = since - self.origin, now - self.origin
        if t0 >= self.horizon_s:
            return True
        i = bisect.bisect_right(self._starts, t0) - 1  # type: ignore[attr-defined]
        end = self.periods[i][1]
        return t1 < end or (end >= self.horizon_s and t1 >= self.horizon_s)

    def fraction_online(self, start_s: float, end_s: float) -> float:
        """The fraction of ``[start_s, end_s)`` (seconds after ``origin``) the device is online."""
        if end_s <= start_s:
            raise ValueError("empty interval")
        online = sum(max(0.0, min(e, end_s) - max(s, start_s)) for s, e in self.periods)
        online += max(0.0, end_s - max(start_s, self.horizon_s))
        return online / (end_s - start_s)

    def to_dict(self) -> dict:
        """As a device's config holds it (``edge_client.device.DeviceConfig.online_schedule``)."""
        return {"origin": self.origin, "horizon_s": self.horizon_s, "periods": [list(p) for p in self.periods]}

    @classmethod
    def from_dict(cls, values: dict) -> OnlineSchedule:
        try:
            periods = tuple((float(s), float(e)) for s, e in values["periods"])
            return cls(float(values["origin"]), float(values["horizon_s"]), periods)
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(
                f"online_schedule: want origin, horizon_s and periods [[start, end], ...] ({exc})"
            ) from None


def session_schedule(
    index: int, availability: float, mean_session_s: float, horizon_s: float, seed: int, origin: float = 0.0
) -> OnlineSchedule:
    """Device ``index``'s schedule: alternating exponential online and offline sessions (see the
    module docstring), over ``horizon_s`` seconds from ``origin``."""
    if not 0 < availability <= 1:
        raise ConfigError(f"availability must be in (0, 1], got {availability}")
    if mean_session_s <= 0 or horizon_s <= 0:
        raise ConfigError("mean_session_s and horizon_s must be positive")
    if availability == 1:
        return OnlineSchedule(origin, horizon_s, ((0.0, horizon_s),))
    rng = np.random.default_rng([seed, 18, index])
    mean_off = mean_session_s * (1 - availability) / availability
    online = bool(rng.random() < availability)
    t = 0.0
    periods: list[tuple[float, float]] = []
    while t < horizon_s:
        length = float(rng.exponential(mean_session_s if online else mean_off))
        end = min(t + length, horizon_s)
        if online and end > t:
            periods.append((t, end))
        t, online = end, not online
        if len(periods) >= MAX_PERIODS:
            horizon_s = t  # online from here on: the schedule is as long as it may be
            break
    return OnlineSchedule(origin, horizon_s, tuple(periods))
