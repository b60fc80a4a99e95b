"""Scaler: round trips, and the paper's statistic from per-node sums."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cnfgnn.data.scaler import Scaler, coverage, global_scaler, input_stats, per_node_scaler
from cnfgnn.data.windows import gather_windows, split_starts


def _speed(t=200, n=5, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.uniform(10, 70, (t, n)).astype(np.float32)
    mask = rng.random((t, n)) > 0.1
    return np.where(mask, x, 0.0).astype(np.float32), mask


def test_global_scaler_equals_materialised_train_inputs():
    speed, mask = _speed()
    starts = split_starts(len(speed))["train"]
    x = gather_windows(speed, starts, 12)  # train['x'][..., 0]: [S, 12, N]
    per_node = input_stats(speed, starts, 12)
    # one stats dict per node, as if every node were its own client
    stats = [{k: v[i : i + 1] for k, v in per_node.items()} for i in range(speed.shape[1])]
    sc = global_scaler(stats)
    assert sc.mean.shape == () and sc.std.shape == ()
    np.testing.assert_allclose(sc.mean, x.astype(np.float64).mean(), rtol=1e-10)
    np.testing.assert_allclose(sc.std, x.astype(np.float64).std(), rtol=1e-9)


def test_per_node_and_masked_stats():
    speed, mask = _speed()
    starts = split_starts(len(speed))["train"]
    x = gather_windows(speed, starts, 12).astype(np.float64)
    m = gather_windows(mask, starts, 12)
    sc = per_node_scaler(input_stats(speed, starts, 12))
    np.testing.assert_allclose(sc.mean, x.mean(axis=(0, 1)))
    np.testing.assert_allclose(sc.std, x.std(axis=(0, 1)))
    st_m = input_stats(speed, starts, 12, include_missing=False, mask=mask)
    np.testing.assert_allclose(st_m["count"], m.sum(axis=(0, 1)))
    np.testing.assert_allclose(
        st_m["sum"] / st_m["count"], (x * m).sum(axis=(0, 1)) / m.sum(axis=(0, 1))
    )
    with pytest.raises(ValueError, match="mask"):
        input_stats(speed, starts, 12, include_missing=False)


def test_coverage_counts_windows():
    c = coverage(10, np.array([0, 1, 2]), 3)
    np.testing.assert_array_equal(c, [1, 2, 3, 2, 1, 0, 0, 0, 0, 0])


def test_round_trip_numpy_and_torch():
    speed, _ = _speed()
    for sc in (
        Scaler(np.float64(50.0), np.float64(12.5)),
        per_node_scaler(input_stats(speed, np.arange(100), 12)),
    ):
        z = sc.transform(speed)
        assert z.dtype == np.float32
        np.testing.assert_allclose(sc.inverse_transform(z), speed, atol=1e-4)
        tz = sc.transform(torch.from_numpy(speed))
        assert isinstance(tz, torch.Tensor) and tz.dtype == torch.float32
        np.testing.assert_allclose(tz.numpy(), z, atol=1e-5)
        np.testing.assert_allclose(sc.inverse_transform(tz).numpy(), speed, atol=1e-4)


def test_constant_node_gets_unit_std():
    sc = per_node_scaler(input_stats(np.zeros((40, 2), np.float32), np.arange(10), 12))
    np.testing.assert_array_equal(sc.std, [1.0, 1.0])


@settings(max_examples=25, deadline=None, database=None)
@given(st.integers(30, 80), st.integers(1, 4), st.integers(0, 10_000))
def test_global_scaler_is_grouping_invariant(t, n, seed):
    speed, _ = _speed(t, n, seed)
    starts = split_starts(t, 6, 6)["train"]
    full = input_stats(speed, starts, 6)
    split = [{k: v[:1] for k, v in full.items()}, {k: v[1:] for k, v in full.items()}]
    a, b = global_scaler([full]), global_scaler(split)
    assert (a.mean, a.std) == (b.mean, b.std)  # bit-identical


def test_input_stats_do_not_depend_on_the_grouping():
    speed, mask = _speed(3000, 6, seed=2)
    starts = split_starts(3000)["train"]
    together = input_stats(speed, starts, 12)
    for k in range(6):
        alone = input_stats(speed[:, k : k + 1], starts, 12)
        for key in together:
            assert alone[key][0] == together[key][k]  # bit-identical
