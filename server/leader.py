"""Leader election over a Kubernetes Lease (coordination.k8s.io/v1).

With more than one aggregator replica, exactly one may run rounds: the holder of a Lease.
The algorithm is client-go's (``k8s.io/client-go/tools/leaderelection``):

* A candidate reads the Lease. Absent: it creates it naming itself. Held by another: it
  waits until the record has not changed for ``leaseDurationSeconds`` *as measured on its
  own clock* (from the moment it first saw that record), so clock skew between nodes does
  not matter. Expired or released: it takes it over with a write that carries the
  ``resourceVersion`` it read; the API server answers 409 Conflict to every writer but the
  first, so two candidates never both win.
* The holder renews every ``retry_period``. It counts itself the leader only while its last
  successful renewal started less than ``renew_deadline`` ago; since ``renew_deadline <
  lease_duration``, it has stopped leading before any other candidate can consider the
  Lease expired. A 409 on renewal (someone else wrote the Lease) ends leadership at once.
* On shutdown, once its work has stopped, the holder releases the Lease (empty holder, 1 s
  duration), so a standby takes over within one retry period instead of a lease duration.

The Lease goes through the official ``kubernetes`` client (``CoordinationV1Api``); the
clock, the wall clock and the API object are passed in, so tests drive it without a cluster.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone

from core.errors import ConfigError

log = logging.getLogger("fedlora.leader")


class LeaseConflict(Exception):
    """The API server refused a write because another writer got there first (HTTP 409)."""


def micro_time(wall: float) -> str:
    """A Kubernetes MicroTime (RFC 3339, always six fractional digits, UTC).

    The client's own serialization (``datetime.isoformat``) drops the fraction when it is
    zero, which the API server's MicroTime parser rejects; so the string is written here.
    """
    return datetime.fromtimestamp(wall, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass(frozen=True)
class LeaseRecord:
    """What the election reads from a Lease: who holds it and since when."""

    holder: str
    lease_duration: int
    transitions: int
    resource_version: str


class LeaseLock:
    """One Lease through ``kubernetes.client.CoordinationV1Api``: read, create, replace.

    ``replace`` sends the object as read, ``metadata.resourceVersion`` included, so a write
    based on a stale read fails with 409 Conflict instead of overwriting someone else's.
    """

    def __init__(self, api, namespace: str, name: str, request_timeout: float = 5.0):
        self.api = api
        self.namespace = namespace
        self.name = name
        self.request_timeout = request_timeout

    def _call(self, method, *args, **kwargs):
        from kubernetes.client.exceptions import ApiException

        try:
            return method(*args, _request_timeout=self.request_timeout, **kwargs)
        except ApiException as exc:
            if exc.status == 409:
                raise LeaseConflict(f"lease {self.namespace}/{self.name}: {exc.reason}") from exc
            raise

    def get(self):
        """The Lease object, or None if it does not exist."""
        from kubernetes.client.exceptions import ApiException

        try:
            return self._call(self.api.read_namespaced_lease, self.name, self.namespace)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def create(self, spec: dict):
        from kubernetes import client

        body = client.V1Lease(
            api_version="coordination.k8s.io/v1",
            kind="Lease",
            metadata=client.V1ObjectMeta(name=self.name, namespace=self.namespace),
            spec=client.V1LeaseSpec(**spec),
        )
        return self._call(self.api.create_namespaced_lease, self.namespace, body)

    def replace(self, lease, spec: dict):
        from kubernetes import client

        lease.spec = client.V1LeaseSpec(**spec)
        return self._call(self.api.replace_namespaced_lease, self.name, self.namespace, lease)

    @staticmethod
    def record(lease) -> LeaseRecord:
        spec = lease.spec
        return LeaseRecord(
            holder=(spec.holder_identity or "") if spec else "",
            lease_duration=int((spec.lease_duration_seconds or 0) if spec else 0),
            transitions=int((spec.lease_transitions or 0) if spec else 0),
            resource_version=lease.metadata.resource_version or "",
        )


class LeaderElector:
    """Campaigns for a Lease in a background thread and says whether this replica leads.

    identity: this candidate's name in the Lease (the pod name on Kubernetes).
    lease_duration: seconds a standby waits on an unchanged record before taking over (15).
    renew_deadline: seconds the holder keeps leading without a successful renewal (10).
    retry_period: seconds between attempts to acquire or renew (2).
    clock: monotonic seconds (time.monotonic); wall: Unix seconds for the record (time.time).
    on_started_leading / on_stopped_leading: called from the election thread.
    on_api_error: called with (operation, exception) when a call to the API server fails.
    """

    def __init__(
        self,
        lock: LeaseLock,
        identity: str,
        lease_duration: float = 15.0,
        renew_deadline: float = 10.0,
        retry_period: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        on_started_leading: Callable[[], None] | None = None,
        on_stopped_leading: Callable[[], None] | None = None,
        on_api_error: Callable[[str, Exception], None] | None = None,
    ):
        if not identity:
            raise ConfigError("leader election needs a non-empty identity (the pod name)")
        if not lease_duration > renew_deadline > retry_period > 0:
            raise ConfigError(
                f"leader election needs lease_duration > renew_deadline > retry_period > 0, got "
                f"{lease_duration} / {renew_deadline} / {retry_period}"
            )
        if lease_duration < 1:
            raise ConfigError("lease_duration must be at least 1 second (the Lease stores whole seconds)")
        self.lock = lock
        self.identity = identity
        self.lease_duration = lease_duration
        self.renew_deadline = renew_deadline
        self.retry_period = retry_period
        self.clock = clock
        self.wall = wall
        self.on_started_leading = on_started_leading
        self.on_stopped_leading = on_stopped_leading
        self.on_api_error = on_api_error
        self.observed: LeaseRecord | None = None
        self.observed_at = 0.0  # our clock when the observed record last changed
        self.last_contact = float("-inf")  # our clock at the last successful API round trip
        self._renewed_at = float("-inf")  # our clock at the start of the last successful write by us
        self._leading = False
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.leading_changed = threading.Condition(self._lock)

    # -- the question the aggregator asks before every step ------------------------------
    def is_leader(self) -> bool:
        """True while we hold the Lease and renewed it within ``renew_deadline``."""
        with self._lock:
            return self._leading and self.clock() - self._renewed_at < self.renew_deadline

    @property
    def leader(self) -> str:
        """The holder we last saw ('' if none)."""
        return self.observed.holder if self.observed else ""

    def healthy(self) -> bool:
        """We reached the API server within the last lease duration."""
        return self.clock() - self.last_contact < self.lease_duration

    # -- one attempt ---------------------------------------------------------------------
    def try_acquire_or_renew(self) -> bool:
        """Read the Lease and, if it is ours or free, write it naming us. True if we hold it now."""
        now = self.clock()
        try:
            lease = self.lock.get()
        except Exception as exc:  # network, 5xx, RBAC: nothing learned, try again later
            self._api_error("get", exc)
            return False
        self.last_contact = self.clock()
        stamp = micro_time(self.wall())
        if lease is None:
            spec = {
                "holder_identity": self.identity,
                "lease_duration_seconds": int(round(self.lease_duration)),
                "acquire_time": stamp,
                "renew_time": stamp,
                "lease_transitions": 0,
            }
            return self._write("create", lambda: self.lock.create(spec), now)
        record = LeaseLock.record(lease)
        if self.observed is None or record.resource_version != self.observed.resource_version:
            self.observed, self.observed_at = record, now
        ours = record.holder == self.identity
        duration = record.lease_duration or self.lease_duration
        if record.holder and not ours and now < self.observed_at + duration:
            return False  # held by another, and renewed within its lease duration
        acquired = stamp
        if ours and lease.spec.acquire_time is not None:  # a renewal keeps the acquire time
            acquired = lease.spec.acquire_time
            if isinstance(acquired, datetime):
                acquired = micro_time(acquired.timestamp())
        else:
            log.info(
                "%s: taking over lease %s/%s from %r",
                self.identity,
                self.lock.namespace,
                self.lock.name,
                record.holder or None,
            )
        spec = {
            "holder_identity": self.identity,
            "lease_duration_seconds": int(round(self.lease_duration)),
            "acquire_time": acquired,
            "renew_time": stamp,
            "lease_transitions": record.transitions if ours else record.transitions + 1,
        }
        return self._write("update", lambda: self.lock.replace(lease, spec), now)

    def _write(self, operation: str, write: Callable[[], object], started: float) -> bool:
        try:
            lease = write()
        except LeaseConflict as exc:
            log.info("%s: lost the race (%s)", self.identity, exc)
            self.last_contact = self.clock()
            self.observed = None  # re-read next time; someone else wrote it
            return False
        except Exception as exc:
            self._api_error(operation, exc)
            return False
        self.last_contact = self.clock()
        self.observed, self.observed_at = LeaseLock.record(lease), started
        with self._lock:
            self._renewed_at = started
        return True

    def _api_error(self, operation: str, exc: Exception) -> None:
        log.warning("%s: lease %s failed: %s", self.identity, operation, str(exc).splitlines()[0] if str(exc) else exc)
        if self.on_api_error is not None:
            self.on_api_error(operation, exc)

    # -- the loop ------------------------------------------------------------------------
    def _set_leading(self, leading: bool) -> None:
        with self._lock:
            if self._leading == leading:
                return
            self._leading = leading
            self.leading_changed.notify_all()
        callback = self.on_started_leading if leading else self.on_stopped_leading
        log.info(
            "%s %s leading (lease %s/%s)",
            self.identity,
            "started" if leading else "stopped",
            self.lock.namespace,
            self.lock.name,
        )
        if callback is not None:
            callback()

    def step(self) -> None:
        """One attempt, and the leadership change it implies (the loop calls this)."""
        held = self.try_acquire_or_renew()
        if held:
            self._set_leading(True)
        elif self._leading:
            lost_race = self.observed is None or (self.observed.holder and self.observed.holder != self.identity)
            if lost_race or self.clock() - self._renewed_at >= self.renew_deadline:
                self._set_leading(False)

    def run(self, stop: threading.Event) -> None:
        """Campaign and renew until ``stop``; the caller releases the Lease once its work stopped."""
        while not stop.is_set():
            self.step()
            if self._leading and not self.is_leader():
                self._set_leading(False)  # the renew deadline passed between attempts
            # Sleep until the next attempt, but wake in time to notice the renew deadline.
            wait = self.retry_period
            if self._leading:
                wait = min(wait, max(0.0, self._renewed_at + self.renew_deadline - self.clock()))
            stop.wait(wait)

    def start(self, stop: threading.Event) -> LeaderElector:
        self._thread = threading.Thread(target=self.run, args=(stop,), name="fedlora-leader-election", daemon=True)
        self._thread.start()
        return self

    def join(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    def wait_for_leadership(self, timeout: float) -> bool:
        with self._lock:
            self.leading_changed.wait_for(lambda: self._leading, timeout)
        return self.is_leader()

    def release(self) -> bool:
        """Give the Lease up (empty holder) so a standby takes over at its next attempt."""
        try:
            lease = self.lock.get()
            if lease is None or LeaseLock.record(lease).holder != self.identity:
                return False
            stamp = micro_time(self.wall())
            record = LeaseLock.record(lease)
            self.lock.replace(
                lease,
                {
                    "holder_identity": None,
                    "lease_duration_seconds": 1,
                    "acquire_time": stamp,
                    "renew_time": stamp,
                    "lease_transitions": record.transitions,
                },
            )
            log.info("%s released lease %s/%s", self.identity, self.lock.namespace, self.lock.name)
            return True
        except Exception as exc:
            self._api_error("release", exc)
            return False
