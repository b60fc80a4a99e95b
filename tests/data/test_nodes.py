"""Inductive node selection (docs/method.md Appendix A) and the node -> client partition."""

import numpy as np
import pandas as pd
import pytest

from cnfgnn.data.dcrnn import load_adj_pkl
from cnfgnn.data.errors import DataError
from cnfgnn.data.nodes import nodes_per_client, partition, select_nodes
from tests.data._helpers import BUNDLED_DATA

# fmt: off
METR_LA_SELECTED = {
    0.25: [
        8, 9, 14, 26, 31, 34, 41, 43, 47, 52, 59, 60, 63, 69, 73, 75, 76, 77, 81, 82, 83, 84,
        86, 87, 88, 89, 90, 99, 100, 104, 113, 122, 130, 131, 137, 141, 146, 148, 149, 150, 151,
        156, 158, 164, 172, 180, 181, 182, 185, 186, 197, 204
    ],
    0.5: [
        0, 8, 9, 10, 13, 14, 19, 20, 22, 26, 31, 32, 34, 36, 39, 40, 41, 43, 47, 52, 57, 59, 60,
        61, 63, 67, 68, 69, 70, 71, 72, 73, 74, 75, 76, 77, 81, 82, 83, 84, 86, 87, 88, 89, 90,
        94, 96, 97, 98, 99, 100, 102, 103, 104, 112, 113, 115, 116, 117, 118, 119, 122, 127,
        128, 130, 131, 137, 140, 141, 142, 143, 145, 146, 148, 149, 150, 151, 154, 155, 156,
        157, 158, 159, 160, 161, 162, 163, 164, 172, 175, 176, 180, 181, 182, 185, 186, 190,
        194, 197, 198, 199, 204, 205, 206
    ],
    0.75: [
        0, 3, 4, 5, 8, 9, 10, 12, 13, 14, 15, 17, 19, 20, 22, 24, 25, 26, 31, 32, 33, 34, 36,
        37, 38, 39, 40, 41, 42, 43, 47, 49, 51, 52, 53, 54, 56, 57, 58, 59, 60, 61, 62, 63, 67,
        68, 69, 70, 71, 72, 73, 74, 75, 76, 77, 78, 80, 81, 82, 83, 84, 86, 87, 88, 89, 90, 91,
        93, 94, 95, 96, 97, 98, 99, 100, 102, 103, 104, 109, 110, 111, 112, 113, 114, 115, 116,
        117, 118, 119, 120, 122, 123, 125, 126, 127, 128, 129, 130, 131, 133, 135, 136, 137,
        139, 140, 141, 142, 143, 144, 145, 146, 147, 148, 149, 150, 151, 154, 155, 156, 157,
        158, 159, 160, 161, 162, 163, 164, 167, 168, 169, 172, 173, 175, 176, 180, 181, 182,
        183, 184, 185, 186, 187, 188, 190, 191, 192, 193, 194, 195, 197, 198, 199, 204, 205, 206
    ],
}
# fmt: on
# non-zeros (self-loops included) of the induced training subgraph, docs/method.md §1.3
METR_LA_SUBGRAPH_NNZ = {0.25: 329, 0.5: 816, 0.75: 1288}


@pytest.fixture(scope="module")
def metr_la_locations():
    df = pd.read_csv(BUNDLED_DATA / "metr_la" / "graph_sensor_locations.csv.gz")
    return df[["latitude", "longitude"]].to_numpy()


@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.75])
def test_metr_la_appendix_a(metr_la_locations, ratio):
    sel = select_nodes(207, ratio, metr_la_locations)
    assert len(sel) == {0.25: 52, 0.5: 104, 0.75: 155}[ratio]  # the paper's counts
    assert sel.tolist() == METR_LA_SELECTED[ratio]
    _, _, adj = load_adj_pkl(BUNDLED_DATA / "metr_la" / "adj_mx.pkl.gz")
    assert int((adj[np.ix_(sel, sel)] > 0).sum()) == METR_LA_SUBGRAPH_NNZ[ratio]


def test_random_selection_is_seeded_and_sorted():
    a, b = select_nodes(50, 0.3), select_nodes(50, 0.3)
    np.testing.assert_array_equal(a, b)
    assert len(a) == 15 and np.all(np.diff(a) > 0)
    assert not np.array_equal(select_nodes(50, 0.3, seed=1), a)


def test_round_half_to_even_and_bad_ratio():
    assert len(select_nodes(10, 0.25)) == 2  # np.round(2.5) == 2
    assert len(select_nodes(10, 0.35)) == 4  # np.round(3.5) == 4
    for r in (0.0, 1.5, 0.01):
        with pytest.raises(DataError):
            select_nodes(10, r)


def test_partition_contiguous_groups():
    groups = partition(np.array([5, 1, 9, 3, 7]), 2)
    assert [g.tolist() for g in groups] == [[5, 1], [9, 3], [7]]
    assert [g.tolist() for g in partition(np.arange(3), 1)] == [[0], [1], [2]]
    with pytest.raises(DataError):
        partition(np.arange(3), 0)


def test_nodes_per_client_null_is_all_in_one_and_bad_values_name_the_fix():
    assert [g.tolist() for g in partition(np.arange(4), None)] == [[0, 1, 2, 3]]
    assert [g.tolist() for g in partition(np.arange(4), "null")] == [[0, 1, 2, 3]]
    assert [g.tolist() for g in partition(np.arange(4), "3")] == [[0, 1, 2], [3]]
    assert nodes_per_client("None") is None and nodes_per_client(8) == nodes_per_client(8.0) == 8
    for bad in ("abc", 2.5, -1, "0"):
        with pytest.raises(DataError, match="nodes_per_client.*Fix: use e.g."):
            nodes_per_client(bad)
