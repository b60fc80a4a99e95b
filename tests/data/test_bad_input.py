"""Every kind of bad input gives a DataError naming the file, the problem and a fix."""

import numpy as np
import pandas as pd
import pytest

from cnfgnn.data.dcrnn import load_adj_pkl, load_dcrnn_h5, load_dcrnn_npz
from cnfgnn.data.errors import DataError
from cnfgnn.data.loaders import load_dataset
from cnfgnn.data.tabular import load_csv, load_los_loop, load_metrla_json
from cnfgnn.data.windows import split_starts
from tests.data._helpers import IDS, adjacency, series, write_npz_splits, write_pkl, write_wide_csv


def expect(fn, path, *words):
    """Run ``fn``; it must raise DataError mentioning ``path``'s name, ``words`` and a fix."""
    with pytest.raises(DataError) as e:
        fn()
    msg = str(e.value)
    assert isinstance(e.value, ValueError)
    assert str(path).split("/")[-1] in msg, msg
    assert "Fix:" in msg, msg
    for w in words:
        assert w in msg, msg
    return msg


@pytest.fixture
def files(tmp_path):
    """A consistent set: h5 + pkl + csv series + adjacency CSV."""
    df = series()
    df.to_hdf(tmp_path / "speed.h5", key="df")
    write_pkl(tmp_path / "adj.pkl", IDS, adjacency())
    write_wide_csv(tmp_path / "s.csv", df)
    np.savetxt(tmp_path / "a.csv", adjacency(), delimiter=",")
    return tmp_path


def test_missing_files(files):
    expect(lambda: load_dcrnn_h5(files / "nope.h5", files / "adj.pkl"), "nope.h5", "not found")
    expect(lambda: load_adj_pkl(files / "nope.pkl"), "nope.pkl", "not found")
    expect(lambda: load_csv(files / "nope.csv", adjacency=files / "a.csv"), "nope.csv")
    expect(lambda: load_csv(files / "s.csv", adjacency=files / "none.csv"), "none.csv")
    expect(lambda: load_los_loop(files / "x.csv", files / "a.csv"), "x.csv", "not found")
    expect(lambda: load_dcrnn_npz(files / "npz", files / "adj.pkl"), "train.npz", "not found")
    expect(lambda: load_metrla_json(files / "M.json"), "M.json", "not found")


def test_wrong_hdf5_key(files):
    expect(
        lambda: load_dcrnn_h5(files / "speed.h5", files / "adj.pkl", key="speed"),
        "speed.h5",
        "no HDF5 key 'speed'",
        "['df']",
    )


def test_not_an_hdf5_or_pickle(files):
    expect(lambda: load_dcrnn_h5(files / "s.csv", files / "adj.pkl"), "s.csv", "HDF5")
    expect(lambda: load_adj_pkl(files / "s.csv"), "s.csv", "pickle")


def test_series_graph_id_and_count_mismatch(files):
    write_pkl(files / "other.pkl", ["s10", "s20", "s30", "s99"], adjacency())
    expect(
        lambda: load_dcrnn_h5(files / "speed.h5", files / "other.pkl"),
        "speed.h5",
        "missing ['s99']",
        "unexpected ['s40']",
    )
    series()[IDS[:3]].to_hdf(files / "three.h5", key="df")
    expect(
        lambda: load_dcrnn_h5(files / "three.h5", files / "adj.pkl"),
        "three.h5",
        "(3 sensors)",
        "(4 sensors)",
    )
    np.savetxt(files / "a3.csv", adjacency(3), delimiter=",")
    expect(
        lambda: load_csv(files / "s.csv", adjacency=files / "a3.csv"),
        "a3.csv",
        "3 x 3",
        "4 sensors",
    )
    series().to_csv(files / "los.csv", index=False)
    expect(lambda: load_los_loop(files / "los.csv", files / "a3.csv"), "a3.csv")
    ids = ["s10", "s20", "s30", "zz"]
    pd.DataFrame(adjacency(), columns=ids).to_csv(files / "ah.csv", index=False)
    expect(lambda: load_csv(files / "s.csv", adjacency=files / "ah.csv"), "ah.csv", "zz")
    xs = write_npz_splits(files / "npz3", series(t=60, n=3).to_numpy(), np.arange(60) / 288)
    assert xs
    expect(lambda: load_dcrnn_npz(files / "npz3", files / "adj.pkl"), "train.npz", "3 sensors")


def test_bad_adjacency(files):
    np.savetxt(files / "rect.csv", np.ones((4, 3)), delimiter=",")
    expect(
        lambda: load_csv(files / "s.csv", adjacency=files / "rect.csv"), "rect.csv", "not square"
    )
    neg = adjacency()
    neg[1, 2] = -0.3
    np.savetxt(files / "neg.csv", neg, delimiter=",")
    expect(
        lambda: load_csv(files / "s.csv", adjacency=files / "neg.csv"),
        "neg.csv",
        "negative",
        "row 1, column 2",
    )
    write_pkl(files / "neg.pkl", IDS, neg)
    expect(lambda: load_adj_pkl(files / "neg.pkl"), "neg.pkl", "negative")
    nan = adjacency()
    nan[0, 3] = np.nan
    np.savetxt(files / "nan.csv", nan, delimiter=",")
    expect(lambda: load_csv(files / "s.csv", adjacency=files / "nan.csv"), "nan.csv", "NaN")
    (files / "txt.csv").write_text("1,0,0,0\n0,1,x,0\n0,0,1,0\n0,0,0,1\n")
    expect(
        lambda: load_csv(files / "s.csv", adjacency=files / "txt.csv"),
        "txt.csv",
        "non-numeric",
        "'x'",
    )


@pytest.mark.parametrize("token", ["nan", "inf", "-inf", "NaN"])
def test_nan_inf_readings(files, token):
    text = (files / "s.csv").read_text().splitlines()
    cells = text[7].split(",")
    cells[2] = token
    text[7] = ",".join(cells)
    (files / "bad.csv").write_text("\n".join(text) + "\n")
    expect(
        lambda: load_csv(files / "bad.csv", adjacency=files / "a.csv"),
        "bad.csv",
        "NaN/inf",
        "row 6",
        "'s20'",
    )


def test_nan_in_hdf5_is_refused_but_declared_marker_is_not(files):
    df = series()
    df.iat[4, 0] = np.nan
    df.to_hdf(files / "nan.h5", key="df")
    expect(lambda: load_dcrnn_h5(files / "nan.h5", files / "adj.pkl"), "nan.h5", "NaN/inf")
    d = load_dcrnn_h5(files / "nan.h5", files / "adj.pkl", missing_value=float("nan"))
    assert not d.mask[4, 0] and d.mask[3, 1]


def test_missing_marker_and_non_numeric_readings(files):
    write_wide_csv(files / "na.csv", series().astype(object).mask(np.eye(60, 4, dtype=bool), "NA"))
    expect(
        lambda: load_csv(files / "na.csv", adjacency=files / "a.csv"),
        "na.csv",
        "non-numeric",
        "'NA'",
    )
    d = load_csv(files / "na.csv", adjacency=files / "a.csv", missing_value="NA")
    assert not d.mask[0, 0] and not d.mask[3, 3] and d.mask[4, 0]


@pytest.mark.parametrize(
    "case, words",
    [
        ("backwards", ("go backwards", "sort")),
        ("duplicate", ("duplicate timestamp",)),
        ("irregular", ("irregular interval",)),
        ("garbage", ("not a timestamp",)),
    ],
)
def test_bad_timestamps(files, case, words):
    df = series()
    idx = list(df.index)
    if case == "backwards":
        idx[10], idx[11] = idx[11], idx[10]
    elif case == "duplicate":
        idx[20] = idx[19]
    elif case == "irregular":
        idx = idx[:30] + [t + pd.Timedelta(minutes=5) for t in idx[30:]]
    df.index = pd.DatetimeIndex(idx) if case != "garbage" else ["x"] * len(df)
    df.to_csv(files / "t.csv", index_label="timestamp")
    expect(lambda: load_csv(files / "t.csv", adjacency=files / "a.csv"), "t.csv", *words)
    if case != "garbage":
        df.to_hdf(files / "t.h5", key="df")
        expect(lambda: load_dcrnn_h5(files / "t.h5", files / "adj.pkl"), "t.h5", words[0])


def test_graph_needs_exactly_one_file(files):
    expect(lambda: load_csv(files / "s.csv"), "s.csv", "exactly one", "none")
    expect(
        lambda: load_csv(files / "s.csv", adjacency=files / "a.csv", locations=files / "a.csv"),
        "s.csv",
        "['adjacency', 'locations']",
    )


def test_distances_bad_values(files):
    (files / "d.csv").write_text("s10,s20,1.0\ns20,s30,-2\n")
    expect(lambda: load_csv(files / "s.csv", distances=files / "d.csv"), "d.csv", "negative")
    (files / "d2.csv").write_text("a,b,1.0\n")
    expect(
        lambda: load_csv(files / "s.csv", distances=files / "d2.csv"),
        "d2.csv",
        "none of the 1 rows",
    )


def test_too_short_and_empty_split(files):
    d = load_csv(files / "s.csv", adjacency=files / "a.csv", name="s.csv")
    expect(
        lambda: split_starts(d.num_steps, 30, 31, source=d.name), "s.csv", "fewer than one window"
    )
    expect(lambda: split_starts(26, source=d.name), "s.csv", "empty val")


def test_npz_windows_must_be_consecutive(files):
    v = series(t=80).to_numpy()
    write_npz_splits(files / "npz", v, np.arange(80) / 288)
    z = dict(np.load(files / "npz" / "val.npz"))
    z["x"] = z["x"][::-1].copy()
    np.savez(files / "npz" / "val.npz", **z)
    expect(lambda: load_dcrnn_npz(files / "npz", files / "adj.pkl"), "npz", "not consecutive")


def test_npz_split_rule_is_checked(files):
    write_npz_splits(files / "npz", series(t=80).to_numpy(), np.arange(80) / 288)
    expect(
        lambda: load_dcrnn_npz(files / "npz", files / "adj.pkl", split=(0.6, 0.2, 0.2)),
        "npz",
        "split sizes",
        "dataset.split",
    )


def test_config_errors():
    expect(lambda: load_dataset({"kind": "parquet", "name": "x"}), "x", "unknown kind")
    expect(
        lambda: load_dataset({"kind": "synthetic", "name": "syn", "nodes": 3}),
        "syn",
        "unknown option(s) ['nodes']",
        "num_nodes",
    )
    expect(lambda: load_dataset({"kind": "csv", "name": "mine"}), "mine", "needs ['series']")


def test_numeric_header_with_other_ids(files):
    pd.DataFrame(adjacency(), columns=["1", "2", "3", "4"]).to_csv(files / "nh.csv", index=False)
    expect(
        lambda: load_csv(files / "s.csv", adjacency=files / "nh.csv"),
        "nh.csv",
        "looks like a header",
    )
