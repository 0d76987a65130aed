"""Thousands of simulated devices: virtual devices multiplexed over a pool of worker processes on Ray.

Each virtual device is a real ``edge_client.device.Device``, with its own identity, data shard
and crash-safe state folder; what it shares with the others of its worker is the worker's one
MQTT connection (round announcements and the global adapter are received and decoded once per
worker; every device publishes its status and updates and reads its acks on its own topics)
and the worker's one ONNX Runtime session (``SharedTrainer``: the bundle is loaded once, and a
device's own adapter is switched in before it trains). The session lives in a child process
of the worker (``edge_client.trainer_process``), so the connection keeps answering while a
step runs.

The workers are Ray actors: ``ray.init()`` starts a local Ray on this machine, or joins a
cluster at ``ray_address``; the code is the same. On a cluster the run's folder (bundle, data
shards, device state) must be on a path every node sees, with fedlora installed there.

``FleetSettings`` is the one declaration of the fleet's knobs (``fedlora simulate`` has a flag
for each): the pool size, client sampling (``participation``), and availability: each device
is online a fraction of the time, and a fraction of the devices are stragglers whose updates
take ``straggler_slowdown`` times as long. With ``mean_session_s`` the availability is a
schedule in wall-clock time (``edge_client.availability``: online and offline sessions), the
same model for synchronous and asynchronous rounds, for device processes and for this pool;
without it, a trace indexed by synchronous round (``availability_trace``).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import queue
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, cast

import numpy as np

from core.errors import ConfigError, FedloraError, ProtocolError
from core.messages import Presence, RoundState, Status, TopicKind
from core.protocol import Topics
from core.transport import BrokerConfig, MqttLink

if TYPE_CHECKING:
    from ray.actor import ActorHandle

log = logging.getLogger("fedlora.fleet")

LOCAL_OBJECT_STORE_BYTES = 256 * 2**20
# More devices than this run as virtual devices on the pool unless told otherwise: a device
# process holds its own ONNX Runtime session (about 250 MiB for MiniLM-L6).
MAX_DEVICE_PROCESSES = 32


@dataclass
class FleetSettings:
    """Many devices on few processes (``simulator.fleet``), client sampling and availability.

    workers: Ray worker processes the devices are multiplexed over, each with one ONNX Runtime
        session; 0: automatic: every device its own process up to 32 devices (without an
        availability trace), else one worker per core.
    participation: fraction of the devices sampled per round (1: every online device).
    availability: fraction of the time each device is online (a fixed random trace per seed;
        only online devices are sampled). Without ``mean_session_s``: of the synchronous rounds.
    mean_session_s: with ``availability`` below 1, devices alternate online and offline
        sessions in wall-clock time, online ones this many seconds long on average (exponential;
        ``edge_client.availability``); works in sync and async rounds, with device processes
        or the pool. 0: the per-round trace (sync rounds on the pool only).
    stragglers: fraction of the devices that are slow.
    straggler_slowdown: how many times longer a straggler takes to train and send an update
        (it holds each trained update for ``slowdown - 1`` times its measured training time:
        ``edge_client.device.DeviceConfig.slowdown``).
    ray_address: a Ray cluster to run the workers on (empty: a local Ray on this machine).
    """

    workers: int = 0
    participation: float = 1.0
    availability: float = 1.0
    stragglers: float = 0.0
    straggler_slowdown: float = 5.0
    mean_session_s: float = 0.0
    ray_address: str = ""

    def __post_init__(self) -> None:
        if self.workers < 0:
            raise ConfigError(f"workers must be >= 0, got {self.workers}")
        if not 0 < self.participation <= 1:
            raise ConfigError(f"participation must be in (0, 1], got {self.participation}")
        if not 0 < self.availability <= 1:
            raise ConfigError(f"availability must be in (0, 1], got {self.availability}")
        if not 0 <= self.stragglers <= 1:
            raise ConfigError(f"stragglers must be in [0, 1], got {self.stragglers}")
        if not 1 <= self.straggler_slowdown <= 1000:
            raise ConfigError(f"straggler_slowdown must be in [1, 1000], got {self.straggler_slowdown}")
        if not 0 <= self.mean_session_s <= 1e6:
            raise ConfigError(f"mean_session_s must be in [0, 1e6] (0: the per-round trace), got {self.mean_session_s}")

    @property
    def timed(self) -> bool:
        """Whether availability is a wall-clock schedule (``mean_session_s``) rather than the per-round trace."""
        return self.availability < 1 and self.mean_session_s > 0

    def resolved(self, devices: int) -> FleetSettings:
        """These settings with ``workers`` decided for ``devices`` devices (see ``workers``)."""
        if self.workers or (devices <= MAX_DEVICE_PROCESSES and (self.availability == 1 or self.timed)):
            return self
        return dataclasses.replace(self, workers=os.cpu_count() or 1)

    def sampled(self, devices: int) -> int:
        """Devices sampled per round out of ``devices``."""
        return max(1, round(self.participation * devices))


def availability_trace(devices: int, rounds: int, availability: float, least: int, seed: int) -> np.ndarray:
    """``[devices, rounds + 1]`` booleans: whether each device is online when round r (1-based;
    column 0 is the start) is selected. Each device is online in a round with probability
    ``availability``, independently; a round with fewer than ``least`` devices online gets
    random others added so that it can open."""
    rng = np.random.default_rng([seed, 18])
    online = rng.random((devices, rounds + 1)) < availability
    for r in range(rounds + 1):
        short = least - int(online[:, r].sum())
        if short > 0:
            online[rng.choice(np.flatnonzero(~online[:, r]), short, replace=False), r] = True
    return online


def straggler_slowdowns(devices: int, settings: FleetSettings, seed: int) -> np.ndarray:
    """Each device's slowdown: ``straggler_slowdown`` for a random ``stragglers`` fraction, else 1."""
    slow = np.ones(devices)
    n = round(settings.stragglers * devices)
    if n:
        slow[np.random.default_rng([seed, 5]).choice(devices, n, replace=False)] = settings.straggler_slowdown
    return slow


@dataclass
class VirtualDevice:
    """What a worker needs to build one device: its ``device.json`` settings and availability row
    (empty: a wall-clock schedule in its settings, ``online_schedule``, or always online)."""

    config: dict
    online: list[bool]


class FleetWorker:
    """The virtual devices of one worker process (a Ray actor; see the module doc)."""

    def __init__(
        self, index: int, bundle_dir: str, broker: dict, job: str, devices: list[VirtualDevice], log_file: str
    ):
        self.index = index
        self.bundle_dir = bundle_dir
        self.broker = BrokerConfig(**broker)
        self.job = job
        self.specs = devices
        self.log_file = log_file

    def run(self) -> dict:
        """Run the worker's devices until the job is finished; returns what they did."""
        _log_to(self.log_file)
        from core.bundle import Bundle, choose_bundle
        from edge_client.device import Device, SharedTrainer
        from edge_client.runtime import RuntimeOptions
        from edge_client.trainer_process import TrainerProcess

        configs = [self._device_config(spec.config) for spec in self.specs]
        first = configs[0]
        bundle = Bundle(choose_bundle(Path(self.bundle_dir), 0, first.rank))
        trainer = TrainerProcess(bundle, options=RuntimeOptions(intra_op_threads=first.threads))
        topics = Topics(self.job)
        link = MqttLink(self.broker, client_id=f"fedlora-{self.job}-worker{self.index}")
        shared = SharedTrainer(bundle, trainer, trainer.get_adapter())
        started = time.monotonic()
        devices = {c.device_id: Device(c, link=link, shared=shared) for c in configs}
        log.info("worker %d: %d devices loaded in %.1fs", self.index, len(devices), time.monotonic() - started)
        lead = next(iter(devices.values()))
        try:
            return self._serve(link, topics, devices, lead)
        finally:
            for device_id in devices:
                link.publish(topics.status(device_id), Status(Presence.OFFLINE).to_bytes(), retain=True)
            time.sleep(0.2)
            link.close()
            trainer.close()

    def _device_config(self, values: dict):
        from edge_client.device import DeviceConfig

        paths = {k: Path(values[k]) for k in ("bundle", "data", "state_dir")}
        return DeviceConfig(**{**values, **paths, "broker": self.broker})

    def _serve(self, link: MqttLink, topics: Topics, devices: dict, lead) -> dict:
        link.subscribe(topics.round)
        link.subscribe(topics.global_filter(lead.rank))
        link.subscribe(topics.delta_filter(lead.rank))
        for device_id in devices:
            link.subscribe(topics.ack(device_id))
        link.connect_retrying()
        if not self.specs[0].online:  # each device publishes its presence, and follows its schedule in step()
            for device in devices.values():
                device.announce_presence()
        presence_round = -1
        trained = 0
        while True:
            self._drain(link, topics, devices, lead)
            ann = lead.announcement
            current = ann.round if ann is not None else 0
            if current != presence_round and self.specs[0].online:  # a new round: who is online for the next selection
                presence_round = current
                self._publish_presence(link, topics, devices, current, ann.selected if ann and ann.is_open else ())
            for device in devices.values():
                device.adopt_downlink(lead)
                before = device.rounds_trained
                device.step()
                if device.rounds_trained != before:
                    trained += 1
                    self._drain(link, topics, devices, lead, timeout=0)  # acks that came while it trained
            if ann is not None and ann.state is RoundState.FINISHED and all(d.finished() for d in devices.values()):
                return {"worker": self.index, "devices": len(devices), "updates_trained": trained}

    def _drain(self, link: MqttLink, topics: Topics, devices: dict, lead, timeout: float = 0.05) -> None:
        try:
            msg = link.inbox.get(timeout=timeout) if timeout > 0 else link.inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            try:
                ref = topics.parse(msg.topic)
            except ProtocolError:
                ref = None
            if ref is not None and ref.kind is TopicKind.ACK and ref.device in devices:
                devices[ref.device].handle(msg.topic, msg.payload, msg.received_at)
            elif ref is not None and ref.kind in (TopicKind.ROUND, TopicKind.GLOBAL, TopicKind.GDELTA):
                lead.handle(msg.topic, msg.payload, msg.received_at)
            if link.inbox.empty():
                return
            msg = link.inbox.get_nowait()

    def _publish_presence(
        self, link: MqttLink, topics: Topics, devices: dict, round_no: int, working: tuple[str, ...] | list[str]
    ) -> None:
        """Retained status per device: online or offline per the trace for the next round; a
        device selected for the open round (``working``) stays online until the next one, since
        the aggregator counts a selected device that goes offline as dropped out."""
        for spec, (device_id, device) in zip(self.specs, devices.items()):
            column = min(round_no, len(spec.online) - 1)
            state = Presence.ONLINE if spec.online[column] or device_id in working else Presence.OFFLINE
            link.publish(topics.status(device_id), device.status_payload(state), retain=True)


def _log_to(path: str) -> None:
    """The worker's log (and its devices') goes to its file in the run's folder, not the terminal."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.INFO, handlers=[handler], force=True)


class FleetPool:
    """The Ray actors running ``FleetWorker``s, started and watched from the simulator's process."""

    def __init__(self, settings: FleetSettings, workers: list[FleetWorker]):
        self.log_folder = Path(workers[0].log_file).parent
        try:
            import ray
        except ImportError:
            raise ConfigError("the worker pool needs Ray: pip install 'fedlora[fleet]' (ray==2.60.0)") from None
        self._ray = ray
        self._started_ray = False
        if not ray.is_initialized():
            local = not settings.ray_address
            ray.init(
                address=settings.ray_address or None,
                num_cpus=max(len(workers), os.cpu_count() or 1) if local else None,
                # the workers pass little but their results: a small object store (Ray's default
                # takes 30% of the memory)
                object_store_memory=LOCAL_OBJECT_STORE_BYTES if local else None,
                include_dashboard=False,
                log_to_driver=False,  # the workers log to files in the run's folder
                logging_level=logging.ERROR,  # not its notices (token authentication...) in the terminal
            )
            self._started_ray = True
        remote = ray.remote(num_cpus=1, max_restarts=0)(_FleetActor)
        # Ray types ActorClass.remote() as ActorHandle | type (for its method typing); it returns a handle
        self._actors = [cast("ActorHandle[_FleetActor]", remote.remote(w)) for w in workers]
        self._runs = [a.run.remote() for a in self._actors]
        self.results: list[dict] = []

    def check(self) -> None:
        """Raise a FedloraError if a worker failed; collect the results of those that finished."""
        done, self._runs = self._ray.wait(self._runs, num_returns=len(self._runs), timeout=0)
        self._collect(done)

    def _collect(self, done: list) -> None:
        for ref in done:
            try:
                self.results.append(self._ray.get(ref))
            except Exception as exc:  # the worker's error, wrapped by Ray with its traceback
                cause = getattr(exc, "cause", None) or exc
                raise FedloraError(
                    f"a fleet worker failed ({type(cause).__name__}: {str(cause).strip().splitlines()[-1][:300]}); "
                    f"its log is in {self.log_folder}"
                ) from None

    def wait(self, timeout: float) -> None:
        """Wait up to ``timeout`` seconds for the workers to finish (they do once the job is)."""
        deadline = time.monotonic() + timeout
        while self._runs and time.monotonic() < deadline:
            done, self._runs = self._ray.wait(self._runs, num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
            self._collect(done)

    def close(self) -> None:
        for actor in self._actors:
            self._ray.kill(actor)
        if self._started_ray:
            self._ray.shutdown()


class _FleetActor:
    def __init__(self, worker: FleetWorker):
        self.worker = worker

    def run(self) -> dict:
        return self.worker.run()
