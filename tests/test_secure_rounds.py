"""Secure aggregation's round logic without a network: the device's session and the aggregator's
round state machine exchanging the real encoded messages, every refusal reason, what a masked
input reveals (nothing: it is indistinguishable from uniform), failures that end a round cleanly
instead of releasing a wrong sum, the config checks and the bounded parsers."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

import core.secagg as secagg
from core.errors import ConfigError, ProtocolError, UpdateRejected
from core.messages import (
    MAX_SECAGG_BYTES,
    MAX_SECAGG_PEERS,
    SECAGG_KEY_BYTES,
    SECAGG_SEALED_BYTES,
    SECAGG_SHARE_BYTES,
    PeerKeys,
    SecaggChannel,
    SecaggForward,
    SecaggKeyList,
    SecaggKeys,
    SecaggReveal,
    SecaggShares,
    SecaggUnmask,
    TopicKind,
    TopicRef,
    parse_secagg_forward,
    parse_secagg_key_list,
    parse_secagg_unmask,
    parse_secagg_upload,
)
from core.protocol import RING_CODEC, Envelope, Topics, decode_envelope, encode_envelope
from edge_client.secure_update import SecureSession
from server.secure_rounds import (
    SecaggRefused,
    SecureAggregationSettings,
    SecureRound,
    SecureRoundState,
    check_secure_aggregation,
)

JOB = "job"
SHAPES = {"a": (4, 16), "b": (32, 4), "head": (5,)}
IDS = [f"d{i}" for i in range(10)]
SETTINGS = SecureAggregationSettings(enabled=True, value_clip=0.1)


def changes(seed=0) -> dict[str, dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return {d: {k: rng.uniform(-0.05, 0.05, s).astype(np.float32) for k, s in SHAPES.items()} for d in IDS}


def wire(msg, parse):
    """Every message crosses as bytes and is parsed by its one parser, as on MQTT."""
    return parse(msg.to_bytes())


class Round:
    """Ten sessions and one SecureRound, stepped by hand."""

    def __init__(self, ids=IDS, settings=SETTINGS):
        self.sessions = {d: SecureSession(JOB, 3, d) for d in ids}
        self.sr = SecureRound(settings, JOB, 3, list(ids), SHAPES, SecureRoundState(phase_started=0.0))
        self.now = 0.0
        self.online = set(ids)

    def advance(self, deadline=1e9):
        self.now += 1
        return self.sr.advance(self.now, self.online.__contains__, deadline)

    def keys(self):
        for d, s in self.sessions.items():
            self.sr.take(d, wire(s.keys_message(), parse_secagg_upload))
        return self.advance()

    def shares(self, transition):
        key_list = wire(transition.key_list, parse_secagg_key_list)
        for d, s in self.sessions.items():
            self.sr.take(d, wire(s.take_key_list(key_list), parse_secagg_upload))
        return self.advance()

    def forward(self, transition):
        for d, s in self.sessions.items():
            s.take_forward(wire(transition.forwards[d], parse_secagg_forward))

    def mask(self, ups, skip=()):
        envs = {}
        for d, s in self.sessions.items():
            s.update = Envelope("update", JOB, 3, d, 4, "fp32", ups[d], base_version=2)
            if d in skip:
                continue
            envs[d] = decode_envelope(encode_envelope(s.masked_update(np.random.default_rng(IDS.index(d)))))
            self.sr.add_masked(d, self.sr.judge_masked(d, envs[d]))
        return envs

    def reveal(self, transition, skip=()):
        request = wire(transition.unmask, parse_secagg_unmask)
        for d, s in self.sessions.items():
            answer = s.take_unmask(request)
            if answer is not None and d not in skip:
                self.sr.take(d, wire(answer, parse_secagg_upload))

    def through_masking(self, ups, drop=()):
        self.forward(self.shares(self.keys()))
        envs = self.mask(ups, skip=drop)
        self.online -= set(drop)
        return envs


def codes_of(ups, ids, devices=10, clip=0.1):
    q = secagg.Quantizer(clip, devices)
    return {d: q.encode(secagg.flatten(ups[d]), np.random.default_rng(IDS.index(d))) for d in ids}


# -- the whole round -----------------------------------------------------------------------
@pytest.mark.parametrize("drop", [(), ("d4",), ("d1", "d5", "d8"), ("d0", "d2", "d3", "d9")])
def test_a_secure_round_unmasks_exactly_the_survivors_sum(drop):
    ups = changes()
    r = Round()
    r.through_masking(ups, drop)
    transition = r.advance()
    assert transition.unmask is not None and set(transition.unmask.dropped) == set(drop)
    r.reveal(transition)
    assert r.sr.ready_to_unmask()
    result = r.sr.unmask()
    survivors = [d for d in IDS if d not in drop]
    expected = sum(c.astype(np.uint64) for c in codes_of(ups, survivors).values()) % 2**32
    assert np.array_equal(result.codes, expected.astype(np.uint32))  # bit-exact in the ring
    bound = len(survivors) / secagg.Quantizer(0.1, 10).scale
    for k in SHAPES:
        plain = sum(ups[d][k].astype(np.float64) for d in survivors)
        assert np.abs(result.tensors[k] - plain).max() <= bound
    assert r.sr.state.phase == "done"


def test_too_many_dropouts_fail_the_round_cleanly():
    r = Round()
    r.through_masking(changes(), drop=("d0", "d1", "d2", "d3", "d4"))  # 5 left: threshold 5 needs 6
    transition = r.advance()
    assert transition.closed and r.sr.state.phase == "failed" and "unmasking needs more" in r.sr.state.failure


def test_a_wrong_revealed_share_fails_the_round_instead_of_releasing_a_wrong_sum():
    r = Round()
    r.through_masking(changes(), drop=("d3",))
    transition = r.advance()
    request = wire(transition.unmask, parse_secagg_unmask)
    for d, s in r.sessions.items():
        answer = s.take_unmask(request)
        if answer is None:
            continue
        shares = dict(answer.shares)
        if d == "d0":  # a lying survivor: its share of d1's self seed is garbage
            shares["d1"] = shares["d1"][:2] + bytes(32)
        r.sr.take(d, SecaggReveal(JOB, 3, d, shares))
    with pytest.raises(ProtocolError, match="does not match"):
        r.sr.unmask()


def test_the_state_survives_a_restart_through_its_json_and_float64_sums():
    ups = changes(1)
    r = Round()
    r.through_masking(ups, drop=("d7",))
    stored = json.loads(json.dumps(r.sr.state.to_json()))
    sums = {k: v.copy() for k, v in r.sr.sums_for_store().items()}
    resumed = SecureRound(
        SETTINGS, JOB, 3, IDS, SHAPES, SecureRoundState.from_json(stored), SecureRound.sums_from_store(sums)
    )
    r.sr = resumed
    transition = r.advance()
    r.reveal(transition)
    survivors = [d for d in IDS if d != "d7"]
    expected = sum(c.astype(np.uint64) for c in codes_of(ups, survivors).values()) % 2**32
    assert np.array_equal(r.sr.unmask().codes, expected.astype(np.uint32))
    with pytest.raises(ValueError, match="not ring words"):
        SecureRound.sums_from_store({"a": np.array([0.5])})


# -- what the aggregator sees of one device ------------------------------------------------
def test_a_masked_input_is_indistinguishable_from_uniform_bytes_and_does_not_decode_to_the_update():
    shapes = {"w": (256, 256)}  # 65,536 words: 262,144 bytes
    sessions = {d: SecureSession(JOB, 3, d) for d in IDS[:5]}
    sr = SecureRound(SETTINGS, JOB, 3, IDS[:5], shapes, SecureRoundState())
    for d, s in sessions.items():
        sr.take(d, s.keys_message())
    key_list = sr.advance(1, lambda d: True, 1e9).key_list
    for d, s in sessions.items():
        sr.take(d, s.take_key_list(key_list))
    forwards = sr.advance(2, lambda d: True, 1e9).forwards
    update = np.full((256, 256), 0.01, np.float32)  # as far from random as an update gets
    s = sessions["d0"]
    s.take_forward(forwards["d0"])
    s.update = Envelope("update", JOB, 3, "d0", 4, "fp32", {"w": update})
    words = s.masked_update().tensors["w"]
    data = np.frombuffer(words.astype("<u4").tobytes(), np.uint8)
    counts = np.bincount(data, minlength=256)
    expected = data.size / 256
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    # 255 degrees of freedom: mean 255, sd 22.6; beyond 400 has probability below 1e-8. The
    # plain codes of this update are one byte pattern repeated (chi2 in the millions).
    assert chi2 < 400, chi2
    plain = np.frombuffer(secagg.Quantizer(0.1, 5).encode(update.ravel()).astype("<u4").tobytes(), np.uint8)
    assert float(((np.bincount(plain, minlength=256) - expected) ** 2 / expected).sum()) > 1e5
    # The words read as a sum of codes decode to noise spread over the whole range, not to the update.
    decoded = secagg.Quantizer(0.1, 5).decode(words.ravel())
    assert (
        abs(float(np.corrcoef(decoded, update.ravel() + np.random.default_rng(0).normal(0, 1e-9, update.size))[0, 1]))
        < 0.02
    )
    assert float(np.median(np.abs(decoded - update.ravel()))) > 10 * 0.01


# -- refusals ------------------------------------------------------------------------------
def test_every_bad_device_message_is_refused_with_its_reason():
    r = Round()
    s0 = r.sessions["d0"]
    keys = s0.keys_message()
    cases = [
        ("d1", keys, "sender_mismatch"),
        ("d0", SecaggKeys("other", 3, "d0", keys.cipher, keys.mask, keys.seed_hash), "wrong_job"),
        ("d0", SecaggKeys(JOB, 2, "d0", keys.cipher, keys.mask, keys.seed_hash), "stale_round"),
        ("d0", SecaggKeys(JOB, 4, "d0", keys.cipher, keys.mask, keys.seed_hash), "future_round"),
        ("x9", SecaggKeys(JOB, 3, "x9", keys.cipher, keys.mask, keys.seed_hash), "not_selected"),
        ("d0", SecaggKeys(JOB, 3, "d0", keys.cipher, keys.cipher, keys.seed_hash), "bad_keys"),
        ("d0", SecaggShares(JOB, 3, "d0", {}), "wrong_phase"),
        ("d0", SecaggReveal(JOB, 3, "d0", {}), "wrong_phase"),
    ]
    for device, msg, reason in cases:
        with pytest.raises(SecaggRefused) as exc:
            r.sr.take(device, msg)
        assert exc.value.reason == reason, (msg, exc.value)
    assert r.sr.take("d0", keys) is True
    assert r.sr.take("d0", keys) is False  # a resend changes nothing
    other = r.sessions["d1"].keys_message()
    with pytest.raises(SecaggRefused, match="duplicate"):
        r.sr.take("d0", SecaggKeys(JOB, 3, "d0", other.cipher, other.mask, other.seed_hash))
    with pytest.raises(SecaggRefused, match="bad_keys"):  # d1 cannot claim d0's keys
        r.sr.take("d1", SecaggKeys(JOB, 3, "d1", keys.cipher, keys.mask, keys.seed_hash))
    transition = r.keys()
    key_list = wire(transition.key_list, parse_secagg_key_list)
    shares = r.sessions["d2"].take_key_list(key_list)
    with pytest.raises(SecaggRefused, match="wrong_peers"):
        r.sr.take("d2", SecaggShares(JOB, 3, "d2", dict(list(shares.shares.items())[:3])))
    with pytest.raises(SecaggRefused, match="wrong_phase"):
        r.sr.take("d2", SecaggReveal(JOB, 3, "d2", {}))


def test_every_bad_masked_input_is_rejected_with_its_reason():
    ups = changes()
    r = Round()
    r.forward(r.shares(r.keys()))
    good = {k: np.zeros(s, np.uint32) for k, s in SHAPES.items()}

    def env(sender="d0", rnd=3, job=JOB, tensors=None):
        return Envelope("masked", job, rnd, sender, 4, RING_CODEC, good if tensors is None else tensors)

    cases = [
        ("d0", env(sender="d1"), "sender_mismatch"),
        ("d0", env(job="x"), "wrong_job"),
        ("d0", env(rnd=2), "stale_round"),
        ("d0", env(rnd=9), "future_round"),
        ("zz", env(sender="zz"), "not_selected"),
        ("d0", env(tensors={**good, "head": np.zeros(6, np.uint32)}), "wrong_shape"),
        ("d0", env(tensors={k: v for k, v in good.items() if k != "a"}), "missing_tensor"),
        ("d0", env(tensors={**good, "extra": np.zeros(1, np.uint32)}), "unknown_tensor"),
        ("d0", env(tensors={**good, "a": np.zeros(SHAPES["a"], np.float32)}), "wrong_shape"),
    ]
    for device, e, reason in cases:
        with pytest.raises(UpdateRejected) as exc:
            r.sr.judge_masked(device, e)
        assert exc.value.reason == reason, (reason, exc.value)
    r.mask(ups, skip=IDS[1:])
    with pytest.raises(UpdateRejected, match="duplicate"):
        r.sr.judge_masked("d0", env())


def test_a_device_not_in_the_masking_set_is_refused_and_late_inputs_too():
    r = Round()
    key_list = r.keys()
    for d, s in r.sessions.items():
        if d != "d9":
            r.sr.take(d, s.take_key_list(key_list.key_list))
    r.online.discard("d9")
    r.forward_to = r.advance()
    e = Envelope("masked", JOB, 3, "d9", 4, RING_CODEC, {k: np.zeros(s, np.uint32) for k, s in SHAPES.items()})
    with pytest.raises(UpdateRejected, match="not_masking"):
        r.sr.judge_masked("d9", e)
    r.sr.state.phase = "unmask"
    with pytest.raises(UpdateRejected, match="wrong_phase"):
        r.sr.judge_masked("d0", Envelope("masked", JOB, 3, "d0", 4, RING_CODEC, e.tensors))


# -- the device protects itself ------------------------------------------------------------
def test_the_device_refuses_a_key_list_that_swaps_its_keys_or_lowers_the_threshold():
    r = Round()
    key_list = r.keys().key_list
    s = r.sessions["d0"]
    swapped = tuple(PeerKeys(p.device, p.mask, p.cipher) if p.device == "d0" else p for p in key_list.devices)
    assert SecureSession(JOB, 3, "d0").take_key_list(key_list) is None  # fresh keys: not the listed ones
    fresh = SecureSession(JOB, 3, "d0")
    fresh.keys = s.keys
    assert fresh.take_key_list(SecaggKeyList(JOB, 3, key_list.threshold, 0.1, swapped)) is None
    assert "other keys" in fresh.failed
    low = SecureSession(JOB, 3, "d0")
    low.keys = s.keys
    assert low.take_key_list(SecaggKeyList(JOB, 3, 2, 0.1, key_list.devices)) is None
    assert "not a majority" in low.failed
    with pytest.raises(ProtocolError, match="round"):
        s.take_key_list(SecaggKeyList(JOB, 4, key_list.threshold, 0.1, key_list.devices))


def test_the_device_reveals_one_share_per_peer_and_only_for_a_consistent_survivor_set():
    r = Round()
    r.through_masking(changes())
    s = r.sessions["d0"]
    everyone = tuple(IDS)
    assert s.take_unmask(SecaggUnmask(JOB, 3, everyone[:6], everyone[6:])) is not None
    other = r.sessions["d1"]
    assert other.take_unmask(SecaggUnmask(JOB, 3, everyone[:5], everyone[5:])) is None  # 5 survivors: t = 5
    assert "cannot unmask" in other.failed
    third = r.sessions["d2"]
    assert third.take_unmask(SecaggUnmask(JOB, 3, everyone[:8], ())) is None  # d8, d9 unnamed
    assert "exactly" in third.failed
    revealed = s.revealed
    assert revealed is not None and len(revealed.shares) == 9
    held = s.held
    for owner, share in revealed.shares.items():
        assert share == (held[owner].self_seed if owner in everyone[:6] else held[owner].mask_secret)


def test_a_tampered_forward_ends_the_devices_session():
    r = Round()
    transition = r.shares(r.keys())
    forward = transition.forwards["d0"]
    owner = sorted(forward.shares)[0]
    bad = SecaggForward(JOB, 3, {**forward.shares, owner: bytes(SECAGG_SEALED_BYTES)})
    s = r.sessions["d0"]
    s.take_forward(bad)
    assert s.masking is None and "do not open" in s.failed


# -- config --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "strategy, robust, adaptive, min_devices, per_round, timeout, message",
    [
        ("flexlora", "mean", False, 3, 0, 600, "plain sums"),
        ("hetlora", "mean", False, 3, 0, 600, "plain sums"),
        ("fedavg", "median", False, 3, 0, 600, "needs the individual updates"),
        ("fedavg", "trimmed_mean", False, 3, 0, 600, "needs the individual updates"),
        ("fedavg", "mean", True, 3, 0, 600, "adaptive_clip"),
        ("fedavg", "mean", False, 2, 0, 600, "at least 3"),
        ("fedavg", "mean", False, 3, 2, 600, "at least 3"),
        ("fedavg", "mean", False, 3, 0, 100, "no time to train"),
    ],
)
def test_incompatible_settings_are_refused_before_any_work(
    strategy, robust, adaptive, min_devices, per_round, timeout, message
):
    with pytest.raises(ConfigError, match=message):
        check_secure_aggregation(SETTINGS, strategy, robust, adaptive, min_devices, per_round, timeout)
    check_secure_aggregation(SecureAggregationSettings(), strategy, robust, adaptive, min_devices, per_round, timeout)


@pytest.mark.parametrize(
    "values, message",
    [
        ({"value_clip": 0}, "value_clip"),
        ({"threshold_fraction": 0.4}, "threshold_fraction"),
        ({"threshold_fraction": 1.0}, "threshold_fraction"),
        ({"setup_timeout_s": 0.5}, "setup_timeout_s"),
        ({"unmask_timeout_s": 1e6}, "unmask_timeout_s"),
    ],
)
def test_bad_secure_aggregation_settings_are_refused(values, message):
    with pytest.raises(ConfigError, match=message):
        SecureAggregationSettings(enabled=True, **values)


def test_the_server_config_refuses_secure_aggregation_with_robust_aggregation(tmp_path):
    from server.config import ServerConfig
    from server.robust import RobustSettings
    from server.rounds import RoundSettings

    secure = SecureAggregationSettings(enabled=True, setup_timeout_s=10)
    with pytest.raises(ConfigError, match="robust.method median"):
        ServerConfig(
            bundle=tmp_path,
            secure_aggregation=secure,
            robust=RobustSettings("median"),
            rounds=RoundSettings(min_devices=3),
        )
    with pytest.raises(ConfigError, match="min_devices"):
        ServerConfig(bundle=tmp_path, secure_aggregation=secure)  # the default min_devices is 2
    ok = ServerConfig(bundle=tmp_path, secure_aggregation=secure, rounds=RoundSettings(min_devices=3))
    assert ok.secure_aggregation.enabled


def test_the_threshold_is_a_majority_of_each_devices_peers():
    for n in range(3, 60):
        t = SETTINGS.threshold(n)
        assert t > (n - 1) / 2 and t <= n - 1
    assert SecureAggregationSettings(threshold_fraction=0.9).threshold(11) == 10


# -- parsers -------------------------------------------------------------------------------
def test_sizes_in_the_parsers_are_the_cores():
    assert (SECAGG_KEY_BYTES, SECAGG_SEALED_BYTES, SECAGG_SHARE_BYTES, MAX_SECAGG_PEERS) == (
        32,
        secagg.SEALED_BYTES,
        secagg.SHARE_BYTES,
        secagg.MAX_PEERS,
    )


def test_every_secagg_message_round_trips_through_its_parser():
    k = bytes(range(32))
    msgs = [
        (SecaggKeys(JOB, 1, "d0", k, k[::-1], bytes(32)), parse_secagg_upload),
        (SecaggShares(JOB, 1, "d0", {"d1": bytes(96), "d2": b"\x01" * 96}), parse_secagg_upload),
        (SecaggReveal(JOB, 1, "d0", {"d1": bytes(34)}), parse_secagg_upload),
        (
            SecaggKeyList(JOB, 1, 2, 0.5, (PeerKeys("d0", k, k), PeerKeys("d1", k, k), PeerKeys("d2", k, k))),
            parse_secagg_key_list,
        ),
        (SecaggForward(JOB, 1, {"d1": bytes(96)}), parse_secagg_forward),
        (SecaggUnmask(JOB, 1, ("d0", "d1"), ("d2",)), parse_secagg_unmask),
    ]
    for msg, parse in msgs:
        assert parse(msg.to_bytes()) == msg


def _json(**fields) -> bytes:
    return json.dumps({"v": 1, "job": JOB, "round": 1, **fields}).encode()


K = "A" * 43 + "="  # 32 bytes of base64
S96 = "A" * 128  # 96 bytes


@pytest.mark.parametrize(
    "parse, payload, message",
    [
        (parse_secagg_upload, b"\xff\x00", "not JSON"),
        (parse_secagg_upload, b"[1]", "not a JSON object"),
        (parse_secagg_upload, b" " * (MAX_SECAGG_BYTES + 1), "exceeds"),
        (parse_secagg_upload, _json(step="keys", sender="d0", cipher=K, mask=K), "seed_hash"),
        (parse_secagg_upload, _json(step="keys", sender="d0", cipher=K[:-2], mask=K, seed_hash=K), "32 bytes"),
        (parse_secagg_upload, _json(step="keys", sender="d0", cipher="*" * 44, mask=K, seed_hash=K), "base64"),
        (parse_secagg_upload, _json(step="keys", sender="d/0", cipher=K, mask=K, seed_hash=K), "not well formed"),
        (parse_secagg_upload, _json(step="keys", sender="d0", cipher=K, mask=K, seed_hash=K, x=1), "unknown field"),
        (parse_secagg_upload, _json(step="key_list", sender="d0"), "aggregator's"),
        (parse_secagg_upload, _json(step="dance", sender="d0"), "not one of"),
        (parse_secagg_upload, _json(step="shares", sender="d0", shares={"d/1": S96}), "device id"),
        (parse_secagg_upload, _json(step="shares", sender="d0", shares={"d1": S96[:-4]}), "96 bytes"),
        (parse_secagg_upload, _json(step="shares", sender="d0", shares=[S96]), "not an object"),
        (
            parse_secagg_upload,
            _json(step="shares", sender="d0", shares={f"p{i}": S96 for i in range(1001)}),
            "at most 1000",
        ),
        (parse_secagg_upload, _json(step="reveal", sender="d0", shares={"d1": S96}), "34 bytes"),
        (parse_secagg_upload, json.dumps({"v": 2, "step": "keys"}).encode(), "protocol version 2"),
        (
            parse_secagg_upload,
            _json(step="keys", sender="d0", cipher=K, mask=K, seed_hash=K).replace(b'"round": 1', b'"round": -1'),
            "outside",
        ),
        (
            parse_secagg_key_list,
            _json(step="key_list", threshold=2, clip=0.1, devices=[{"id": "d0", "cipher": K, "mask": K}] * 2),
            "twice",
        ),
        (
            parse_secagg_key_list,
            _json(
                step="key_list",
                threshold=3,
                clip=0.1,
                devices=[{"id": f"d{i}", "cipher": K, "mask": K} for i in range(2)],
            ),
            "exceeds",
        ),
        (parse_secagg_key_list, _json(step="key_list", threshold=1, clip=0.1, devices=[]), "outside"),
        (parse_secagg_key_list, _json(step="key_list", threshold=2, clip=float("inf"), devices=[]), "non-finite"),
        (parse_secagg_key_list, _json(step="forward", shares={}), "on the key list topic"),
        (parse_secagg_forward, _json(step="forward", shares={"d1": 5}), "96 bytes"),
        (parse_secagg_unmask, _json(step="unmask", survivors=["d0", "d1"], dropped=["d1"]), "twice"),
        (parse_secagg_unmask, _json(step="unmask", survivors=["d0"] * 1001, dropped=[]), "items"),
        (parse_secagg_unmask, _json(step="unmask", survivors="d0", dropped=[]), "must be a list"),
    ],
)
def test_hostile_secagg_payloads_are_refused_with_a_protocol_error(parse, payload, message):
    with pytest.raises(ProtocolError, match=message):
        parse(payload)


def test_secagg_topics_are_parsed_not_matched():
    t = Topics(JOB)
    assert t.parse(t.secagg("d7")) == TopicRef(TopicKind.SECAGG, device="d7", channel=SecaggChannel.UP)
    assert t.parse(t.secagg_round("keys")) == TopicRef(TopicKind.SECAGG, channel=SecaggChannel.KEYS)
    assert t.parse(t.secagg_round("unmask")).channel is SecaggChannel.UNMASK
    assert t.parse(t.secagg_to("d7")) == TopicRef(TopicKind.SECAGG, device="d7", channel=SecaggChannel.TO)
    for bad in ("secagg", "secagg/round/shares", "secagg/a/b/c", "secagg/to/d 1", "secagg/round/keys/1"):
        with pytest.raises(ProtocolError):
            t.parse(f"fedlora/{JOB}/{bad}")


def test_masked_envelopes_carry_exact_ring_words_and_nothing_else():
    words = {"a": np.array([[0, 1, 2**32 - 1]], np.uint32)}
    env = decode_envelope(encode_envelope(Envelope("masked", JOB, 1, "d0", 4, RING_CODEC, words)))
    assert env.kind == "masked" and env.tensors["a"].dtype == np.uint32 and np.array_equal(env.tensors["a"], words["a"])
    with pytest.raises(ProtocolError, match="uint32 ring words"):
        encode_envelope(Envelope("masked", JOB, 1, "d0", 4, RING_CODEC, {"a": np.zeros(3, np.float32)}))
    with pytest.raises(ProtocolError, match="masked envelopes only"):
        encode_envelope(Envelope("update", JOB, 1, "d0", 4, RING_CODEC, words))
    payload = encode_envelope(Envelope("masked", JOB, 1, "d0", 4, RING_CODEC, words))
    for old, new in ((b'"masked"', b'"update"'), (b'"uint32"', b'"float32"')):
        forged = _rewrite_header(payload, old, new)
        with pytest.raises(ProtocolError):
            decode_envelope(forged)


def _rewrite_header(payload: bytes, old: bytes, new: bytes) -> bytes:
    import struct
    import zlib

    (word,) = struct.unpack_from("<I", payload, 4)
    n = word & ~(1 << 31)
    raw = payload[8 : 8 + n]
    header = zlib.decompress(raw) if word & (1 << 31) else raw
    header = header.replace(old, new)
    assert old not in header
    return payload[:4] + struct.pack("<I", len(header)) + header + payload[8 + n :]


def test_quantizer_bound_holds_for_the_largest_key_list():
    q = secagg.Quantizer(1.0, MAX_SECAGG_PEERS)
    codes = [q.encode(np.full(4, 1.0)) for _ in range(MAX_SECAGG_PEERS)]
    total = sum(c.astype(np.uint64) for c in codes) % 2**32
    assert np.allclose(q.decode(total.astype(np.uint32)), MAX_SECAGG_PEERS, atol=MAX_SECAGG_PEERS / q.scale)
    assert math.isfinite(q.scale)


# -- fedlora simulate's flags --------------------------------------------------------------
def test_every_secure_aggregation_setting_has_a_simulate_flag_that_reaches_the_server_config(monkeypatch):
    import dataclasses
    from pathlib import Path

    from simulator import cli, run

    seen = []
    monkeypatch.setattr(run, "run_simulation", lambda cfg: seen.append(cfg))
    argv = ["simulate", "--secagg-enabled", "true", "--secagg-value-clip", "0.2", "--secagg-threshold-fraction", "0.6"]
    argv += ["--secagg-setup-timeout-s", "30", "--secagg-unmask-timeout-s", "45", "--dp-mode", "distributed"]
    flags = {a for a in argv if a.startswith("--secagg-")}
    assert {f"--secagg-{f.name.replace('_', '-')}" for f in dataclasses.fields(SecureAggregationSettings)} == flags
    assert cli.main(argv) == 0
    broker = run.BrokerConfig(url="mqtt://x:1")
    server = run.server_config(seen[0], "job", Path("b"), broker, Path("s"))
    s = server.secure_aggregation
    assert (s.enabled, s.value_clip, s.threshold_fraction, s.setup_timeout_s, s.unmask_timeout_s) == (
        True,
        0.2,
        0.6,
        30.0,
        45.0,
    )
    assert server.privacy.mode == "distributed"  # composes with the devices' noise


def test_bad_simulate_secure_aggregation_settings_fail_before_any_work(capsys, monkeypatch):
    from simulator import cli, run

    monkeypatch.setattr(run, "run_simulation", lambda cfg: pytest.fail("the run started"))
    assert cli.main(["simulate", "--secagg-enabled", "true", "--robust-method", "median"]) == 2
    assert "needs the individual updates" in capsys.readouterr().err
    assert cli.main(["simulate", "--secagg-enabled", "true", "--strategy", "flora"]) == 2
    assert "plain sums" in capsys.readouterr().err
    assert cli.main(["simulate", "--secagg-enabled", "true", "--devices", "2"]) == 2
    assert "at least 3" in capsys.readouterr().err
    assert cli.main(["simulate", "--secagg-threshold-fraction", "2"]) == 2
    assert "threshold_fraction" in capsys.readouterr().err
