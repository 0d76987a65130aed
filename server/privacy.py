"""Client-level differential privacy (DP-FedAvg) on the aggregator: the clip bound, the noise,
and the privacy spent, tracked by Google's ``dp-accounting`` (RDP accountant).

McMahan, Ramage, Talwar and Zhang, "Learning Differentially Private Recurrent Language Models"
(ICLR 2018): every device's change is clipped to L2 norm ``C`` (on the device, before it is
encoded, and again by the aggregator's norm bound, so a device that does not clip cannot break
the bound), each accepted update counts once (weight 1, never its example count: that would
let one device's share grow unbounded), and the sum gets Gaussian noise of standard deviation
``z * C`` per coordinate before it is divided by the number of updates. Adjacent data sets are
those that differ in *one device's entire data*: what the guarantee hides is whether a device
took part, and what it trained on.

* ``central``: the aggregator adds all the noise (it sees the clipped updates in the clear).
* ``distributed``: each of the K selected devices adds noise of std ``z * C / sqrt(K)`` to its
  clipped update, so the sum of K of them carries ``z * C``; the aggregator tops the noise up
  for devices that did not report (variance ``(1 - m / K) (z C)^2`` with m updates), so the
  guarantee on the released adapter is the same. Only with secure aggregation (the aggregator
  sees the sum alone) does this also protect a device's update from the aggregator; without it
  each update carries just ``1 / sqrt(K)`` of the noise.
* ``adaptive_clip`` (Andrew, Thakkar, McMahan and Ramaswamy, "Differentially Private Learning
  with Adaptive Clipping", NeurIPS 2021): each device reports whether its change was within
  ``C`` (metric ``dp_below_clip``); the aggregator takes the noisy fraction
  ``b = (sum_i b_i + N(0, sigma_b^2)) / m`` and sets ``C <- C * exp(-eta (b - gamma))``, which
  tracks the ``gamma`` quantile of the norms. The bits cost privacy too: the update noise uses
  ``z_delta = (z^-2 - (2 sigma_b)^-2)^-1/2`` so that both releases together are a Gaussian
  mechanism of multiplier ``z`` (their Theorem 1); this needs ``2 sigma_b > z``.

Accounting. Each completed round is a Poisson-subsampled Gaussian mechanism
(``PoissonSampledDpEvent(q, GaussianDpEvent(z))``) with ``q`` the round's sampling rate
(``devices_per_round`` over the devices online), and the selection is that sampling: each online
device independently with probability ``q``, from the operating system's generator
(``server.rounds.Coordinator.select``). A fixed-size sample accounted as Poisson, as DP-FL code
often does, understates epsilon: the analysis that fits it (sampling without replacement,
replace-one, where the sum's sensitivity is 2C) gives epsilon 97 where Poisson gives 7.9 (150 of
1,780 devices, z 0.72, 25 rounds). The RDP accountant composes the rounds; epsilon at
``delta`` is in every round's history row (``dp_epsilon``), in ``/metrics``
(``fedlora_dp_epsilon``), and a job whose configured rounds would exceed ``epsilon_budget``
refuses to start, and one that runs forever stops when the next round would exceed it.

What amplification by sampling assumes: that whoever tries to learn about a device does not
know whether it was selected. The round announcement names the selected devices, so that holds
for users of the published adapter but not for a device reading the announcements:
``dp_epsilon_every_round`` (q = 1, every round counted: a device selected every time) is the
bound against them, and ``accounting: every_round`` makes the budget apply to it.

Which strategies. The mechanism needs the aggregated terms to be linear in each update with a
bounded weight: FedAvg, FFA-LoRA, FedSA-LoRA (A only), HetLoRA with ``weighting: examples``.
FFA-LoRA (A frozen, only B trained and noised) avoids the noise amplification that averaging
two noised factors causes (their product carries noise x noise terms; Sun et al., "Improving
LoRA in Privacy-preserving Federated Learning", ICLR 2024). Strategies that sum products
``B_i A_i`` (FlexLoRA, FLoRA, FedEx-LoRA) or weigh by the update itself (HetLoRA's sparsity
weights) have no sensitivity ``C`` on what they sum and are refused.

Not covered. Floating-point Gaussian sampling is not the exact mechanism the proofs assume
(Mironov, "On Significance of the Least Significant Bits for Differential Privacy", CCS
2012): the guarantee is that of the ideal mechanism, as in every DP-FL library. Evaluation
metrics the devices report (loss, accuracy) are not privatized; the number of accepted
updates per round is published.
"""

from __future__ import annotations

import logging
import math
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from core.errors import ConfigError
from core.messages import BELOW_CLIP_METRIC
from server.strategies.base import Partial

log = logging.getLogger("fedlora.privacy")

DP_MODES = ("none", "central", "distributed")  # not "off": YAML reads an unquoted off as false
ACCOUNTING = ("sampled", "every_round")
DP_STRATEGIES = ("fedavg", "ffa-lora", "fedsa-lora", "hetlora")


@dataclass
class PrivacySettings:
    """Client-level DP (``privacy`` in the server config); off by default.

    mode: ``none``, ``central`` (the aggregator adds the noise) or ``distributed`` (the devices do).
    noise_multiplier: z: the noise on the sum of the clipped updates has std ``z * clip_norm``.
    clip_norm: C, the L2 bound of a device's change (the first round's, with ``adaptive_clip``).
    adaptive_clip: track the ``target_quantile`` of the update norms (Andrew et al. 2021).
    target_quantile / clip_learning_rate: gamma and eta of the geometric update of C.
    clip_count_stddev: sigma_b, the noise on the count of devices within the bound (0: the
        paper's default, the expected devices per round / 20, at least z).
    delta: the delta at which epsilon is reported.
    epsilon_budget: the job refuses to start when its rounds would exceed it, and stops before
        a round that would (0: none, epsilon is only reported).
    accounting: ``sampled`` (amplification by the round's sampling rate) or ``every_round``
        (q = 1: the bound against a device that reads the announcements) for the budget.
    """

    mode: str = "none"
    noise_multiplier: float = 1.0
    clip_norm: float = 0.1
    adaptive_clip: bool = False
    target_quantile: float = 0.5
    clip_learning_rate: float = 0.2
    clip_count_stddev: float = 0.0
    delta: float = 1e-5
    epsilon_budget: float = 0.0
    accounting: str = "sampled"

    def __post_init__(self) -> None:
        if self.mode not in DP_MODES:
            raise ConfigError(f"privacy.mode must be one of {', '.join(DP_MODES)}, not {self.mode!r}")
        if self.accounting not in ACCOUNTING:
            raise ConfigError(f"privacy.accounting must be one of {', '.join(ACCOUNTING)}, not {self.accounting!r}")
        if not 0 < self.noise_multiplier <= 1000:
            raise ConfigError(f"privacy.noise_multiplier must be in (0, 1000], got {self.noise_multiplier}")
        if not 0 < self.clip_norm <= 1e6:
            raise ConfigError(f"privacy.clip_norm must be in (0, 1e6], got {self.clip_norm}")
        if not 0 < self.target_quantile < 1:
            raise ConfigError(f"privacy.target_quantile must be in (0, 1), got {self.target_quantile}")
        if not 0 < self.clip_learning_rate <= 10:
            raise ConfigError(f"privacy.clip_learning_rate must be in (0, 10], got {self.clip_learning_rate}")
        if self.clip_count_stddev < 0:
            raise ConfigError(f"privacy.clip_count_stddev must be >= 0 (0: the default), got {self.clip_count_stddev}")
        if self.clip_count_stddev and self.adaptive_clip and 2 * self.clip_count_stddev <= self.noise_multiplier:
            raise ConfigError(
                f"privacy.clip_count_stddev {self.clip_count_stddev} must exceed noise_multiplier / 2 "
                f"({self.noise_multiplier / 2:g}): the clip-count noise is part of the privacy budget"
            )
        if not 0 < self.delta < 0.1:
            raise ConfigError(f"privacy.delta must be in (0, 0.1), got {self.delta}")
        if self.epsilon_budget < 0:
            raise ConfigError(f"privacy.epsilon_budget must be >= 0 (0: none), got {self.epsilon_budget}")

    @property
    def enabled(self) -> bool:
        return self.mode != "none"

    def count_stddev(self, expected_devices: int) -> float:
        """sigma_b: as configured, else the paper's ``expected devices / 20``, at least z (so
        that ``2 sigma_b > z`` and the update noise grows by at most 1 / sqrt(3 / 4))."""
        if self.clip_count_stddev:
            return self.clip_count_stddev
        return max(expected_devices / 20.0, self.noise_multiplier)

    def update_noise_multiplier(self, expected_devices: int) -> float:
        """z_delta: the multiplier of the noise on the updates (z itself without adaptive clipping)."""
        z = self.noise_multiplier
        if not self.adaptive_clip:
            return z
        sigma_b = self.count_stddev(expected_devices)
        return (z**-2 - (2 * sigma_b) ** -2) ** -0.5


def check_privacy(settings: PrivacySettings, strategy: str, strategy_settings: Mapping[str, Any], robust: str) -> None:
    """Refuse DP with a strategy or robust method that breaks its sensitivity bound."""
    if not settings.enabled:
        return
    if strategy not in DP_STRATEGIES or (strategy == "hetlora" and strategy_settings.get("weighting") != "examples"):
        raise ConfigError(
            f"privacy.mode {settings.mode} needs a strategy whose sums are linear in each update "
            f"({', '.join(DP_STRATEGIES)}; hetlora with weighting: examples), not {strategy}"
            + (f" with weighting {strategy_settings.get('weighting')}" if strategy == "hetlora" else "")
        )
    if robust != "mean":
        raise ConfigError(f"privacy.mode {settings.mode} adds noise to the sum; robust.method {robust} has no such sum")


# -- accounting ----------------------------------------------------------------------------
def _dp_event(q: float, z: float):
    import dp_accounting  # checked by accountant_available(), before a job starts

    gaussian = dp_accounting.GaussianDpEvent(z)
    return gaussian if q >= 1 else dp_accounting.PoissonSampledDpEvent(q, gaussian)


def epsilon(rounds: Mapping[tuple[float, float], int] | list[tuple[float, float]], delta: float) -> float:
    """Epsilon at ``delta`` of the composition of Poisson-subsampled Gaussian rounds, given as
    ``(sampling rate q, noise multiplier z)`` pairs (or pair -> count), by dp-accounting's RDP
    accountant; 0 for no rounds."""
    from dp_accounting.rdp import RdpAccountant

    counts: dict[tuple[float, float], int] = {}
    for pair, n in rounds.items() if isinstance(rounds, Mapping) else ((r, 1) for r in rounds):
        counts[pair] = counts.get(pair, 0) + n
    if not counts:
        return 0.0
    accountant = RdpAccountant()
    absl = logging.getLogger("absl")
    level = absl.level
    absl.setLevel(logging.ERROR)  # orders that do not converge are skipped, each with a warning
    try:
        for (q, z), n in counts.items():
            accountant.compose(_dp_event(q, z), n)
        return float(accountant.get_epsilon(delta))
    finally:
        absl.setLevel(level)


def rounds_within(budget: float, q: float, z: float, delta: float, limit: int = 100_000) -> int:
    """The most rounds at ``(q, z)`` whose epsilon stays within ``budget`` (at most ``limit``)."""
    if epsilon({(q, z): 1}, delta) > budget:
        return 0
    if epsilon({(q, z): limit}, delta) <= budget:
        return limit
    lo, hi = 1, limit  # epsilon(lo) <= budget < epsilon(hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if epsilon({(q, z): mid}, delta) <= budget else (lo, mid)
    return lo


def planned_sampling_rate(devices_per_round: int, min_devices: int) -> float:
    """The largest sampling rate a round can have: ``devices_per_round`` of the fewest devices
    a round opens with (1 when every online device is selected)."""
    if not devices_per_round:
        return 1.0
    return min(1.0, devices_per_round / max(min_devices, devices_per_round))


def accountant_available() -> None:
    """Refuse DP when the accountant library is missing (the ``[server]`` extra installs it)."""
    try:
        import dp_accounting.rdp  # noqa: F401
    except ImportError as exc:
        raise ConfigError(f"privacy needs Google's dp-accounting (pip install 'fedlora[server]'): {exc}") from None


def check_budget(settings: PrivacySettings, rounds: int, devices_per_round: int, min_devices: int) -> None:
    """Refuse a job whose planned rounds would exceed the budget (at the largest possible
    sampling rate; rounds 0, run forever, stops at the budget instead)."""
    if not settings.enabled:
        return
    accountant_available()
    if not settings.epsilon_budget or not rounds:
        return
    q = 1.0 if settings.accounting == "every_round" else planned_sampling_rate(devices_per_round, min_devices)
    planned = epsilon({(q, settings.noise_multiplier): rounds}, settings.delta)
    if planned > settings.epsilon_budget:
        fit = rounds_within(settings.epsilon_budget, q, settings.noise_multiplier, settings.delta, rounds)
        raise ConfigError(
            f"privacy: {rounds} rounds at sampling rate {q:.3g} and noise multiplier {settings.noise_multiplier:g} "
            f"spend epsilon {planned:.3g} at delta {settings.delta:g}, over the budget {settings.epsilon_budget:g}; "
            f"{fit} rounds fit (or raise noise_multiplier, or select fewer of more devices per round)"
        )


# -- the aggregator's side -----------------------------------------------------------------
@dataclass
class RoundNoise:
    """What one round's privacy step did, for its history row."""

    clip: float
    next_clip: float
    noise_multiplier: float
    noise_std: float
    below_clip: float | None  # the noisy fraction of updates within the clip (adaptive only)


class DifferentialPrivacy:
    """The aggregator's DP state: the clip bound of the next round, the rounds spent, the noise.

    history: the job's round history (rows written by ``record``), from which a restarted
        aggregator takes the spent rounds and the current clip bound.
    values: how many values an update holds at most (the adapter's size): under
        ``distributed`` the aggregator's norm bound leaves room for the devices' noise.
    rng: the noise's generator (default: seeded from the operating system).
    """

    def __init__(
        self,
        settings: PrivacySettings,
        history: list[dict],
        values: int = 0,
        rng: np.random.Generator | None = None,
    ):
        if not settings.enabled:
            raise ConfigError("DifferentialPrivacy needs privacy.mode central or distributed")
        if settings.mode == "distributed" and values < 1:
            raise ConfigError("distributed DP needs the number of values an update holds")
        self.settings = settings
        self.values = values
        self.rng = rng or np.random.default_rng(secrets.randbits(128))
        self.spent: dict[tuple[float, float], int] = {}
        self.clip = settings.clip_norm
        for row in history:
            if row.get("ok") and "dp_sampling_rate" in row:
                self._spend(float(row["dp_sampling_rate"]))
                self.clip = float(row.get("dp_next_clip", self.clip))

    def _spend(self, q: float) -> None:
        key = (q, self.settings.noise_multiplier)
        self.spent[key] = self.spent.get(key, 0) + 1

    def epsilons(self, extra_q: float | None = None) -> tuple[float, float]:
        """(sampled, every_round) epsilon of the rounds spent (and one more at ``extra_q``)."""
        s = self.settings
        spent = dict(self.spent)
        if extra_q is not None:
            spent[(extra_q, s.noise_multiplier)] = spent.get((extra_q, s.noise_multiplier), 0) + 1
        every = {(1.0, s.noise_multiplier): sum(spent.values())} if spent else {}
        return epsilon(spent, s.delta), epsilon(every, s.delta)

    def refuses(self, selected: int, online: int) -> str:
        """Why a round of ``selected`` devices out of ``online`` must not open ('' : it may)."""
        budget = self.settings.epsilon_budget
        if not budget:
            return ""
        s = self.settings
        spent_rounds = dict(self.spent)
        q = 1.0 if s.accounting == "every_round" else selected / online
        if s.accounting == "every_round":
            spent_rounds = {(1.0, s.noise_multiplier): sum(spent_rounds.values())}
        spent_rounds[(q, s.noise_multiplier)] = spent_rounds.get((q, s.noise_multiplier), 0) + 1
        spent = epsilon(spent_rounds, s.delta)
        if spent > budget:
            return f"privacy budget: another round would spend epsilon {spent:.3g} > {budget:g}"
        return ""

    def norm_bound(self, selected: int) -> float:
        """The aggregator's bound on an update as sent: the clip C under ``central``; under
        ``distributed`` C plus what the device's noise adds, ``std * (sqrt(values) + 8)`` (the
        norm of d Gaussian values is about ``std * sqrt(d)``, with spread ``std / sqrt(2)``), so
        that honest noise is never clipped away, which would leave less noise than accounted."""
        return self.clip + self.device_noise_std(selected) * (math.sqrt(self.values) + 8.0)

    def device_noise_std(self, selected: int) -> float:
        """What each device adds under ``distributed``: std ``z_delta * C / sqrt(K)``."""
        if self.settings.mode != "distributed":
            return 0.0
        return self.settings.update_noise_multiplier(selected) * self.clip / math.sqrt(max(1, selected))

    def noised(
        self, partial: Partial, linear: set[str], selected: int, below: list[float]
    ) -> tuple[Partial, RoundNoise]:
        """The round's partial with Gaussian noise on the sums in ``linear`` (the update's own
        tensors), and the next clip bound from the devices' ``below`` bits (adaptive)."""
        s = self.settings
        z = s.update_noise_multiplier(selected)
        full = z * self.clip
        if s.mode == "distributed":  # the devices' noise: each of the m updates carried 1/K of the variance
            full *= math.sqrt(max(0.0, 1.0 - partial.count / max(1, selected)))
        sums = dict(partial.sums)
        for key in sorted(linear):
            if key in sums and full > 0:
                sums[key] = sums[key] + self.rng.normal(0.0, full, np.shape(sums[key]))
        next_clip, fraction = self.clip, None
        if s.adaptive_clip and partial.count:
            noisy = sum(below) + self.rng.normal(0.0, s.count_stddev(selected))
            fraction = float(noisy / partial.count)
            next_clip = float(self.clip * math.exp(-s.clip_learning_rate * (fraction - s.target_quantile)))
        out = Partial(sums, partial.weight, partial.count, list(partial.devices))
        return out, RoundNoise(self.clip, next_clip, z, full, fraction)

    def record(self, q: float, noise: RoundNoise) -> dict:
        """Spend the round and return its history fields (the accountant's epsilons included)."""
        self._spend(q)
        self.clip = noise.next_clip
        sampled, every = self.epsilons()
        row = {
            "dp_sampling_rate": q,
            "dp_noise_multiplier": self.settings.noise_multiplier,
            "dp_update_noise_multiplier": round(noise.noise_multiplier, 6),
            "dp_clip": noise.clip,
            "dp_next_clip": noise.next_clip,
            "dp_epsilon": round(sampled, 6),
            "dp_epsilon_every_round": round(every, 6),
            "dp_delta": self.settings.delta,
        }
        if noise.below_clip is not None:
            row["dp_below_clip"] = round(noise.below_clip, 6)
        return row


def below_clip_bits(metrics: list[dict], norms: list[float], clip: float) -> list[float]:
    """Each accepted update's ``dp_below_clip`` bit as reported (clamped to 0 or 1), or, when a
    device did not report it, whether its change as sent was within ``clip``."""
    bits = []
    for m, norm in zip(metrics, norms):
        value = m.get(BELOW_CLIP_METRIC)
        bits.append(float(value >= 0.5) if isinstance(value, (int, float)) else float(norm < clip))
    return bits


def linear_keys(strategy_sums: Mapping[str, np.ndarray]) -> set[str]:
    """The sums that are (weighted) update tensors, not strategy terms like ``module:weight``."""
    return {k for k in strategy_sums if ":" not in k}
