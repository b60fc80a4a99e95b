"""Windows and the DCRNN split: exact counts, contents, bad sizes."""

import numpy as np
import pytest

from cnfgnn.data.errors import DataError
from cnfgnn.data.windows import gather_windows, num_windows, split_starts


@pytest.mark.parametrize(
    "steps, counts",
    [
        (34_272, (23_974, 3_425, 6_850)),  # METR-LA
        (52_116, (36_465, 5_209, 10_419)),  # PEMS-BAY
    ],
)
def test_dcrnn_window_counts(steps, counts):
    st = split_starts(steps)
    assert tuple(len(st[k]) for k in ("train", "val", "test")) == counts
    allst = np.concatenate([st["train"], st["val"], st["test"]])
    np.testing.assert_array_equal(allst, np.arange(num_windows(steps)))  # chronological
    assert st["test"][-1] + 24 == steps  # the last window ends on the last step


def test_window_contents_and_gather():
    series = np.arange(50 * 3).reshape(50, 3)
    st = split_starts(50, 4, 2)
    x = gather_windows(series, st["val"], 4)
    y = gather_windows(series, st["val"] + 4, 2)
    assert x.shape == (len(st["val"]), 4, 3) and y.shape == (len(st["val"]), 2, 3)
    for k, t0 in enumerate(st["val"]):
        np.testing.assert_array_equal(x[k], series[t0 : t0 + 4])
        np.testing.assert_array_equal(y[k], series[t0 + 4 : t0 + 6])
    with pytest.raises(IndexError):
        gather_windows(series, np.array([48]), 4)


def test_fewer_steps_than_one_window():
    with pytest.raises(DataError, match="fewer than one window"):
        split_starts(23, 12, 12, source="tiny.csv")


def test_empty_split_names_the_source():
    with pytest.raises(DataError, match=r"tiny\.csv.*empty val"):
        split_starts(26, 12, 12, source="tiny.csv")  # 3 windows: 2 / 0 / 1


def test_bad_fractions():
    with pytest.raises(DataError, match="sum to 1"):
        split_starts(1000, train=0.8, val=0.1, test=0.2)
