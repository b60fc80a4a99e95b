"""``fetch``: only against an archive built here and served from 127.0.0.1 (with Range)."""

import hashlib
import http.server
import io
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest

from cnfgnn.data.cli import main
from cnfgnn.data.errors import DataError
from cnfgnn.data.fetch import fetch
from cnfgnn.data.loaders import load_dataset
from tests.data._helpers import IDS, adjacency, series, write_npz_splits, write_pkl


def _archive(tmp_path: Path, with_graph: bool = True, both: bool = False) -> bytes:
    """A small tar.bz2 laid out like the authors' archive (docs/method.md §2.7): METR-LA, and
    PEMS-BAY too when ``both``."""
    src = tmp_path / "src"
    root = src / "data" / "traffic" / "data"
    df = series(t=80)
    tod = ((df.index - df.index.normalize()).total_seconds() / 86400).to_numpy()
    write_npz_splits(root / "METR-LA", df.to_numpy(), tod)
    (root / "sensor_graph").mkdir(parents=True)
    if with_graph:
        write_pkl(root / "sensor_graph" / "adj_mx.pkl", IDS, adjacency())
    (root / "sensor_graph" / "graph_sensor_locations.csv").write_text(
        "index,sensor_id,latitude,longitude\n"
        + "".join(f"{i},{s},34.{i},-118.{i}\n" for i, s in enumerate(IDS))
    )
    if both:  # PEMS-BAY: 3 sensors, locations without a header (as DCRNN's)
        bay = series(t=80, n=3, seed=1)
        write_npz_splits(root / "PEMS-BAY", bay.to_numpy(), tod)
        write_pkl(root / "sensor_graph" / "adj_mx_bay.pkl", IDS[:3], adjacency(3))
        (root / "sensor_graph" / "graph_sensor_locations_bay.csv").write_text(
            "".join(f"{s},37.{i},-121.{i}\n" for i, s in enumerate(IDS[:3]))
        )
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:bz2") as tar:
        tar.add(src / "data", arcname="data")
    return buf.getvalue()


class Server:
    """Serves ``payload`` at /data.tar.bz2, honouring ``Range: bytes=N-``."""

    def __init__(self, payload: bytes):
        self.payload, self.ranges, self.truncate_next = payload, [], False
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                rng = self.headers.get("Range")
                outer.ranges.append(rng)
                start = int(rng.split("=")[1].split("-")[0]) if rng else 0
                body = outer.payload[start:]
                if start >= len(outer.payload) and rng:
                    self.send_response(416)
                    self.end_headers()
                    return
                self.send_response(206 if rng else 200)
                if rng:
                    self.send_header(
                        "Content-Range",
                        f"bytes {start}-{len(outer.payload) - 1}/{len(outer.payload)}",
                    )
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if outer.truncate_next:  # drop the connection half way
                    outer.truncate_next = False
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/data.tar.bz2"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server(tmp_path):
    s = Server(_archive(tmp_path))
    yield s
    s.close()


def _sha(payload: bytes) -> str:
    return hashlib.sha256(payload).hexdigest()


def _only(dest: Path) -> list[str]:
    return sorted(p.name for p in dest.iterdir()) if dest.exists() else []


def test_fetch_unpacks_and_loads(server, tmp_path, capsys):
    dest = tmp_path / "data"
    code = main(
        [
            "fetch",
            "metr-la",
            "--url",
            server.url,
            "--dest",
            str(dest),
            "--sha256",
            _sha(server.payload),
        ]
    )
    err = capsys.readouterr().err
    assert code == 0, err
    assert "100.0%" in err  # the progress bar
    assert _only(dest) == ["data.tar.bz2", "metr-la"]
    assert _only(dest / "metr-la") == [
        "adj_mx.pkl",
        "graph_sensor_locations.csv",
        "test.npz",
        "train.npz",
        "val.npz",
    ]
    d = load_dataset(
        {
            "kind": "dcrnn_npz",
            "name": "metr-la",
            "dir": str(dest / "metr-la"),
            "adj_pkl": str(dest / "metr-la" / "adj_mx.pkl"),
            "locations": str(dest / "metr-la" / "graph_sensor_locations.csv"),
            "start": "2020-03-01",
            "split": {"train": 0.7, "val": 0.1, "test": 0.2},
        }
    )
    np.testing.assert_allclose(d.speed, series(t=80).to_numpy(), rtol=1e-6)
    assert d.locations.shape == (4, 2)
    with pytest.raises(DataError, match="already exists"):
        fetch("metr-la", url=server.url, dest=dest, sha256=_sha(server.payload), progress=False)


def test_resume_partial_download(server, tmp_path):
    dest = tmp_path / "data"
    dest.mkdir()
    half = len(server.payload) // 3
    (dest / "data.tar.bz2.part").write_bytes(server.payload[:half])
    fetch("metr-la", url=server.url, dest=dest, sha256=_sha(server.payload), progress=False)
    assert server.ranges == [f"bytes={half}-"]
    assert (dest / "data.tar.bz2").read_bytes() == server.payload
    assert _only(dest) == ["data.tar.bz2", "metr-la"]


def test_interrupted_download_resumes_next_time(server, tmp_path):
    dest = tmp_path / "data"
    server.truncate_next = True
    with pytest.raises(DataError, match="run the same command again"):
        fetch("metr-la", url=server.url, dest=dest, sha256=_sha(server.payload), progress=False)
    assert _only(dest) == ["data.tar.bz2.part"]
    got = (dest / "data.tar.bz2.part").stat().st_size
    assert 0 < got < len(server.payload)
    fetch("metr-la", url=server.url, dest=dest, sha256=_sha(server.payload), progress=False)
    assert server.ranges == [None, f"bytes={got}-"]
    assert (dest / "data.tar.bz2").read_bytes() == server.payload


def test_corrupt_archive_leaves_nothing(server, tmp_path):
    dest = tmp_path / "data"
    payload = bytearray(server.payload)
    payload[len(payload) // 2 :] = bytes(len(payload) - len(payload) // 2)  # zeroed tail
    server.payload = bytes(payload)
    with pytest.raises(DataError, match="data.tar.bz2.*not a valid bz2 tar"):
        fetch("metr-la", url=server.url, dest=dest, sha256=_sha(server.payload), progress=False)
    assert _only(dest) == []
    server.payload = b"<html>not found</html>"
    code = main(
        [
            "fetch",
            "metr-la",
            "--url",
            server.url,
            "--dest",
            str(dest),
            "--no-progress",
            "--sha256",
            _sha(server.payload),
        ]
    )
    assert code == 2 and _only(dest) == []


def test_archive_without_the_graph_and_sha256(tmp_path):
    s = Server(_archive(tmp_path, with_graph=False))
    try:
        dest = tmp_path / "data"
        with pytest.raises(DataError, match=r"lacks \['sensor_graph/adj_mx.pkl'\]"):
            fetch("metr-la", url=s.url, dest=dest, sha256=_sha(s.payload), progress=False)
        assert _only(dest) == []
        s.payload = _archive(tmp_path / "again")
        with pytest.raises(DataError, match="sha256 mismatch"):
            fetch("metr-la", url=s.url, dest=dest, sha256="0" * 64, progress=False)
        assert _only(dest) == []
        good = hashlib.sha256(s.payload).hexdigest()
        assert fetch("metr-la", url=s.url, dest=dest, sha256=good, progress=False).is_dir()
        with pytest.raises(DataError, match=r"\['sensor_graph/adj_mx_bay.pkl'|PEMS-BAY"):
            fetch("pems-bay", url=s.url, dest=dest, sha256=good, progress=False)
        assert _only(dest) == ["metr-la"]  # the corrupt-for-pems archive is dropped too
    finally:
        s.close()


def test_without_sha256_downloads_but_refuses_to_unpack(server, tmp_path, capsys):
    dest = tmp_path / "data"
    code = main(["fetch", "metr-la", "--url", server.url, "--dest", str(dest), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2
    assert "no SHA-256 is pinned" in err and "--sha256 " + _sha(server.payload) in err
    assert hashlib.md5(server.payload).hexdigest() in err
    assert _only(dest) == ["data.tar.bz2"]  # kept for the rerun, nothing unpacked
    with pytest.raises(DataError, match="not 64 hex digits"):
        fetch("metr-la", url=server.url, dest=dest, sha256="abc", progress=False)
    assert fetch(
        "metr-la", url=server.url, dest=dest, sha256=_sha(server.payload), progress=False
    ).is_dir()
    assert server.ranges == [None]  # the kept archive was reused, not downloaded again


def test_experiment_files_load_what_fetch_writes(tmp_path, monkeypatch):
    """Every ``metr_la_*`` / ``pems_bay_*`` experiment finds the files ``fetch`` unpacked."""
    from tests.helpers import ROOT, make_cfg

    s = Server(_archive(tmp_path, both=True))
    try:
        work = tmp_path / "work"
        work.mkdir()
        monkeypatch.chdir(work)  # the dataset configs name data/... under the working directory
        for name in ("metr-la", "pems-bay"):
            fetch(name, url=s.url, sha256=_sha(s.payload), progress=False)
    finally:
        s.close()
    loaded = {}
    for path in sorted((ROOT / "conf" / "experiment").glob("*.yaml")):
        prefix = path.stem.split("_")[0] + "_" + path.stem.split("_")[1]
        if prefix not in ("metr_la", "pems_bay"):
            continue
        ds = make_cfg(f"experiment={path.stem}").dataset
        key = (str(ds.kind), str(ds.dir), str(ds.adj_pkl), str(ds.locations))
        if key not in loaded:
            loaded[key] = load_dataset(ds)
        d = loaded[key]
        assert d.num_nodes == (4 if prefix == "metr_la" else 3), path.stem
        assert d.locations is not None and d.locations.shape == (d.num_nodes, 2), path.stem
    assert len(loaded) == 2  # one dataset config per city, both from fetch's output
