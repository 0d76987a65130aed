"""Server optimizers: what the aggregator does with a round's aggregated change.

Sashank J. Reddi, Zachary Charles, Manzil Zaheer, Zachary Garrett, Keith Rush, Jakub Konečný,
Sanjiv Kumar and H. Brendan McMahan, "Adaptive Federated Optimization", ICLR 2021 (FedAdam,
FedYogi, FedAdagrad); Tzu-Ming Harry Hsu, Hang Qi and Matthew Brown, "Measuring the Effects of
Non-Identical Data Distribution for Federated Visual Classification", 2019 (FedAvgM).

Every strategy computes, for each quantity it aggregates, a *target* (the devices' weighted
mean of A, B or the head; the mean product of FlexLoRA; the change FLoRA and FedEx-LoRA fold
into frozen weights). The difference from the current global, ``delta = target - x``, is the
round's pseudo-gradient (its negative, in the paper's sign). The optimizer turns it into the
step the global takes, per entry, with t the number of rounds this optimizer has stepped:

    sgd:         x += lr * delta                       (lr 1: the strategy's plain result)
    fedavgm:     m = momentum * m + delta;             x += lr * m
    fedadam:     m = b1 m + (1 - b1) delta;   v = b2 v + (1 - b2) delta^2
    fedyogi:     m as fedadam;                v = v - (1 - b2) delta^2 sign(v - delta^2)
    fedadagrad:  m = delta;                   v = v + delta^2
    adaptive:    x += lr * mhat / (sqrt(vhat) + tau),  mhat = m / (1 - b1^t), vhat = v / (1 - b2^t)
                 (fedadagrad: no correction)

Moments start at zero and the bias correction follows Adam (and Flower's implementations), so
the first adaptive step moves each entry by about ``lr`` in the direction of its change:
``lr`` is a per-entry step size (compare the devices' AdamW rate times their local steps),
not a fraction of the change as under sgd. ``tau`` keeps entries whose change is far below it
from taking full steps. A quantity whose moment is new (its first round, or a tensor a
strategy starts aggregating later) starts from zero moments at the optimizer's current t.

The state (the moments by name and t) is plain arrays and a number: ``state()`` /
``load_state()``; the aggregator stores it with the global adapter (``server.store``) so a
restarted aggregator continues exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from core.errors import ConfigError
from server.strategies.settings import Range, StrategySettings, setting

OPTIMIZERS = ("sgd", "fedavgm", "fedadam", "fedyogi", "fedadagrad")
ADAPTIVE = ("fedadam", "fedyogi", "fedadagrad")
# server_lr 0 means this: a fraction of the change for sgd / fedavgm, a per-entry step for the
# adaptive ones (the devices' AdamW moves an entry up to lr * local_steps a round: 0.02 to 0.04
# with the aggregator's and the simulator's defaults).
DEFAULT_LR = {"sgd": 1.0, "fedavgm": 1.0, "fedadam": 0.01, "fedyogi": 0.01, "fedadagrad": 0.01}


@dataclass(frozen=True)
class ServerOptimizerSettings(StrategySettings):
    """The server optimizer's settings; every strategy's ``Settings`` includes them."""

    server_optimizer: str = setting(
        "sgd",
        choices=OPTIMIZERS,
        help="server optimizer applied to each round's aggregated change: sgd (lr 1: the strategy's "
        "plain result), fedavgm, fedadam, fedyogi or fedadagrad (Reddi et al. 2021)",
    )
    server_lr: float = setting(
        0.0,
        range=Range(0.0, 10.0),
        help="server learning rate (0: the optimizer's default, 1 for sgd and fedavgm, 0.01 for the "
        "adaptive ones, which take per-entry steps of about this size)",
    )
    server_momentum: float = setting(
        0.5,
        range=Range(0.0, 1.0, hi_open=True),
        help="fedavgm's momentum: m = momentum * m + change, global += server_lr * m",
    )
    server_beta1: float = setting(
        0.9,
        range=Range(0.0, 1.0, hi_open=True),
        help="fedadam and fedyogi: decay of the first moment (the mean change)",
    )
    server_beta2: float = setting(
        0.99,
        range=Range(0.0, 1.0, hi_open=True),
        help="fedadam and fedyogi: decay of the second moment (the squared change)",
    )
    server_tau: float = setting(
        1e-3,
        range=Range(0.0, 1.0, lo_open=True),
        help="fedadam, fedyogi and fedadagrad: added to sqrt(v); changes far below it take small steps",
    )


class ServerOptimizer:
    """One optimizer's moments over named quantities, and its step count.

    ``begin_round()`` once per finalize that aggregated something, then ``step(name, x,
    target)`` for each quantity: the new value. Under sgd with lr 1 ``step`` returns ``target``
    itself (bit for bit what the strategy computed) and keeps no state.
    """

    def __init__(self, settings: ServerOptimizerSettings):
        self.kind = settings.server_optimizer
        self.lr = settings.server_lr or DEFAULT_LR[self.kind]
        self.momentum = settings.server_momentum
        self.beta1 = 0.0 if self.kind == "fedadagrad" else settings.server_beta1
        self.beta2 = settings.server_beta2
        self.tau = settings.server_tau
        self.t = 0
        self.m: dict[str, np.ndarray] = {}
        self.v: dict[str, np.ndarray] = {}

    @property
    def identity(self) -> bool:
        """True when every step returns its target unchanged (plain sgd, lr 1)."""
        return self.kind == "sgd" and self.lr == 1.0

    def begin_round(self) -> None:
        self.t += 1

    def step(self, name: str, x: np.ndarray, target: np.ndarray, dtype=np.float32) -> np.ndarray:
        """The new value (as ``dtype``) of quantity ``name``, now ``x``, whose aggregate is ``target``."""
        if self.identity:
            return np.asarray(target, dtype=dtype)
        if self.t < 1:
            raise ConfigError("ServerOptimizer.step before begin_round")
        x64 = np.asarray(x, dtype=np.float64)
        delta = np.asarray(target, dtype=np.float64) - x64
        return (x64 + self.change(name, delta)).astype(dtype)

    def change(self, name: str, delta: np.ndarray) -> np.ndarray:
        """The step for pseudo-gradient ``delta`` of quantity ``name``; updates its moments."""
        if self.kind == "sgd":
            return self.lr * delta
        if self.kind == "fedavgm":
            m = self.m.get(name)
            m = delta.copy() if m is None else self.momentum * m + delta
            self.m[name] = m
            return self.lr * m
        m = self.m.get(name, np.zeros_like(delta))
        v = self.v.get(name, np.zeros_like(delta))
        m = self.beta1 * m + (1.0 - self.beta1) * delta
        square = delta * delta
        if self.kind == "fedadam":
            v = self.beta2 * v + (1.0 - self.beta2) * square
        elif self.kind == "fedyogi":
            v = v - (1.0 - self.beta2) * square * np.sign(v - square)
        else:  # fedadagrad
            v = v + square
        self.m[name], self.v[name] = m, v
        if self.kind == "fedadagrad":
            return self.lr * m / (np.sqrt(v) + self.tau)
        mhat = m / (1.0 - self.beta1**self.t)
        vhat = v / (1.0 - self.beta2**self.t)
        return self.lr * mhat / (np.sqrt(vhat) + self.tau)

    # -- persistence ---------------------------------------------------------------------
    def state(self) -> tuple[int, dict[str, np.ndarray]]:
        """(t, arrays): the moments as ``m/<name>`` and ``v/<name>`` (float64)."""
        arrays = {f"m/{k}": v for k, v in self.m.items()}
        arrays.update({f"v/{k}": v for k, v in self.v.items()})
        return self.t, arrays

    def load_state(self, t: int, arrays: dict[str, np.ndarray]) -> None:
        """Continue from a saved ``state()``."""
        self.t = int(t)
        self.m = {k[2:]: np.asarray(v, dtype=np.float64) for k, v in arrays.items() if k.startswith("m/")}
        self.v = {k[2:]: np.asarray(v, dtype=np.float64) for k, v in arrays.items() if k.startswith("v/")}
        odd = sorted(k for k in arrays if not k.startswith(("m/", "v/")))
        if odd:
            raise ConfigError(f"saved server optimizer state has an unknown array {odd[0]!r}")
