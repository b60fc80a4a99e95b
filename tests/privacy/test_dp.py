"""Differential privacy on node uploads (issue 8): clipping, noise, accounting, runs."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from cnfgnn.experiment import run_experiment
from cnfgnn.federation import protocol as P
from cnfgnn.privacy import dp
from cnfgnn.privacy.accounting import privacy_report, rdp_epsilon
from tests.helpers import TINY, RecordingEngine, make_cfg

QUIET = {"progress": lambda s: None}
DP = ("privacy=dp", "privacy.h_c.clip=1.0", "privacy.grad.clip=0.01",
      "privacy.fedavg.clip=0.5", "federation.rounds=1")


def _run(tmp_path, *overrides, wrap=None):
    cfg = make_cfg(*TINY, f"output_root={tmp_path}", *overrides)
    return run_experiment(cfg, engine_wrapper=wrap, **QUIET)


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


def test_noise_has_std_sigma_times_clip_and_is_keyed_per_node():
    mech = dp.Mechanism(clip=0.5, noise_multiplier=1.5)
    x = torch.zeros(400, 3, 1, 64)
    seeds = dp.release_seeds(42, np.array([4, 7, 9]), 3, "h_c", 0)
    out = dp.privatize(x, mech, seeds)
    z = out.flatten().double()
    n = z.numel()
    assert abs(z.mean().item()) < 4 * 0.75 / math.sqrt(n)
    assert z.std().item() == pytest.approx(0.75, rel=4 * math.sqrt(2 / n) * 2)
    # node 7's noise is the same when it is hosted alone (grouping does not matter)
    alone = dp.privatize(torch.zeros(400, 1, 1, 64), mech,
                         dp.release_seeds(42, np.array([7]), 3, "h_c", 0))
    torch.testing.assert_close(alone[:, 0], out[:, 1])
    # another round, kind or counter draws fresh noise
    for key in [(4, "h_c", 0), (3, "grad", 0), (3, "h_c", 1)]:
        other = dp.privatize(x, mech, dp.release_seeds(42, np.array([4, 7, 9]), *key))
        assert not torch.allclose(other, out)
    # clip only: no noise
    assert torch.equal(dp.privatize(x, dp.Mechanism(0.5, 0.0), seeds), x)


def test_settings_reject_noise_without_clip():
    cfg = make_cfg("privacy=dp", "privacy.grad.clip=null")
    with pytest.raises(ValueError, match="privacy.grad.noise_multiplier"):
        dp.PrivacySettings.from_cfg(cfg)
    assert dp.PrivacySettings.from_cfg(make_cfg()) is None  # default: off


# ---------------------------------------------------------------------- FedAvg vs Flower
def test_fedavg_clip_and_noise_equal_flowers_helpers():
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
    after = {n: v + scale.reshape((-1,) + (1,) * len(shapes[n])) *
             rng.normal(size=v.shape).astype(np.float32) for n, v in before.items()}
    clip = 0.8
    ours = dp.clip_updates({n: torch.from_numpy(v) for n, v in before.items()},
                           {n: torch.from_numpy(v) for n, v in after.items()}, clip)
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
    # the noise added to the mean has that std (and is reproducible from the seed)
    theta = {"w": np.zeros(20000, np.float32)}
    noisy = dp.add_fedavg_noise(theta, mech, 24, seed=42, round_=3)["w"]
    std = compute_stdv(1.3, clip, 24)
    assert noisy.std() == pytest.approx(std, rel=0.05)
    np.testing.assert_array_equal(noisy, dp.add_fedavg_noise(theta, mech, 24, 42, 3)["w"])
    assert not np.array_equal(noisy, dp.add_fedavg_noise(theta, mech, 24, 42, 4)["w"])


# ---------------------------------------------------------------------- accountant
def test_epsilon_falls_with_noise_and_grows_with_releases():
    e1, e2, e4 = (rdp_epsilon([(s, 10)], 1e-6) for s in (1.0, 2.0, 4.0))
    assert e1 > e2 > e4 > 0
    assert rdp_epsilon([(2.0, 20)], 1e-6) > e2
    s = dp.PrivacySettings(dp.Mechanism(1.0, 2.0), dp.Mechanism(0.1, 2.0),
                           dp.Mechanism(0.5, 2.0), 1e-6)
    r5 = privacy_report(s, {"h_c": 5, "grad": 5, "fedavg": 5})
    r10 = privacy_report(s, {"h_c": 10, "grad": 10, "fedavg": 10})
    assert r10["epsilon"] > r5["epsilon"] > max(r5["epsilon_per_mechanism"].values())
    # composing 15 releases at sigma = 2 is the same as one mechanism released 15 times
    assert r5["epsilon"] == pytest.approx(rdp_epsilon([(2.0, 15)], 1e-6))
    clip_only = dp.PrivacySettings(dp.Mechanism(1.0, 0.0), s.grad, s.fedavg, 1e-6)
    r = privacy_report(clip_only, {"h_c": 1, "grad": 1, "fedavg": 1})
    assert math.isinf(r["epsilon"]) and r["not_private"] == ["h_c"]


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


def test_uploads_are_clipped_and_run_reports_epsilon(tmp_path):
    rec = {}

    def wrap(engine):
        rec["engine"] = RecordingEngine(engine)
        return rec["engine"]

    # clip only (sigma = 0): every uploaded window's h_c and dL/dh_G has norm <= C exactly
    final, writer = _run(tmp_path / "clip", *DP, "privacy.h_c.noise_multiplier=0",
                         "privacy.grad.noise_multiplier=0", "privacy.fedavg.noise_multiplier=0",
                         wrap=wrap)
    seen = set()
    for _mtype, reply in rec["engine"].received:
        if P.H_C in reply:
            assert np.linalg.norm(reply[P.H_C].reshape(*reply[P.H_C].shape[:2], -1),
                                  axis=-1).max() <= 1.0 + 1e-5
            seen.add("h_c")
        if P.GRAD in reply:
            assert np.linalg.norm(reply[P.GRAD].reshape(*reply[P.GRAD].shape[:2], -1),
                                  axis=-1).max() <= 0.01 + 1e-6
            seen.add("grad")
    assert seen == {"h_c", "grad"}
    assert final["privacy"]["epsilon"] is None or math.isinf(final["privacy"]["epsilon"])
    # with noise: finite epsilon in final.json, counted as 2 rounds x (h_c, grad, fedavg)
    final, writer = _run(tmp_path / "noise", *DP, "federation.rounds=2")
    saved = json.loads((writer.dir / "final.json").read_text())["privacy"]
    assert saved["releases_per_window"] == {"fedavg": 2, "h_c": 2, "grad": 2}
    assert saved["epsilon"] == pytest.approx(rdp_epsilon([(1.0, 6)], 1e-6))
    assert saved["delta"] == 1e-6 and math.isfinite(final["test"]["rmse"])


@pytest.mark.slow
def test_dp_noise_does_not_depend_on_grouping(tmp_path):
    """One client per sensor or three sensors per client: the same noise, the same run."""
    a, _ = _run(tmp_path / "a", *DP, "federation.nodes_per_client=1")
    b, _ = _run(tmp_path / "b", *DP, "federation.nodes_per_client=3")
    assert a["test"]["rmse"] == pytest.approx(b["test"]["rmse"], rel=1e-4)
    assert a["privacy"]["epsilon"] == b["privacy"]["epsilon"]


def test_split_learning_with_dp_counts_one_release_per_epoch(tmp_path):
    final, _ = _run(tmp_path, *DP, "federation=split_learning", "federation.rounds=2",
                    "federation.nodes_per_client=3")
    pr = final["privacy"]
    assert pr["releases_per_window"] == {"h_c": 2, "grad": 2}
    assert pr["epsilon"] == pytest.approx(rdp_epsilon([(1.0, 4)], 1e-6))


def test_dp_through_the_flower_client_app(tmp_path, task_identity, monkeypatch):
    """DP run over the real ClientApp (fresh process per message) = in-process."""
    from cnfgnn.config import compose_cfg, overrides_for
    from cnfgnn.flower import server_app
    from tests.helpers import LoopbackGrid

    monkeypatch.setenv("CNFGNN_STATE_ROOT", str(tmp_path / "state"))
    args = (*TINY, *DP, "federation.nodes_per_client=2")
    ref, _ = run_experiment(make_cfg(*args, f"output_root={tmp_path}/a"), **QUIET)
    cfg = make_cfg(*args, f"output_root={tmp_path}/b", "engine=simulation")
    overrides = overrides_for(cfg, tmp_path / "b" / "run")
    grid = LoopbackGrid(overrides, num_nodes=3, run_id=task_identity, fresh_process=True)
    final = server_app.run_server(grid, compose_cfg(overrides), run_id=None, **QUIET)
    assert final["test"]["rmse"] == pytest.approx(ref["test"]["rmse"], rel=1e-5)
    assert final["privacy"]["epsilon"] == pytest.approx(ref["privacy"]["epsilon"])
