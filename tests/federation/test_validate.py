"""Bad and hostile input: malformed requests are refused, bad replies are left out.

Property tests (hypothesis) mutate a valid payload of every message type in one way that
makes it malformed (missing key, junk key, wrong type/dtype/shape, NaN/inf, out-of-range
index, unknown split/action/type, sensors the client does not host). The node must refuse
each with :class:`MalformedMessage` (the engines turn it into an error reply) and never
raise anything else, never answer normally, never change its state. Server side, mutated
replies and absurd magnitudes must fail :func:`check_reply`; a hostile client in a run is
left out of that phase, the run finishes with finite metrics and ``final.json`` says so.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cnfgnn.data.loaders import load_dataset
from cnfgnn.evaluation.metrics import SUM_KEYS
from cnfgnn.experiment import build_workers, run_experiment
from cnfgnn.federation import protocol as P
from cnfgnn.federation.validate import (
    MALFORMED_CODE,
    MAX_COUNTER,
    MalformedMessage,
    check_reply,
    check_request,
)
from tests.helpers import TINY, in_process_federation, make_cfg

FUZZ = settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


# ---------------------------------------------------------------------- a tiny federation
@pytest.fixture(scope="module")
def fed(tmp_path_factory):
    """6 sensors, 2 per client, set up; client 0 has encoded train and val, and holds a
    pending split-learning batch (so every message type has a valid request)."""
    cfg = make_cfg(
        *TINY, f"output_root={tmp_path_factory.mktemp('v')}", "federation.nodes_per_client=2"
    )
    data, workers, orch = in_process_federation(cfg)
    w = workers[0]
    w.handle(P.ENCODE, {P.SPLIT: P.TRAIN})
    w.handle(P.ENCODE, {P.SPLIT: P.VAL})
    w.handle(P.KEEP_MODEL, {P.ACTION: P.KEEP_BEST})
    valid = _valid_requests(w, orch)
    w.handle(P.SL_DECODE, valid[P.SL_DECODE])  # leaves the pending batch for sl_backward
    return {"cfg": cfg, "data": data, "workers": workers, "orch": orch, "worker": w, "valid": valid}


def _valid_requests(w, orch) -> dict[str, P.Payload]:
    m = w.cfg.model
    k, lay, hid = w.num_nodes, m.num_layers, m.hidden_size
    n = {s: len(w.series.starts[s]) for s in P.SPLITS}
    rng = np.random.default_rng(0)

    def h(b):
        return rng.normal(size=(b, k, lay, hid)).astype(np.float32)

    batch = np.array([1, 4, 9], np.int64)
    ends = np.array([w.in_steps - 1, 100, w.series.speed.shape[0] - 1], np.int64)
    theta = P.weights_to_payload(orch.theta)
    return {
        P.HELLO: {},
        P.STATS: {},
        P.CONFIGURE: {P.SCALER_MEAN: np.full(k, 50.0), P.SCALER_STD: np.full(k, 10.0)} | theta,
        P.LOCAL_TRAIN: {P.ROUND: 1, P.STEP: 0} | theta,
        P.ENCODE: {P.SPLIT: P.TRAIN} | theta,
        P.SPLIT_STEP: {P.BATCH: batch, P.ROUND: 1, P.STEP: 3, P.H_G: h(3)},
        P.EMBED: {P.H_G: h(n[P.TRAIN])},
        P.EVALUATE: {P.SPLIT: P.VAL, P.H_G: h(n[P.VAL]), P.REPORT: np.arange(4)},
        P.KEEP_MODEL: {P.ACTION: P.RESTORE_BEST},
        P.SL_ENCODE: {P.BATCH: batch},
        P.SL_DECODE: {P.BATCH: batch, P.ROUND: 1, P.STEP: 3, P.H_G: h(3)},
        P.SL_BACKWARD: {P.GRAD_H_C: h(3)},
        P.PREDICT_ENCODE: {P.ENDS: ends},
        P.PREDICT: {P.ENDS: ends, P.H_G: h(3), P.NOISE: 0.5},
    }


# keys whose removal alone makes the request malformed (others are optional, or one of a
# group that must come whole: the scaler pair, the node-model tensors)
REQUIRED = {
    P.CONFIGURE: [P.SCALER_MEAN, P.SCALER_STD],
    P.LOCAL_TRAIN: [P.ROUND, P.STEP],
    P.ENCODE: [P.SPLIT],
    P.SPLIT_STEP: [P.BATCH, P.ROUND, P.STEP, P.H_G],
    P.EMBED: [P.H_G],
    P.EVALUATE: [P.SPLIT, P.H_G],
    P.KEEP_MODEL: [P.ACTION],
    P.SL_ENCODE: [P.BATCH],
    P.SL_DECODE: [P.BATCH, P.ROUND, P.STEP, P.H_G],
    P.SL_BACKWARD: [P.GRAD_H_C],
    P.PREDICT_ENCODE: [P.ENDS],
    P.PREDICT: [P.ENDS, P.H_G],
}
# int-array keys whose empty value is valid (any number of windows may be asked for)
EMPTY_OK = {P.REPORT, P.ENDS}
# float keys whose shape may also be () (the scaler: one for all nodes, or one per node)
SCALAR_OK = {P.SCALER_MEAN, P.SCALER_STD}

JUNK = st.one_of(
    st.none(),
    st.text(max_size=5),
    st.integers(-5, 5),
    st.floats(),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=2), st.integers(), max_size=2),
    st.just(np.zeros(3, np.float32)),
    st.just(b"\x00\xff"),
)


@st.composite
def _malformed(draw, valid: dict[str, P.Payload], k: int):
    """``(message type, payload, what was done)`` with exactly one thing wrong."""
    mtype = draw(st.sampled_from(sorted(valid)))
    base = {key: (v.copy() if isinstance(v, np.ndarray) else v) for key, v in valid[mtype].items()}
    ops = ["junk_key", "not_hosted"] + (["drop"] if REQUIRED.get(mtype) else [])
    ops += ["retype"] * bool(base) + ["value"] * bool(base)
    op = draw(st.sampled_from(ops))
    if op == "junk_key":
        name = draw(
            st.text(min_size=1, max_size=8).filter(
                lambda s: (
                    s not in base
                    and s != P.NODES
                    and not s.startswith(("w.", "nbr."))
                    and s not in (P.REPORT, P.NOISE, P.OWN_MODEL)
                )
            )
        )
        base[name] = draw(JUNK)
        return mtype, base, f"junk key {name!r}"
    if op == "not_hosted":
        nodes = np.arange(k, dtype=np.int64) + draw(st.integers(2, 50))  # client 0 hosts 0..k-1
        base[P.NODES] = nodes
        return mtype, base, "nodes not hosted"
    if op == "drop":
        key = draw(st.sampled_from(REQUIRED[mtype]))
        del base[key]
        return mtype, base, f"drop {key}"
    key = draw(st.sampled_from(sorted(base)))
    v = base[key]
    if op == "retype":
        bad = draw(
            st.one_of(
                st.none(),
                st.text(max_size=4),
                st.lists(st.integers(), max_size=2),
                st.just({"a": 1}),
            )
        )
        if isinstance(v, str):  # a string stays a string only if it is no valid choice
            bad = draw(st.one_of(st.none(), st.integers(), st.just(np.array(["x"]))))
        if isinstance(v, float):  # NOISE
            bad = draw(
                st.one_of(
                    st.text(max_size=3),
                    st.just(float("nan")),
                    st.just(-1.0),
                    st.just(True),
                    st.just(np.array([0.5])),
                )
            )
        base[key] = bad
        return mtype, base, f"retype {key} -> {type(bad).__name__}"
    # op == "value": wrong dtype, shape, NaN/inf, out-of-range, unknown choice
    if isinstance(v, str):
        known = P.SPLITS + (P.KEEP_BEST, P.RESTORE_BEST)
        base[key] = draw(st.text(max_size=12).filter(lambda s: s not in known))
    elif isinstance(v, float):
        base[key] = draw(st.sampled_from([float("inf"), -0.1, 1e9]))
    elif isinstance(v, int):
        base[key] = draw(
            st.one_of(
                st.integers(max_value=-1),
                st.integers(min_value=MAX_COUNTER + 1),
                st.floats(allow_nan=True),
                st.just(True),
                st.just("1"),
                st.just(np.array([1])),
            )
        )
    elif v.dtype.kind == "f":
        how = draw(
            st.sampled_from(
                ["nonfinite", "dtype", "grow", "extra_axis", "drop_axis"]
                + (["nonpositive"] if key == P.SCALER_STD else [])
            )
        )
        if how == "nonfinite":
            flat = v.reshape(-1)
            flat[draw(st.integers(0, flat.size - 1))] = draw(
                st.sampled_from([np.nan, np.inf, -np.inf])
            )
        elif how == "dtype":
            v = v.astype(draw(st.sampled_from([np.int64, np.int32, bool, np.complex64, "U3"])))
        elif how == "grow":
            axis = draw(st.integers(0, v.ndim - 1))
            v = np.concatenate([v, np.take(v, [0] * draw(st.integers(1, 3)), axis=axis)], axis)
        elif how == "extra_axis":
            v = v[..., None]
        elif how == "drop_axis" and key not in SCALAR_OK:
            v = v[..., 0]
        elif how == "drop_axis":
            v = v[:, None]
        else:
            v[draw(st.integers(0, v.size - 1))] = draw(st.sampled_from([0.0, -1.0]))
        base[key] = v
        return mtype, base, f"{how} {key}"
    else:  # int arrays: BATCH, REPORT, ENDS
        how = draw(
            st.sampled_from(["high", "low", "float", "2d"] + ([] if key in EMPTY_OK else ["empty"]))
        )
        if how == "high":
            v[draw(st.integers(0, v.size - 1))] = 10**6 + draw(st.integers(0, 10**9))
        elif how == "low":
            v[draw(st.integers(0, v.size - 1))] = -1 - draw(st.integers(0, 10**9))
        elif how == "float":
            v = v.astype(np.float64)
        elif how == "2d":
            v = v[:, None]
        else:
            v = v[:0]
        base[key] = v
        return mtype, base, f"{how} {key}"
    return mtype, base, f"value {key}"


def test_valid_requests_pass(fed):
    """The bases are valid: what the fuzz tests see is their one mutation."""
    lim = fed["worker"].limits()
    for mtype, payload in fed["valid"].items():
        out = check_request(mtype, payload, lim)
        assert set(out) == set(payload), mtype


def test_malformed_requests_are_refused(fed):
    from tests.helpers import same_state

    w = fed["worker"]
    before = w.state_dict()
    seen: set[str] = set()

    @FUZZ
    @given(case=_malformed(fed["valid"], w.num_nodes))
    def check(case):
        mtype, payload, what = case
        seen.add(mtype)
        with pytest.raises(MalformedMessage) as e:
            w.handle(mtype, payload)
        assert mtype in str(e.value), (what, str(e.value))

    check()
    same_state(before, w.state_dict())  # refused before dispatch: nothing changed
    assert len(seen) >= 10, seen


@FUZZ
@given(
    mtype=st.one_of(
        # hypothesis also draws string constants of the code under test: keep real types out
        st.text(max_size=20).filter(lambda s: P.message(s) is None),
        st.integers(),
        st.none(),
        st.sampled_from(["query.Hello", "train.local ", P.IDENTIFY]),
    )
)
def test_unknown_message_types_are_refused(fed, mtype):
    with pytest.raises(MalformedMessage, match="unknown message type"):
        fed["worker"].handle(mtype, {})


@FUZZ
@given(
    payload=st.one_of(
        st.none(), st.text(max_size=5), st.lists(st.integers(), max_size=3), st.just(np.zeros(3))
    )
)
def test_a_payload_that_is_not_a_dict_is_refused(fed, payload):
    with pytest.raises(MalformedMessage):
        fed["worker"].handle(P.HELLO, payload)


def test_engine_turns_malformed_requests_into_error_replies(fed):
    engine = fed["orch"].engine
    out = engine.send(P.SPLIT_STEP, {0: fed["valid"][P.SPLIT_STEP] | {P.ROUND: -3}})
    assert isinstance(out[0], P.ClientFailure)
    assert "MalformedMessage" in out[0].reason and "'round'" in out[0].reason
    out = engine.send("query.nonsense", {0: {}})
    assert isinstance(out[0], P.ClientFailure) and "unknown message type" in out[0].reason


def test_out_of_order_messages_are_refused(fed):
    """What needs an earlier message says so (no KeyError, no assert)."""
    cfg, data = fed["cfg"], fed["data"]
    fresh = build_workers(cfg, data, torch.device("cpu"))[1]
    with pytest.raises(MalformedMessage, match="before query.configure"):
        fresh.handle(P.ENCODE, {P.SPLIT: P.TRAIN})
    fresh.handle(P.CONFIGURE, {P.SCALER_MEAN: np.float64(50), P.SCALER_STD: np.float64(10)})
    valid = fed["valid"]
    with pytest.raises(MalformedMessage, match="before query.encode"):
        fresh.handle(P.SPLIT_STEP, valid[P.SPLIT_STEP])
    with pytest.raises(MalformedMessage, match="without a pending"):
        fresh.handle(P.SL_BACKWARD, valid[P.SL_BACKWARD])
    with pytest.raises(MalformedMessage, match="not encoded"):
        fresh.handle(P.EVALUATE, valid[P.EVALUATE])


def test_client_app_answers_malformed_with_an_error_reply(
    fed, tmp_path, monkeypatch, task_identity
):  # noqa: F811
    """The Flower path: the ClientApp returns an error Message instead of raising."""
    from flwr.app import Context, Message, RecordDict

    from cnfgnn.config import RUN_CONFIG_KEY, overrides_for
    from cnfgnn.flower import client_app
    from cnfgnn.flower.codec import pack

    monkeypatch.setenv("CNFGNN_STATE_ROOT", str(tmp_path / "state"))
    cfg = make_cfg(
        *TINY, f"output_root={tmp_path}", "engine=simulation", "federation.nodes_per_client=2"
    )
    ctx = Context(
        run_id=task_identity,
        node_id=7,
        node_config={"partition-id": 0, "num-partitions": 3},
        state=RecordDict(),
        run_config={RUN_CONFIG_KEY: overrides_for(cfg, tmp_path)},
    )
    for mtype, payload in [
        (P.HELLO, {"junk": 1}),
        (P.ENCODE, {P.SPLIT: P.TRAIN}),
        (P.KEEP_MODEL, {P.ACTION: "drop_tables"}),
    ]:
        msg = Message(pack(payload), dst_node_id=7, message_type=mtype)
        reply = client_app.app(msg, ctx)
        assert reply.has_error(), mtype
        assert reply.error.code == MALFORMED_CODE and "MalformedMessage" in reply.error.reason
    ok = client_app.app(Message(pack({}), dst_node_id=7, message_type=P.HELLO), ctx)
    assert not ok.has_error()
    client_app._WORKERS.clear()


# ---------------------------------------------------------------------- replies (server)
@pytest.fixture(scope="module")
def replies(fed):
    """Valid replies of client 0 to each request, with the request and its limits."""
    orch, w, valid = fed["orch"], fed["worker"], fed["valid"]
    lim = orch._reply_limits()
    asked = {
        P.HELLO: {},
        P.STATS: {},
        P.LOCAL_TRAIN: {P.ROUND: 1, P.STEP: 0},
        P.ENCODE: {P.SPLIT: P.TRAIN},
        P.SPLIT_STEP: valid[P.SPLIT_STEP],
        P.EVALUATE: valid[P.EVALUATE],
        P.SL_ENCODE: valid[P.SL_ENCODE],
        P.PREDICT_ENCODE: valid[P.PREDICT_ENCODE],
        P.PREDICT: valid[P.PREDICT],
    }
    state = w.state_dict()
    out = {m: (req, w.handle(m, req)) for m, req in asked.items()}
    w.load_state_dict(state)
    return out, lim, w.num_nodes


def test_valid_replies_pass(replies):
    out, lim, k = replies
    for mtype, (req, rep) in out.items():
        assert set(check_reply(mtype, req, rep, k, lim)) == set(rep), mtype
    assert set(out[P.EVALUATE][1]) >= {P.ERR_PREFIX + s for s in SUM_KEYS}


def test_forecasts_come_up_only_when_released_and_only_of_hosted_sensors(fed, replies):
    out, lim, k = replies
    req, rep = out[P.EVALUATE]
    assert P.FORECAST not in rep  # the default: kept on the node
    fc = np.zeros((len(req[P.REPORT]), lim.horizon, 1), np.float32)
    with pytest.raises(MalformedMessage, match=P.FORECAST):  # not asked for: refused
        check_reply(P.EVALUATE, req, rep | {P.FORECAST: fc}, k, lim)
    asked = req | {P.REPORT_NODES: fed["worker"].series.nodes[:1], P.RELEASE: True}
    assert P.FORECAST in check_reply(P.EVALUATE, asked, rep | {P.FORECAST: fc}, k, lim)
    with pytest.raises(MalformedMessage, match=P.FORECAST):  # asked, one sensor: [W, H, 1]
        check_reply(P.EVALUATE, asked, rep | {P.FORECAST: np.concatenate([fc, fc], 2)}, k, lim)
    lim_node = fed["worker"].limits()
    base = fed["valid"][P.EVALUATE]
    for bad in (np.array([10**3]), np.repeat(fed["worker"].series.nodes[:1], 2)):
        with pytest.raises(MalformedMessage, match=P.REPORT_NODES):  # not hosted / twice
            check_request(P.EVALUATE, base | {P.REPORT_NODES: bad}, lim_node)


@st.composite
def _bad_reply(draw, out):
    mtype = draw(st.sampled_from(sorted(out)))
    req, rep = out[mtype]
    rep = {key: (v.copy() if isinstance(v, np.ndarray) else v) for key, v in rep.items()}
    key = draw(st.sampled_from(sorted(rep)))
    v = rep[key]
    op = draw(
        st.sampled_from(["junk", "retype", "value"] + ([] if key == P.FIRST_START else ["drop"]))
    )  # the one optional
    if op == "drop":
        del rep[key]
    elif op == "junk":
        rep["zz_" + draw(st.text(max_size=4))] = draw(JUNK)
    elif op == "retype":
        rep[key] = draw(
            st.one_of(st.none(), st.just([1, 2]), st.just({"x": 1}))
            if not isinstance(v, str)
            else st.one_of(st.none(), st.integers())
        )
    elif isinstance(v, np.ndarray) and v.dtype.kind == "f":
        how = draw(st.sampled_from(["nan", "huge", "negative", "shape"]))
        flat = v.reshape(-1)
        i = draw(st.integers(0, flat.size - 1))
        if how == "nan":
            flat[i] = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
        elif how == "huge":  # above federation.reply_max_abs (1e6), or beyond float32
            flat[i] = draw(st.sampled_from([1e30, -1e30, 2e6, 3e38]))
        elif how == "negative" and (
            key.startswith(P.ERR_PREFIX)
            or key in (P.LOSS_SUM, P.LOSS_COUNT, P.STAT_SUMSQ, P.STAT_COUNT)
        ):
            flat[i] = -1.0
        else:
            v = v[..., None]
        rep[key] = v
    elif isinstance(v, np.ndarray):  # int arrays: NODES, NUM_WINDOWS, NUM_EXAMPLES, FIRST_START
        rep[key] = np.full_like(v, -(10**6)) if draw(st.booleans()) else v.astype(np.float32)
    elif isinstance(v, int):  # STEP: beyond what the local epochs allow, or back in time
        rep[key] = draw(st.sampled_from([-1, 10**9, 10**15]))
    else:  # SENSOR_IDS
        rep[key] = draw(st.one_of(st.none(), st.integers()))
    return mtype, req, rep


def test_bad_replies_are_detected(replies):
    out, lim, k = replies

    @FUZZ
    @given(case=_bad_reply(out))
    def check(case):
        mtype, req, rep = case
        with pytest.raises(MalformedMessage):
            check_reply(mtype, req, rep, k, lim)

    check()


def test_inflated_example_counts_cannot_dominate_fedavg(replies):
    out, lim, k = replies
    req, rep = out[P.LOCAL_TRAIN]
    with pytest.raises(MalformedMessage, match="num_examples"):
        check_reply(P.LOCAL_TRAIN, req, rep | {P.NUM_EXAMPLES: rep[P.NUM_EXAMPLES] * 1000}, k, lim)


# ---------------------------------------------------------------------- a hostile client
class Hostile:
    """Wraps a worker: in ``round_`` its ``message_type`` reply is poisoned by ``poison``."""

    def __init__(self, worker, message_type, poison, round_=1):
        self.worker, self.message_type = worker, message_type
        self.poison, self.round_ = poison, round_
        self.poisoned = 0

    def __getattr__(self, name):
        return getattr(self.worker, name)

    def handle(self, mtype, payload):
        reply = self.worker.handle(mtype, payload)
        if mtype == self.message_type and self.worker.round == self.round_:
            self.poisoned += 1
            return self.poison(reply)
        return reply


def _scale(keys, factor):
    def poison(reply):
        return {
            k: (v * np.float32(factor) if any(k.startswith(p) for p in keys) else v)
            for k, v in reply.items()
        }

    return poison


@pytest.mark.parametrize(
    "mtype, poison, phase",
    [
        (P.LOCAL_TRAIN, _scale([P.WEIGHTS_PREFIX], 1e30), "local"),
        (P.SPLIT_STEP, _scale([P.GRAD], np.nan), "split"),
    ],
)
def test_hostile_client_is_left_out_and_the_run_says_so(tmp_path, mtype, poison, phase):
    cfg = make_cfg(
        *TINY, f"output_root={tmp_path}", "federation.nodes_per_client=2", "federation.rounds=1"
    )
    data = load_dataset(cfg.dataset)
    hostile = {}

    def wrap(engine):
        engine.workers[1] = hostile.setdefault(1, Hostile(engine.workers[1], mtype, poison))
        return engine

    lines: list[str] = []
    final, writer = run_experiment(cfg, progress=lines.append, engine_wrapper=wrap)
    assert hostile[1].poisoned >= 1
    bad = [f for f in final["failures"] if f["client"] == 1]
    assert bad and all(f["phase"] == phase and f["round"] == 1 for f in bad), final["failures"]
    assert all(f["reason"].startswith("bad reply:") for f in bad)
    assert bad[0]["sensors"] == [data.sensor_ids[i] for i in (2, 3)]
    assert any("client 1" in s and "bad reply" in s for s in lines)
    on_disk = json.loads((writer.dir / "final.json").read_text())
    assert on_disk["failures"][0]["reason"].startswith("bad reply:")
    for key in ("rmse", "mae"):
        assert np.isfinite(final["test"][key]), key
    assert final["test"]["rmse"] < 100  # the poisoned values never reached the model
    ckpt = torch.load(writer.dir / "checkpoint.pt", weights_only=False)
    assert all(np.isfinite(v).all() and np.abs(v).max() < 1e3 for v in ckpt["theta"].values())
    assert all(torch.isfinite(v).all() for v in ckpt["server"]["gn"].values())
