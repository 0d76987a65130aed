"""Aggregator configuration: one dataclass, from a YAML/JSON file, ``FEDLORA_*`` environment
variables and command-line overrides (in rising precedence)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.bundle import DEFAULT_LR
from core.codecs import get_codec
from core.config import load
from core.errors import ConfigError, ProtocolError
from core.transport import BrokerConfig
from server.async_rounds import check_async
from server.privacy import PrivacySettings, check_budget, check_privacy
from server.robust import RobustSettings
from server.rounds import RoundSettings
from server.secure_rounds import SecureAggregationSettings, check_secure_aggregation
from server.shards import ShardSettings, check_shards
from server.strategies import STRATEGIES as STRATEGY_CLASSES
from server.strategies import strategy_settings

STRATEGIES = tuple(STRATEGY_CLASSES)


@dataclass
class TrainSettings:
    """What each device does in a round (sent in the round announcement).

    local_steps: optimizer steps per round; batch_size: examples per step; lr: AdamW rate (0:
        the bundle's task's default, ``core.bundle.DEFAULT_LR``: 5e-3 for a classifier, 1e-3
        for a causal LM; ``for_task`` resolves it).
    lr_rank_power: mixed ranks: a device of rank r trains at ``lr * (R / r) ** lr_rank_power``,
        R the global adapter's rank (0: the same rate at every rank). Every rank of a ladder
        has LoRA scale 2 (alpha = 2 r), and under Adam each factor entry moves about ``lr`` per
        step, so a rank-r product moves roughly in proportion to sqrt(r) to r: 0.5 evens out
        the first (the ratio rsLoRA's alpha / sqrt(r) scaling gives), 1 the second.
    """

    local_steps: int = 20
    batch_size: int = 8
    lr: float = 0.0
    lr_rank_power: float = 0.0

    def for_task(self, task: str) -> TrainSettings:
        """These settings with ``lr`` 0 replaced by the task's default rate."""
        return self if self.lr else dataclasses.replace(self, lr=DEFAULT_LR[task])

    def __post_init__(self) -> None:
        if self.local_steps < 1:
            raise ConfigError("train.local_steps must be >= 1")
        if self.batch_size < 1:
            raise ConfigError("train.batch_size must be >= 1")
        if not 0 <= self.lr < 1:
            raise ConfigError(f"train.lr must be in [0, 1) (0: the task's default), got {self.lr}")
        if not 0 <= self.lr_rank_power <= 2:
            raise ConfigError(f"train.lr_rank_power must be in [0, 2], got {self.lr_rank_power}")


@dataclass
class KubernetesSettings:
    """Kubernetes integration (the Helm chart turns it on; off elsewhere).

    leader_election: only the holder of a coordination.k8s.io/v1 Lease runs rounds; other
        replicas wait as standbys and take over, from the persisted state, when it goes.
    events: record round completions and leadership changes as Events on this pod.
    namespace: where the Lease and the Events live ('' : the pod's own namespace).
    lease_name: the Lease all replicas of one aggregator campaign for.
    identity: this replica's name in the Lease ('' : the pod name, from POD_NAME or the host name).
    pod_uid: the pod's uid, so ``kubectl describe pod`` lists its Events ('' : unknown).
    lease_duration / renew_deadline / retry_period: seconds, as client-go's (15 / 10 / 2).
    """

    leader_election: bool = False
    events: bool = False
    namespace: str = ""
    lease_name: str = "fedlora-aggregator"
    identity: str = ""
    pod_uid: str = ""
    lease_duration: float = 15.0
    renew_deadline: float = 10.0
    retry_period: float = 2.0

    def __post_init__(self) -> None:
        if not self.lease_duration > self.renew_deadline > self.retry_period > 0:
            raise ConfigError(
                f"kubernetes: need lease_duration > renew_deadline > retry_period > 0, got "
                f"{self.lease_duration} / {self.renew_deadline} / {self.retry_period}"
            )
        if self.lease_duration < 1:
            raise ConfigError("kubernetes.lease_duration must be at least 1 second")
        if not self.lease_name:
            raise ConfigError("kubernetes.lease_name must not be empty")


@dataclass
class DeviceLimits:
    """What one device (one topic id) may cost the aggregator; beyond it, its messages are
    refused and counted (``fedlora_messages_refused_total``), never another device's.

    messages_per_s / message_burst: message rate per device (token bucket; 0: no limit).
    bytes_per_s / byte_burst: byte rate per device (0: no limit; byte_burst 0: twice
        ``max_update_bytes``, so a whole update always fits one burst).
    partials_per_device: partial (chunked) updates one device may have in flight; a new one
        drops that device's oldest.
    max_partials / max_buffered_bytes: partial updates and their bytes over all devices; when
        full, a partial idle for two minutes makes room, else new uploads wait (the device resends).
    """

    messages_per_s: float = 200.0
    message_burst: float = 2000.0
    bytes_per_s: float = 32 * 1024 * 1024
    byte_burst: int = 0
    partials_per_device: int = 2
    max_partials: int = 4096
    max_buffered_bytes: int = 1 << 30

    def __post_init__(self) -> None:
        if min(self.messages_per_s, self.message_burst, self.bytes_per_s, self.byte_burst) < 0:
            raise ConfigError("device_limits: rates and bursts must be >= 0")
        if self.messages_per_s and self.message_burst < 1:
            raise ConfigError("device_limits.message_burst must be >= 1 when messages_per_s is set")
        if not 1 <= self.partials_per_device <= 64:
            raise ConfigError(f"device_limits.partials_per_device must be in [1, 64], got {self.partials_per_device}")
        if self.max_partials < 1 or self.max_buffered_bytes < 1 << 20:
            raise ConfigError("device_limits: max_partials must be >= 1 and max_buffered_bytes >= 1 MiB")


@dataclass
class CommitSettings:
    """How accepted updates become durable before they are acknowledged (group commit).

    batch: the most updates committed together: the aggregator adds what its inbox holds to the
        round, up to this many updates, commits them in one transaction, then acknowledges them
        all; a failed commit undoes all of them and answers each ``retry_later`` (1: a commit
        per update).
    checkpoint_bytes: between checkpoints a commit writes only its updates (O(update)); once
        this many bytes of updates were committed since the last checkpoint, the next commit
        saves the open round's partial sums instead (O(model + devices)) and drops the updates
        it covers. A restart replays at most this much onto the checkpoint.
    """

    batch: int = 256
    checkpoint_bytes: int = 64 * 1024 * 1024

    def __post_init__(self) -> None:
        if not 1 <= self.batch <= 100_000:
            raise ConfigError(f"commit.batch must be in [1, 100000], got {self.batch}")
        if self.checkpoint_bytes < 0:
            raise ConfigError(
                f"commit.checkpoint_bytes must be >= 0 (0: a checkpoint every commit), got {self.checkpoint_bytes}"
            )


@dataclass
class ServerConfig:
    """The aggregator's settings.

    job: job id; all topics live under ``fedlora/<job>/``.
    bundle: artifact bundle folder (its manifest defines the adapter; its checkpoint the
        initial global adapter).
    state_dir: where round state is persisted (a PersistentVolume on Kubernetes).
    strategy: aggregation strategy name.
    strategy_settings: the strategy's own settings, as it declares them (its ``Settings``;
        ``fedlora-server --strategies`` lists them all), e.g. ``{"rank_norm_power": 0.5}``
        for flexlora-delta; checked and completed with the defaults on load.
    codec: codec of the full global adapter copy (retained for devices that are new or behind).
    downlink_codec: when set, each new version is also published as a delta from the previous
        one in this codec (devices that hold the previous version download only that); the
        full copy must then be lossless so both paths give devices the same adapter.
    uplink_codec: the devices' update codec, announced per round (lossy ones use error feedback).
    uplink_head_codec: when set, the codec of the update's tensors that are not LoRA factors
        (the classifier head, new and dense: sparsifying it stalls training); empty: uplink_codec.
    max_update_bytes: largest update accepted (announced size, before reassembly).
    chunk_repair_after_s: a partial update that gets no new chunk for this long is asked for
        its missing chunks on the device's ack topic, and again after each such pause (0: off;
        devices then resend whole updates every 30 s).
    device_limits: per-device rate and memory limits (see DeviceLimits).
    commit: group commit of accepted updates and checkpoints of the open round (see CommitSettings).
    adapter_versions: after each round, the new global adapter is written as a PEFT adapter
        folder (``adapter_config.json`` + ``adapter_model.safetensors``, what
        ``PeftModel.from_pretrained`` loads) to ``<state_dir>/adapters/v<version>``; this many
        of the latest are kept (0: none written).
    health_stall_s: /healthz fails when the leader's main loop has not completed a step for
        this long (a stuck leader is restarted and replaced).
    http_host / http_port: metrics and health endpoints (port 0: off).
    exit_when_finished: exit once every round is done; false keeps serving metrics and
        health until stopped (on Kubernetes, where an exit would restart the pod).
    kubernetes: leader election and Events (see KubernetesSettings).
    robust: robust aggregation against poisoned updates (see server.robust.RobustSettings;
        method ``mean``, the strategy's own, by default).
    privacy: client-level differential privacy (see server.privacy.PrivacySettings; off by default).
    secure_aggregation: the aggregator learns only each round's sum (see
        server.secure_rounds.SecureAggregationSettings; off by default).
    shards: sharded aggregation, N workers and a coordinator (see server.shards.ShardSettings;
        one process by default).
    """

    job: str = "default"
    bundle: Path | None = None
    state_dir: Path = Path("fedlora-state")
    broker: BrokerConfig = field(default_factory=BrokerConfig)
    rounds: RoundSettings = field(default_factory=RoundSettings)
    train: TrainSettings = field(default_factory=TrainSettings)
    strategy: str = "fedavg"
    strategy_settings: dict[str, Any] = field(default_factory=dict)
    codec: str = "fp32"
    downlink_codec: str = ""
    uplink_codec: str = "fp32"
    uplink_head_codec: str = ""
    max_update_bytes: int = 64 * 1024 * 1024
    chunk_repair_after_s: float = 5.0
    device_limits: DeviceLimits = field(default_factory=DeviceLimits)
    commit: CommitSettings = field(default_factory=CommitSettings)
    adapter_versions: int = 3
    health_stall_s: float = 120.0
    http_host: str = "0.0.0.0"
    http_port: int = 9100
    seed: int = 0
    exit_when_finished: bool = True
    kubernetes: KubernetesSettings = field(default_factory=KubernetesSettings)
    robust: RobustSettings = field(default_factory=RobustSettings)
    privacy: PrivacySettings = field(default_factory=PrivacySettings)
    secure_aggregation: SecureAggregationSettings = field(default_factory=SecureAggregationSettings)
    shards: ShardSettings = field(default_factory=ShardSettings)

    def __post_init__(self) -> None:
        if self.bundle is None:
            raise ConfigError("bundle is required: the artifact bundle folder the devices train")
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"strategy must be one of {STRATEGIES}, not {self.strategy!r}")
        optional = tuple(k for k in ("downlink_codec", "uplink_head_codec") if getattr(self, k))
        for key in ("codec", "uplink_codec") + optional:
            try:
                get_codec(getattr(self, key))
            except ProtocolError as exc:
                raise ConfigError(f"{key}: {exc}") from None
        if self.downlink_codec and not get_codec(self.codec).lossless:
            raise ConfigError(f"codec {self.codec!r} must be lossless when downlink_codec is set")
        if self.max_update_bytes < 1024:
            raise ConfigError("max_update_bytes must be at least 1024")
        if not (self.chunk_repair_after_s == 0 or 0.5 <= self.chunk_repair_after_s <= 3600):
            raise ConfigError(
                f"chunk_repair_after_s must be 0 (off) or in [0.5, 3600], got {self.chunk_repair_after_s}"
            )
        if not 0 <= self.adapter_versions <= 10_000:
            raise ConfigError(f"adapter_versions must be in [0, 10000], got {self.adapter_versions}")
        if self.health_stall_s < 5:
            raise ConfigError(f"health_stall_s must be at least 5 seconds, got {self.health_stall_s}")
        if not 0 <= self.http_port <= 65535:
            raise ConfigError(f"http_port must be 0..65535, got {self.http_port}")
        if not isinstance(self.strategy_settings, dict):
            raise ConfigError(f"strategy_settings must be a mapping, got {self.strategy_settings!r}")
        self.strategy_settings = strategy_settings(self.strategy, self.strategy_settings).values()
        check_privacy(self.privacy, self.strategy, self.strategy_settings, self.robust.method)
        if self.privacy.enabled and self.rounds.norm_bound != "clip":
            raise ConfigError("privacy needs rounds.norm_bound: clip (the clip bound is DP's sensitivity)")
        r = self.rounds
        check_async(
            r,
            self.strategy,
            STRATEGY_CLASSES[self.strategy].async_unsupported,
            self.privacy.enabled,
            self.robust.method,
            self.secure_aggregation.enabled,
        )
        check_budget(self.privacy, r.rounds, r.devices_per_round, r.min_devices)
        check_secure_aggregation(
            self.secure_aggregation,
            self.strategy,
            self.robust.method,
            self.privacy.enabled and self.privacy.adaptive_clip,
            r.min_devices,
            r.devices_per_round,
            r.round_timeout,
        )
        check_shards(
            self.shards,
            r,
            self.robust.method,
            self.secure_aggregation.enabled,
            self.privacy.enabled and self.privacy.adaptive_clip,
        )


def load_server_config(path: str | Path | None = None, overrides: dict | None = None) -> ServerConfig:
    return load(ServerConfig, path, env_prefix="FEDLORA", overrides=overrides)
