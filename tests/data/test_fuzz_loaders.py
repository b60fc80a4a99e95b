"""Property tests: malformed data files give a DataError (a ValueError), never a crash.

Each test starts from a valid small file set (tests/data/_helpers.py), corrupts it in one
random way (garbage text spliced into a CSV, NaN/inf columns, wrong shapes, missing keys,
empty or truncated files, arrays of the wrong dtype, a graph that does not match the
series) and loads it. A loader may accept the file only when the result is sound (finite
speeds, shapes that agree); otherwise it must raise :class:`DataError` naming the file.
IndexError, KeyError, TypeError or a silent NaN are failures.
"""

from __future__ import annotations

import json
import pickle
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from cnfgnn.data.dcrnn import load_adj_pkl, load_dcrnn_h5, load_dcrnn_npz
from cnfgnn.data.errors import DataError
from cnfgnn.data.shards import load_shard, write_shards
from cnfgnn.data.tabular import load_csv, load_los_loop, load_metrla_json
from tests.data._helpers import IDS, adjacency, series, write_npz_splits, write_pkl, write_wide_csv

FUZZ = settings(
    max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
SLOW_FUZZ = settings(
    max_examples=15, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)


def _sound_or_data_error(load, *paths: Path):
    """Call ``load``: a DataError naming one of ``paths`` is fine, a result must be sound."""
    try:
        data = load()
    except DataError as e:
        assert isinstance(e, ValueError) and "Fix:" in str(e), str(e)
        assert any(p.name in str(e) for p in paths), (str(e), [p.name for p in paths])
        return None
    n = data.num_nodes
    assert data.speed.shape == data.mask.shape == (data.num_steps, n)
    assert np.isfinite(data.speed).all()
    assert data.adjacency.shape == (n, n) and np.isfinite(data.adjacency).all()
    assert len(data.sensor_ids) == n
    return data


# ---------------------------------------------------------------------- wide CSV
@st.composite
def _spliced(draw, text: str) -> str:
    """``text`` with 1-3 random edits: garbage inserted, a span deleted, a line dropped."""
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["insert", "delete", "drop_line", "truncate"]))
        i = draw(st.integers(0, len(text)))
        if op == "insert":
            junk = draw(
                st.one_of(
                    st.text(max_size=8),
                    st.sampled_from(
                        ["nan", "inf", "-inf", ",", "\n", '"', "1e999", "NaN,NaN", "\x00"]
                    ),
                )
            )
            text = text[:i] + junk + text[i:]
        elif op == "delete":
            text = text[:i] + text[i + draw(st.integers(1, 20)) :]
        elif op == "drop_line":
            lines = text.split("\n")
            del lines[draw(st.integers(0, len(lines) - 1))]
            text = "\n".join(lines)
        else:
            text = text[:i]
    return text


def _csv_text() -> str:
    with tempfile.TemporaryDirectory() as d:
        return write_wide_csv(Path(d) / "s.csv", series(t=40)).read_text()


CSV_TEXT = _csv_text()


@FUZZ
@given(text=_spliced(CSV_TEXT))
def test_corrupted_series_csv(text):
    with tempfile.TemporaryDirectory() as d:
        s, a = Path(d) / "s.csv", Path(d) / "a.csv"
        s.write_text(text, encoding="utf-8", errors="surrogatepass")
        np.savetxt(a, adjacency(), delimiter=",")
        _sound_or_data_error(lambda: load_csv(s, adjacency=a), s, a)


@FUZZ
@given(
    col=st.integers(0, 3),
    value=st.sampled_from([np.nan, np.inf, -np.inf]),
    whole=st.booleans(),
    missing=st.sampled_from([None, 0.0, "NA"]),
)
def test_nan_and_inf_columns_in_csv(col, value, whole, missing):
    df = series(t=40)
    if whole:
        df.iloc[:, col] = value
    else:
        df.iloc[7, col] = value
    with tempfile.TemporaryDirectory() as d:
        s, a = Path(d) / "s.csv", Path(d) / "a.csv"
        df.to_csv(s, index_label="timestamp")
        np.savetxt(a, adjacency(), delimiter=",")
        _sound_or_data_error(lambda: load_csv(s, adjacency=a, missing_value=missing), s, a)


@FUZZ
@given(
    adj=hnp.arrays(
        np.float64,
        st.tuples(st.integers(0, 6), st.integers(0, 6)),
        elements=st.one_of(st.floats(-2, 2), st.just(np.nan), st.just(np.inf)),
    )
)
def test_adjacency_of_any_shape_and_value(adj):
    """An adjacency CSV that does not match the 4 sensors, or holds NaN/inf/negatives."""
    with tempfile.TemporaryDirectory() as d:
        s, a = Path(d) / "s.csv", Path(d) / "a.csv"
        write_wide_csv(s, series(t=40))
        if adj.size:
            np.savetxt(a, adj, delimiter=",")
        else:
            a.write_text("")
        _sound_or_data_error(lambda: load_csv(s, adjacency=a), s, a)
        _sound_or_data_error(lambda: load_los_loop(s, a), s, a)


# ---------------------------------------------------------------------- DCRNN npz + pickle
@st.composite
def _npz_case(draw):
    """Which file of the three, and how it is broken."""
    split = draw(st.sampled_from(["train", "val", "test"]))
    how = draw(
        st.sampled_from(
            [
                "empty_file",
                "garbage",
                "missing_key",
                "wrong_ndim",
                "wrong_dtype",
                "nan",
                "shape",
                "no_windows",
                "object",
            ]
        )
    )
    seed = draw(st.integers(0, 2**16))
    return split, how, seed


@SLOW_FUZZ
@given(case=_npz_case())
def test_corrupted_npz_windows(case):
    split, how, seed = case
    rng = np.random.default_rng(seed)
    with tempfile.TemporaryDirectory() as d:
        folder, pkl = Path(d) / "npz", Path(d) / "adj.pkl"
        values = series(t=120).to_numpy()
        tod = (np.arange(120) % 288) / 288.0
        write_npz_splits(folder, values, tod)
        write_pkl(pkl, IDS, adjacency())
        f = folder / f"{split}.npz"
        with np.load(f) as z:
            arrays = {k: z[k] for k in z.files}
        x = arrays["x"]
        if how == "empty_file":
            f.write_bytes(b"")
        elif how == "garbage":
            f.write_bytes(rng.bytes(int(rng.integers(1, 200))))
        else:
            if how == "missing_key":
                del arrays[str(rng.choice(["x", "y"]))]
            elif how == "wrong_ndim":
                arrays["x"] = x[..., 0]
            elif how == "wrong_dtype":
                arrays["x"] = x.astype("U8")
            elif how == "nan":
                x = x.copy()
                x[rng.integers(len(x)), :, rng.integers(x.shape[2]), 0] = np.nan
                arrays["x"] = x
            elif how == "shape":
                arrays["x"] = x[:, :, :3]
            elif how == "no_windows":
                arrays["x"], arrays["y"] = x[:0], arrays["y"][:0]
            else:
                arrays["x"] = np.array([{"a": 1}] * 3, dtype=object)
            np.savez(f, **arrays)
        _sound_or_data_error(lambda: load_dcrnn_npz(folder, pkl), f, folder, pkl)


@FUZZ
@given(
    obj=st.one_of(
        st.none(),
        st.integers(),
        st.text(max_size=5),
        st.lists(st.integers(), max_size=4),
        st.tuples(
            st.lists(st.text(max_size=3), max_size=4),
            st.dictionaries(st.text(max_size=3), st.integers(-2, 5), max_size=4),
            hnp.arrays(
                np.float64,
                st.tuples(st.integers(0, 5), st.integers(0, 5)),
                elements=st.one_of(st.floats(-1, 1), st.just(np.nan)),
            ),
        ),
        st.tuples(
            st.just(IDS),
            st.just({s: i for i, s in enumerate(IDS)}),
            st.sampled_from([None, "adj", [[1.0]], np.ones((4, 3))]),
        ),
    )
)
def test_adjacency_pickle_of_any_content(obj):
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "adj.pkl"
        p.write_bytes(pickle.dumps(obj, protocol=2))
        try:
            ids, index, adj = load_adj_pkl(p)
        except DataError as e:
            assert "adj.pkl" in str(e) and "Fix:" in str(e)
            return
        assert adj.shape == (len(ids), len(ids)) and np.isfinite(adj).all()
        assert all(index[s] == i for i, s in enumerate(ids))


# ---------------------------------------------------------------------- HDF5
@SLOW_FUZZ
@given(
    how=st.sampled_from(
        [
            "nan_column",
            "inf_cell",
            "text_index",
            "fewer_columns",
            "other_ids",
            "empty",
            "duplicate_time",
            "object_column",
        ]
    ),
    col=st.integers(0, 3),
)
def test_corrupted_hdf5(how, col):
    pytest.importorskip("tables")
    df = series(t=40)
    if how == "nan_column":
        df.iloc[:, col] = np.nan
    elif how == "inf_cell":
        df.iloc[5, col] = np.inf
    elif how == "text_index":
        df.index = [f"t{i}" for i in range(len(df))]
    elif how == "fewer_columns":
        df = df.drop(columns=df.columns[col])
    elif how == "other_ids":
        df.columns = [f"x{i}" for i in range(df.shape[1])]
    elif how == "empty":
        df = df.iloc[:0]
    elif how == "duplicate_time":
        df.index = df.index[[0] + list(range(len(df) - 1))]
    else:
        df = df.astype(object)
        df.iloc[3, col] = "slow"
    with tempfile.TemporaryDirectory() as d:
        h5, pkl = Path(d) / "speed.h5", Path(d) / "adj.pkl"
        df.to_hdf(h5, key="df")
        write_pkl(pkl, IDS, adjacency())
        _sound_or_data_error(lambda: load_dcrnn_h5(h5, pkl), h5, pkl)


# ---------------------------------------------------------------------- JSON
@FUZZ
@given(
    obj=st.one_of(
        st.none(),
        st.lists(st.integers(), max_size=3),
        st.text(max_size=5),
        st.fixed_dictionaries(
            {
                "edges": st.lists(st.lists(st.integers(-2, 4), min_size=0, max_size=3), max_size=4),
                "weights": st.lists(st.one_of(st.floats(0, 1), st.text(max_size=2)), max_size=4),
                "time_periods": st.one_of(st.integers(-1, 3), st.text(max_size=3), st.none()),
            },
            optional={
                "0": st.lists(st.lists(st.floats(0, 1), max_size=3), max_size=3),
                "1": st.lists(st.lists(st.floats(0, 1), max_size=3), max_size=3),
                "2": st.just("x"),
            },
        ),
    )
)
def test_metrla_json_of_any_content(obj):
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "METRLA.json"
        p.write_text(json.dumps(obj))
        _sound_or_data_error(lambda: load_metrla_json(p), p)


# ---------------------------------------------------------------------- client shards
@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    from cnfgnn.data.dataset import SensorData

    df = series(t=40)
    data = SensorData(
        "t",
        df.to_numpy(np.float32),
        np.ones(df.shape, bool),
        df.index,
        5.0,
        list(df.columns),
        adjacency(),
        None,
    )
    return write_shards(data, tmp_path_factory.mktemp("sh") / "shards", 2) / "client_0000"


@FUZZ
@given(
    how=st.sampled_from(["drop", "nan", "shape", "dtype", "garbage", "empty", "ids"]),
    key=st.sampled_from(
        ["speed", "mask", "node_indices", "sensor_ids", "timestamps", "interval_minutes"]
    ),
)
def test_corrupted_shard(shard_dir, how, key):
    src = next(shard_dir.glob("*.npz"))
    with np.load(src) as z:
        arrays = {k: z[k] for k in z.files}
    with tempfile.TemporaryDirectory() as d:
        dst = Path(d) / shard_dir.name
        dst.mkdir()
        f = dst / src.name
        if how == "garbage":
            f.write_bytes(b"PK\x03\x04 not a zip")
        elif how == "empty":
            f.write_bytes(b"")
        else:
            v = arrays[key]
            if how == "drop":
                del arrays[key]
            elif how == "nan":
                arrays[key] = np.full(v.shape, np.nan)
            elif how == "shape":
                arrays[key] = np.concatenate([v, v]) if v.ndim else np.arange(3)
            elif how == "dtype":
                arrays[key] = np.full(v.shape, "x")
            else:
                arrays[key] = np.asarray(["a"])
            np.savez(f, **arrays)
        try:
            shard = load_shard(dst)
        except DataError as e:
            assert src.name in str(e) and "Fix:" in str(e), str(e)
            return
        t, k = shard.speed.shape
        assert np.isfinite(shard.speed).all() and shard.mask.shape == (t, k)
        assert len(shard.sensor_ids) == len(shard.node_indices) == k
        assert len(shard.timestamps) == t and np.isfinite(shard.interval_minutes)
