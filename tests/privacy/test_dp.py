"""Differential privacy on node uploads (issues 8, 15): clipping, noise, accounting, runs."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cnfgnn.data.loaders import load_dataset
from cnfgnn.experiment import build_workers, run_experiment
from cnfgnn.federation import protocol as P
from cnfgnn.federation.server import fedavg
from cnfgnn.privacy import dp
from cnfgnn.privacy.accounting import fedavg_multipliers, privacy_report, rdp_epsilon
from tests.helpers import DP, QUIET, REPLAY, TINY, RecordingEngine, inprocess_and_loopback, make_cfg


def _run(tmp_path, *overrides, wrap=None):
    cfg = make_cfg(*TINY, f"output_root={tmp_path}", *overrides)
    return run_experiment(cfg, engine_wrapper=wrap, **QUIET)


def _settings(sigma=2.0, **kw):
    return dp.PrivacySettings(
        dp.Mechanism(1.0, sigma), dp.Mechanism(0.1, sigma), dp.Mechanism(0.5, sigma), 1e-6, **kw
    )


# ---------------------------------------------------------------------- mechanisms
def test_clipping_bounds_every_per_sample_norm_and_keeps_small_ones():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 7, 2, 8, generator=g) * torch.rand(50, 7, 1, 1, generator=g) * 5
    out = dp.clip_per_sample(x, 2.0)
    norms_in, norms_out = x.flatten(2).norm(dim=-1), out.flatten(2).norm(dim=-1)
    assert (norms_in > 2.0).any() and (norms_in < 2.0).any()
    assert norms_out.max() <= 2.0 + 1e-5
    small = norms_in <= 2.0
    torch.testing.assert_close(out[small], x[small])  # untouched below the clip
    big = ~small  # clipped ones keep their direction, norm exactly C
    torch.testing.assert_close(norms_out[big], torch.full_like(norms_out[big], 2.0))
    cos = (out[big].flatten(1) * x[big].flatten(1)).sum(1) / (norms_out[big] * norms_in[big])
    torch.testing.assert_close(cos, torch.ones_like(cos))


def _std_ok(z, std):
    """Sample mean ~0 and sample std ~std (5 standard errors)."""
    z = np.asarray(z, np.float64).ravel()
    n = z.size
    assert abs(z.mean()) < 5 * std / math.sqrt(n)
    assert z.std() == pytest.approx(std, rel=5 / math.sqrt(2 * n))


def test_noise_has_std_sigma_times_clip_default_fresh_replayable_keyed_per_node():
    mech = dp.Mechanism(clip=0.5, noise_multiplier=1.5)
    x = torch.zeros(400, 3, 1, 64)
    # default (seeds None): OS-random, the right std, never the same twice
    a, b = dp.privatize(x, mech, None), dp.privatize(x, mech, None)
    _std_ok(a, 0.75)
    assert not torch.equal(a, b)
    # insecure replayable: the same std, keyed per node
    seeds = dp.release_seeds(42, np.array([4, 7, 9]), 3, "h_c", 0)
    out = dp.privatize(x, mech, seeds)
    _std_ok(out, 0.75)
    # node 7's noise is the same when it is hosted alone (grouping does not matter)
    alone = dp.privatize(
        torch.zeros(400, 1, 1, 64), mech, dp.release_seeds(42, np.array([7]), 3, "h_c", 0)
    )
    torch.testing.assert_close(alone[:, 0], out[:, 1])
    # another round, kind or counter draws fresh noise
    for key in [(4, "h_c", 0), (3, "grad", 0), (3, "h_c", 1)]:
        other = dp.privatize(x, mech, dp.release_seeds(42, np.array([4, 7, 9]), *key))
        assert not torch.allclose(other, out)
    # clip only: no noise
    assert torch.equal(dp.privatize(x, dp.Mechanism(0.5, 0.0), None), x)


def test_secure_normal_is_standard_normal():
    z = dp.secure_normal((50_001,))
    assert z.shape == (50_001,) and torch.isfinite(z).all()
    # Kolmogorov-Smirnov distance to N(0, 1): the noise is OS-random (not seedable), so use a
    # critical value a correct sampler exceeds about once in 10^6 runs (2.7 / sqrt(n))
    x, _ = z.sort()
    n = x.numel()
    cdf = torch.special.ndtr(x)
    i = torch.arange(1, n + 1, dtype=torch.float64)
    dist = torch.maximum(i / n - cdf, cdf - (i - 1) / n).max().item()
    assert dist < 2.7 / math.sqrt(n)  # still fails for a 5 % shift or a 10 % scale error


def test_settings_reject_bad_privacy_configs():
    cfg = make_cfg("privacy=dp", "privacy.grad.clip=null")
    with pytest.raises(ValueError, match="privacy.grad.noise_multiplier"):
        dp.PrivacySettings.from_cfg(cfg)
    with pytest.raises(ValueError, match="privacy.fedavg.noise_at"):
        dp.PrivacySettings.from_cfg(make_cfg("privacy=dp", "privacy.fedavg.noise_at=cloud"))
    with pytest.raises(ValueError, match="noise_at=node"):
        dp.PrivacySettings.from_cfg(
            make_cfg("privacy=dp", "privacy.secagg=true", "privacy.fedavg.noise_at=server")
        )
    assert dp.PrivacySettings.from_cfg(make_cfg()) is None  # default: off
    s = dp.PrivacySettings.from_cfg(make_cfg("privacy=dp"))
    assert not s.insecure_replayable_noise and s.fedavg_noise_at == "node"
    assert not s.secagg and not s.report_train_loss  # the secure defaults


# ---------------------------------------------------------------------- the server as attacker
def test_server_cannot_replay_default_noise_but_can_replay_insecure_noise(tmp_path):
    """The server as attacker: regenerate each node's noise from the run config (what the
    replayable scheme draws), subtract it from the upload and compare with the clipped
    clean value. Default: the residual has the std of two independent noises (sqrt 2 sigma
    C; the attacker learns nothing and is worse off than not subtracting). With the
    insecure flag the residual is ~0: the server recovers the clipped value exactly."""
    sigma, rnd = 1.0, 3  # conf/privacy/dp.yaml's noise multipliers
    for flag, expect in (("false", True), ("true", False)):
        cfg = make_cfg(
            *TINY, *DP, f"privacy.insecure_replayable_noise={flag}", "federation.nodes_per_client=3"
        )
        w = build_workers(cfg, load_dataset(cfg.dataset), torch.device("cpu"))[0]
        w.round = rnd
        clean = torch.randn(500, 3, 1, 8, generator=torch.Generator().manual_seed(1))
        for kind, mech in (("h_c", w.privacy.h_c), ("grad", w.privacy.grad)):
            up = w._private(kind, clean, rnd, 7)  # what leaves the node
            c = float(mech.clip)
            replay = dp.per_node_noise(
                tuple(clean.shape),
                sigma * c,
                dp.release_seeds(int(cfg.seed), w.series.nodes, rnd, kind, 7),
                node_dim=1,
            )
            resid = (up - replay - dp.clip_per_sample(clean, c)).double()
            if expect:
                _std_ok(resid, math.sqrt(2) * sigma * c)
            else:
                assert resid.abs().max() < 1e-5 * max(c, 1.0)
        # FedAvg, node side: the node's noise on its clipped update
        state = {"a": torch.zeros(3, 4000), "b": torch.zeros(3, 10, 100)}
        std = dp.node_update_noise_std(w.privacy.fedavg, 6)
        up = dp.noise_updates(state, std, w._replay_seeds("fedavg_node", 0))
        replay = dp.noise_updates(
            state, std, dp.release_seeds(int(cfg.seed), w.series.nodes, rnd, "fedavg_node", 0)
        )
        resid = torch.cat([(up[n] - replay[n]).flatten() for n in state]).double()
        if expect:
            _std_ok(resid, math.sqrt(2) * std)
        else:
            assert resid.abs().max() < 1e-6


# ---------------------------------------------------------------------- FedAvg
def test_fedavg_clip_and_server_noise_equal_flowers_helpers():
    from flwr.supercore.differential_privacy import (
        compute_clip_model_update,
        compute_stdv,
        get_norm,
    )

    rng = np.random.default_rng(1)
    shapes = {"a": (5, 3), "b": (4,), "c": (2, 2, 2)}
    k = 4
    before = {n: rng.normal(size=(k,) + s).astype(np.float32) for n, s in shapes.items()}
    scale = np.array([0.01, 0.3, 1.0, 5.0])  # some updates below the clip, some above
    after = {
        n: v
        + scale.reshape((-1,) + (1,) * len(shapes[n])) * rng.normal(size=v.shape).astype(np.float32)
        for n, v in before.items()
    }
    clip = 0.8
    ours = dp.clip_updates(
        {n: torch.from_numpy(v) for n, v in before.items()},
        {n: torch.from_numpy(v) for n, v in after.items()},
        clip,
    )
    names = list(shapes)
    clipped_any = False
    for node in range(k):
        theirs = [after[n][node].copy() for n in names]
        compute_clip_model_update(theirs, [before[n][node] for n in names], clip)
        for n, t in zip(names, theirs):
            np.testing.assert_allclose(ours[n][node].numpy(), t, rtol=1e-5, atol=1e-6)
        upd = [ours[n][node].numpy() - before[n][node] for n in names]
        assert get_norm(upd) <= clip + 1e-5
        clipped_any |= get_norm([after[n][node] - before[n][node] for n in names]) > clip
    assert clipped_any
    mech = dp.Mechanism(clip=clip, noise_multiplier=1.3)
    assert dp.fedavg_noise_std(mech, 24) == compute_stdv(1.3, clip, 24)
    theta = {"w": np.zeros(20000, np.float32)}
    std = compute_stdv(1.3, clip, 24)
    secure = dp.add_fedavg_noise(theta, mech, 24, seed=None, round_=3)["w"]
    _std_ok(secure, std)
    assert not np.array_equal(secure, dp.add_fedavg_noise(theta, mech, 24, None, 3)["w"])
    noisy = dp.add_fedavg_noise(theta, mech, 24, seed=42, round_=3)["w"]  # insecure: keyed
    _std_ok(noisy, std)
    np.testing.assert_array_equal(noisy, dp.add_fedavg_noise(theta, mech, 24, 42, 3)["w"])
    assert not np.array_equal(noisy, dp.add_fedavg_noise(theta, mech, 24, 42, 4)["w"])


@pytest.mark.parametrize("answered,asked", [(8, 8), (5, 8)])
def test_node_noise_in_the_aggregate_has_the_std_the_accountant_assumes(answered, asked):
    """N nodes asked, A answer: each adds sigma C / sqrt(N) to its clipped update; the
    server's uniform mean, times A, minus the sum of the clipped updates is the noise in
    the sum. Its std must be 2C x the accountant's multiplier for the released model, and
    one upload's noise 2C x its multiplier against the server (no secure aggregation)."""
    sigma, clip, d = 1.7, 0.5, 50_000
    s = dp.PrivacySettings(
        dp.Mechanism(1.0, 1.0), dp.Mechanism(1.0, 1.0), dp.Mechanism(clip, sigma), 1e-6
    )
    g = torch.Generator().manual_seed(0)
    start = {"w": torch.randn(1, d, generator=g, dtype=torch.float64).expand(answered, d)}
    trained = {"w": start["w"] + torch.randn(answered, d, generator=g, dtype=torch.float64)}
    clipped = dp.clip_updates(start, trained, clip)  # every node started from the global model
    noised = dp.noise_updates(clipped, dp.node_update_noise_std(s.fedavg, asked), None)
    mean = fedavg([{"w": noised["w"].numpy()}], [np.ones(answered)], "uniform")["w"]
    sum_noise = (
        answered * (mean.astype(np.float64) - start["w"][0].numpy())
        - (clipped["w"] - start["w"]).sum(0).numpy()
    )
    released = fedavg_multipliers(s, [(answered, asked)], against_server=False)[0]
    _std_ok(sum_noise, released * 2 * clip)
    assert released * 2 * clip == pytest.approx(sigma * clip * math.sqrt(answered / asked))
    one = (noised["w"][0] - clipped["w"][0]).numpy()
    _std_ok(one, fedavg_multipliers(s, [(answered, asked)], against_server=True)[0] * 2 * clip)
    sa = dp.PrivacySettings(s.h_c, s.grad, s.fedavg, s.delta, secagg=True)  # only the sum seen
    assert fedavg_multipliers(sa, [(answered, asked)], True)[0] == released


# ---------------------------------------------------------------------- accountant
def _opacus(steps, delta):
    from opacus.accountants import RDPAccountant

    acc = RDPAccountant()
    for z, n in steps:
        for _ in range(n):
            acc.step(noise_multiplier=z, sample_rate=1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return acc.get_epsilon(delta=delta)


SIGMA = st.floats(0.3, 20.0)
DELTA = st.sampled_from([1e-5, 1e-6, 1e-8])


@settings(max_examples=40, deadline=None)
@given(steps=st.lists(st.tuples(SIGMA, st.integers(1, 40)), min_size=1, max_size=4), delta=DELTA)
def test_epsilon_equals_opacus_rdp_accountant_for_the_composition(steps, delta):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert rdp_epsilon(steps, delta) == pytest.approx(_opacus(steps, delta), rel=1e-9)


@settings(max_examples=40, deadline=None)
@given(
    sigma=SIGMA,
    rounds=st.integers(1, 100),
    extra=st.integers(1, 50),
    delta=DELTA,
    more=st.floats(1.05, 4.0),
)
def test_epsilon_grows_with_rounds_and_falls_with_sigma(sigma, rounds, extra, delta, more):
    s = _settings(sigma, fedavg_noise_at="node", secagg=True)
    per_round = {"h_c": 1, "grad": 2, "fedavg": 1}

    def eps(r, sg=s):
        rel = {k: v * r for k, v in per_round.items()}
        return privacy_report(sg, rel, fedavg_rounds=[(6, 6)] * r)["epsilon"]

    e = eps(rounds)
    assert 0 < e < math.inf
    assert eps(rounds + extra) > e
    assert eps(rounds, _settings(sigma * more, secagg=True)) < e


def test_report_composes_every_release_at_sensitivity_2c():
    """h_c, dL/dh_G and FedAvg (noise in the sum the server sees) composed; sigma / 2."""
    s = _settings(2.0)
    rel = {"h_c": 5, "grad": 10, "fedavg": 5}
    rounds = [(6, 6)] * 4 + [(4, 6)]  # one round with two nodes silent
    secure = privacy_report(
        dp.PrivacySettings(s.h_c, s.grad, s.fedavg, s.delta, secagg=True), rel, fedavg_rounds=rounds
    )
    fed = [(1.0, 4), (1.0 * math.sqrt(4 / 6), 1)]
    assert secure["epsilon"] == pytest.approx(rdp_epsilon([(1.0, 15), *fed], 1e-6))
    assert secure["epsilon"] > max(secure["epsilon_per_mechanism"].values())
    plain = privacy_report(s, rel, fedavg_rounds=rounds)  # the server sees each update
    assert plain["epsilon"] == pytest.approx(
        rdp_epsilon([(1.0, 15), (1.0 / math.sqrt(6), 5)], 1e-6)
    )
    assert plain["epsilon"] > secure["epsilon"]
    # what the plain run's releases would give under SecAgg+: the secure run's epsilon
    assert secure["epsilon_with_secagg"] == pytest.approx(secure["epsilon"])
    assert plain["epsilon_with_secagg"] == pytest.approx(secure["epsilon"])
    central = privacy_report(_settings(2.0, fedavg_noise_at="server"), rel, fedavg_rounds=rounds)
    assert "TRUSTED server" in central["threat_model"]
    assert math.isinf(central["epsilon_against_server"])
    assert central["epsilon_with_secagg"] is None  # the server must see updates to add noise
    assert central["epsilon"] == pytest.approx(rdp_epsilon([(1.0, 15), (1.0, 4), (4 / 6, 1)], 1e-6))


@pytest.mark.parametrize(
    "kw,releases,reason",
    [
        ({"per_node_models": True}, {"h_c": 1, "grad": 1}, "own model"),
        ({"global_scaling": True}, {"h_c": 1, "grad": 1, "fedavg": 1}, "scaler statistics"),
        ({}, {"h_c": 1, "raw": 1}, "FMTL"),
    ],
)
def test_unbounded_releases_give_no_finite_epsilon(kw, releases, reason):
    r = privacy_report(_settings(), releases, **kw)
    assert math.isinf(r["epsilon"]) and math.isinf(r["epsilon_against_server"])
    assert any(reason in w for w in r["not_private"])
    for s, why in (
        (_settings(report_train_loss=True), "training-loss"),
        (_settings(insecure_replayable_noise=True), "INSECURE"),
    ):
        r = privacy_report(s, {"h_c": 1})
        assert math.isinf(r["epsilon"]) and any(why in w for w in r["not_private"])
    clip_only = dp.PrivacySettings(
        dp.Mechanism(1.0, 0.0), dp.Mechanism(0.1, 1.0), dp.Mechanism(0.5, 1.0), 1e-6
    )
    assert math.isinf(privacy_report(clip_only, {"h_c": 1})["epsilon"])


def test_released_forecasts_are_listed_as_unprotected_only_when_sent():
    rel = {"h_c": 1, "grad": 1, "fedavg": 1}
    quiet = privacy_report(_settings(), rel, fedavg_rounds=[(6, 6)])["unprotected"]
    sent = privacy_report(_settings(), rel, fedavg_rounds=[(6, 6)], forecasts_released=True)
    assert not any("forecast" in u for u in quiet)
    assert any("predictions.release" in u for u in sent["unprotected"])


# ---------------------------------------------------------------------- runs
def test_disabled_is_bit_identical_to_no_privacy_group(tmp_path):
    """privacy=none composes to the same run as a config without the group (as before)."""
    from omegaconf import open_dict

    cfg_none = make_cfg(*TINY, f"output_root={tmp_path}/a", "privacy=none", "federation.rounds=1")
    cfg_old = make_cfg(*TINY, f"output_root={tmp_path}/b", "federation.rounds=1")
    with open_dict(cfg_old):
        del cfg_old["privacy"]  # configs written before the group existed
    a, _ = run_experiment(cfg_none, **QUIET)
    b, _ = run_experiment(cfg_old, **QUIET)
    assert "privacy" not in a and "privacy" not in b
    for key in ("rmse", "mae", "masked_mae_h3"):
        assert a["test"][key] == b["test"][key]
    assert a["bytes"] == b["bytes"]


def test_uploads_are_clipped_no_loss_sums_and_run_reports_epsilon(tmp_path):
    rec = {}

    def wrap(engine):
        rec["engine"] = RecordingEngine(engine)
        return rec["engine"]

    # clip only (sigma = 0): every uploaded window's h_c and dL/dh_G has norm <= C exactly
    final, writer = _run(
        tmp_path / "clip",
        *DP,
        "privacy.h_c.noise_multiplier=0",
        "privacy.grad.noise_multiplier=0",
        "privacy.fedavg.noise_multiplier=0",
        wrap=wrap,
    )
    seen = set()
    for _mtype, reply in rec["engine"].received:
        assert P.LOSS_SUM not in reply and P.LOSS_COUNT not in reply  # privacy=dp: no loss sums
        if P.H_C in reply:
            assert (
                np.linalg.norm(reply[P.H_C].reshape(*reply[P.H_C].shape[:2], -1), axis=-1).max()
                <= 1.0 + 1e-5
            )
            seen.add("h_c")
        if P.GRAD in reply:
            assert (
                np.linalg.norm(reply[P.GRAD].reshape(*reply[P.GRAD].shape[:2], -1), axis=-1).max()
                <= 0.01 + 1e-6
            )
            seen.add("grad")
    assert seen == {"h_c", "grad"}
    assert final["privacy"]["epsilon"] is None or math.isinf(final["privacy"]["epsilon"])
    rounds = [json.loads(x) for x in (writer.dir / "metrics.jsonl").read_text().splitlines()]
    assert rounds and all(r.get("train_loss") is None for r in rounds)
    # with noise: finite epsilon in final.json, h_c + grad + fedavg composed, 6 nodes, no
    # secure aggregation (the server sees each update with sigma C / sqrt 6)
    final, writer = _run(tmp_path / "noise", *DP)
    saved = json.loads((writer.dir / "final.json").read_text())["privacy"]
    assert saved["releases_per_window"] == {"fedavg": 1, "h_c": 1, "grad": 1}
    assert saved["fedavg"]["rounds_answered_asked"] == [[6, 6]]
    assert saved["epsilon"] == pytest.approx(rdp_epsilon([(0.5, 2), (0.5 / math.sqrt(6), 1)], 1e-6))
    assert saved["insecure_replayable_noise"] is False and saved["not_private"] == []
    assert any("error sums" in u for u in saved["unprotected"])
    assert not any("forecast" in u for u in saved["unprotected"])  # none sent by default
    assert saved["delta"] == 1e-6 and math.isfinite(final["test"]["rmse"])
    # the default noise is fresh: the same config twice gives two different runs
    again, _ = _run(tmp_path / "again", *DP)
    assert again["test"]["rmse"] != final["test"]["rmse"]


def test_insecure_flag_is_marked_and_loss_sums_come_back_when_asked(tmp_path):
    lines = []
    cfg = make_cfg(*TINY, f"output_root={tmp_path}", *DP, *REPLAY, "privacy.report_train_loss=true")
    final, writer = run_experiment(cfg, progress=lines.append)
    assert final["privacy"]["insecure_replayable_noise"] is True
    assert any("INSECURE" in line for line in lines[:2])  # said before training starts
    assert any("INSECURE" in line for line in lines[-3:])  # and with epsilon at the end
    assert final["privacy"]["epsilon"] is None or math.isinf(final["privacy"]["epsilon"])
    assert any("training-loss" in u for u in final["privacy"]["unprotected"])
    rounds = [json.loads(x) for x in (writer.dir / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["train_loss"]) for r in rounds)


@pytest.mark.slow
def test_dp_noise_does_not_depend_on_grouping(tmp_path):
    """With replayable noise: one client per sensor or three per client, the same run."""
    a, _ = _run(tmp_path / "a", *DP, *REPLAY, "federation.nodes_per_client=1")
    b, _ = _run(tmp_path / "b", *DP, *REPLAY, "federation.nodes_per_client=3")
    assert a["test"]["rmse"] == pytest.approx(b["test"]["rmse"], rel=1e-4)


def test_split_learning_with_dp_reports_unbounded_epsilon_with_the_reason(tmp_path):
    final, _ = _run(
        tmp_path,
        *DP,
        "federation=split_learning",
        "federation.rounds=2",
        "federation.nodes_per_client=3",
        "federation.scaling=per_node",
    )
    pr = final["privacy"]
    assert pr["releases_per_window"] == {"h_c": 2, "grad": 2}
    assert pr["epsilon"] is None or math.isinf(pr["epsilon"])
    assert any("own model" in w for w in pr["not_private"])


def test_dp_through_the_flower_client_app(flower_env, task_identity):
    """DP run over the real ClientApp (fresh process per message) = in-process."""
    args = (*TINY, *DP, *REPLAY, "federation.nodes_per_client=2")
    ref, final = inprocess_and_loopback(flower_env, task_identity, *args)
    assert final["test"]["rmse"] == pytest.approx(ref["test"]["rmse"], rel=1e-5)
    assert final["privacy"]["epsilon_per_mechanism"] == ref["privacy"]["epsilon_per_mechanism"]
