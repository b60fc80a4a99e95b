"""The synthetic road network: determinism, sizes, graph, and that space carries information."""

import time

import numpy as np
import pytest

from cnfgnn.data.roads import road_network
from cnfgnn.data.synthetic import demand_profile, generate_synthetic
from cnfgnn.data.windows import gather_windows, split_starts


def test_deterministic_from_the_seed():
    a = generate_synthetic(num_nodes=9, days=2, seed=5)
    b = generate_synthetic(num_nodes=9, days=2, seed=5)
    c = generate_synthetic(num_nodes=9, days=2, seed=6)
    np.testing.assert_array_equal(a.speed, b.speed)
    np.testing.assert_array_equal(a.mask, b.mask)
    np.testing.assert_array_equal(a.adjacency, b.adjacency)
    assert not np.array_equal(a.speed, c.speed)


@pytest.mark.parametrize("n", [1, 2, 5, 24, 300])
def test_sizes_shapes_and_graph(n):
    d = generate_synthetic(num_nodes=n, days=1, interval_minutes=10)
    assert d.speed.shape == d.mask.shape == (144, n) and d.speed.dtype == np.float32
    assert d.interval_minutes == 10.0 and len(d.sensor_ids) == n
    assert d.locations.shape == (n, 2)
    np.testing.assert_array_equal(np.diag(d.adjacency), 1.0)
    off = d.adjacency[~np.eye(n, dtype=bool)]
    assert np.all((off == 0) | ((off >= 0.1) & (off <= 1.0)))
    assert np.all(d.speed[d.mask] >= 3.0) and np.all(d.speed[~d.mask] == 0.0)
    if n >= 24:
        assert not np.allclose(d.adjacency, d.adjacency.T)  # directed roads
        assert (d.adjacency > 0).sum() > 2 * n


def test_missing_rate_and_realistic_speeds():
    d = generate_synthetic(num_nodes=40, days=14, missing_rate=0.05, seed=1)
    assert 0.035 < d.missing_fraction() < 0.065
    v = np.where(d.mask, d.speed, np.nan)
    hour = d.timestamps.hour.to_numpy()
    weekday = d.timestamps.day_of_week.to_numpy() < 5
    night = np.nanmean(v[(hour == 3) & weekday])
    am, pm = np.nanmean(v[(hour == 8) & weekday]), np.nanmean(v[(hour == 17) & weekday])
    assert night > am + 3 and night > pm + 3  # rush hours are slower
    assert 0.005 < np.nanmean(v < 30) < 0.1  # some heavy congestion, not gridlock


def test_demand_profile_has_rush_hours_and_weekends():
    import pandas as pd

    ts = pd.date_range("2024-01-01", periods=7 * 288, freq="5min")  # Monday to Sunday
    p = demand_profile(ts, np.array([[1.0, 0.6], [0.6, 1.0]]))
    h = ts.hour.to_numpy()
    mon, sun = ts.day_of_week == 0, ts.day_of_week == 6
    assert p[mon & (h == 8), 0].mean() > p[mon & (h == 17), 0].mean()  # AM-heavy direction
    assert p[mon & (h == 17), 1].mean() > p[mon & (h == 8), 1].mean()  # PM-heavy direction
    assert p[sun & (h == 8)].mean() < p[mon & (h == 8)].mean()
    assert p[h == 3].max() < 0.2


def test_road_network_edges_follow_the_carriageways():
    net = road_network(24, 2.0, np.random.default_rng(0))
    assert net.turn.sum() > 0 and (~net.turn).sum() == 24 - 4  # 4 carriageways of 6
    assert np.all(net.length_km > 0)
    same = net.carriageway[net.src] == net.carriageway[net.dst]
    np.testing.assert_array_equal(same, ~net.turn)


def _ridge_sse(xtr, ytr, xte, yte, lam=1e-3):
    mu, sd = xtr.mean(0), xtr.std(0) + 1e-6
    a, b = (xtr - mu) / sd, (xte - mu) / sd
    ym = ytr.mean(0)
    w = np.linalg.solve(a.T @ a + lam * len(a) * np.eye(a.shape[1]), a.T @ (ytr - ym))
    return float(((b @ w + ym - yte) ** 2).sum())


def neighbour_gain(d, upstream=True, in_steps=12, out_steps=12):
    """1 - MSE(own + neighbours' past) / MSE(own past) of per-node ridge forecasts.

    Next-hour speeds of node j from its own past hour, with and without the past hour of its
    upstream neighbours (i with adj[i, j] > 0: the edges a graph network aggregates at j).
    Trained on the train windows, scored on the test windows; windows with a missing value
    in the inputs used or in the targets are left out (of both models).
    """
    st = split_starts(d.num_steps, in_steps, out_steps)
    starts = np.concatenate([st["train"], st["test"]])
    is_train = np.arange(len(starts)) < len(st["train"])
    win = gather_windows(d.speed.astype(np.float64), starts, in_steps + out_steps)
    obs = gather_windows(d.mask, starts, in_steps + out_steps)
    a = d.adjacency > 0
    np.fill_diagonal(a, False)
    if not upstream:
        a = a.T
    own = with_nb = 0.0
    for j in range(d.num_nodes):
        nb = np.flatnonzero(a[:, j])
        if len(nb) == 0:
            continue
        ok = obs[:, :, j].all(1) & obs[:, :in_steps, nb].all((1, 2))
        tr, te = ok & is_train, ok & ~is_train
        y = win[:, in_steps:, j]
        x_own = win[:, :in_steps, j]
        x_nb = np.concatenate([x_own, win[:, :in_steps, nb].reshape(len(win), -1)], 1)
        own += _ridge_sse(x_own[tr], y[tr], x_own[te], y[te])
        with_nb += _ridge_sse(x_nb[tr], y[tr], x_nb[te], y[te])
    return 1.0 - with_nb / own


def test_upstream_neighbours_carry_information():
    d = generate_synthetic(num_nodes=24, days=28, seed=0)
    up = neighbour_gain(d, upstream=True)
    down = neighbour_gain(d, upstream=False)
    print(
        f"\nneighbour gain (24 nodes x 28 days, held-out MSE reduction): "
        f"upstream {100 * up:.1f}%, downstream {100 * down:.1f}%"
    )
    assert up >= 0.05


def test_generation_time_metr_la_size():
    t0 = time.perf_counter()
    d = generate_synthetic(num_nodes=207, days=28)
    dt = time.perf_counter() - t0
    print(f"\nsynthetic 207 nodes x 28 days ({d.num_steps} steps): {dt:.2f} s")
    assert d.speed.shape == (8064, 207)
