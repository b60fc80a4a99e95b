"""Download and unpack the CNFGNN authors' data archive (METR-LA / PEMS-BAY npz + graphs).

``fetch("metr-la", dest="data")`` downloads the archive to ``dest/<name>.part`` (resuming a
partial download with an HTTP Range request), renames it when complete, checks it (its
SHA-256; a valid bz2 tar holding the dataset's files; npz files with ``x`` and ``y``) and
unpacks the dataset's files flat into ``dest/<dataset>/`` through a temporary directory that is
renamed into place. The archive's SHA-256 must be given (``PINNED_SHA256`` says why none is
pinned). A corrupt archive is deleted and nothing is left behind; an interrupted
download keeps its ``.part`` file so the next run resumes it.
"""

from __future__ import annotations

import hashlib
import shutil
import sys
import tarfile
import tempfile
import time
import zipfile
from dataclasses import dataclass
from http.client import HTTPException
from pathlib import Path
from typing import IO
from urllib.error import HTTPError, URLError
from urllib.parse import urlparse
from urllib.request import Request, urlopen

import numpy as np

from cnfgnn.data.errors import DataError, bad_input

DEFAULT_URL = "https://zenodo.org/record/4521262/files/data.tar.bz2"
RECORD_URL = "https://zenodo.org/record/4521262"

#: SHA-256 of the archive at each known URL. None: no authoritative figure is known. The
#: authors' README and the Zenodo record publish no SHA-256 (Zenodo shows each file's MD5 on
#: the record page), and none could be found elsewhere, so none is pinned: ``fetch`` needs
#: ``sha256`` (``--sha256``) from the user, and without it stops after the download and prints
#: the archive's SHA-256 and MD5 so that the MD5 can be compared with the record page.
PINNED_SHA256: dict[str, str | None] = {DEFAULT_URL: None}


@dataclass(frozen=True)
class ArchiveSpec:
    """Which archive members make up a dataset (matched by path suffix)."""

    dirname: str
    required: tuple[str, ...]
    optional: tuple[str, ...] = ()


DATASETS = {
    "metr-la": ArchiveSpec(
        "metr-la",
        ("METR-LA/train.npz", "METR-LA/val.npz", "METR-LA/test.npz", "sensor_graph/adj_mx.pkl"),
        (
            "sensor_graph/graph_sensor_locations.csv",
            "sensor_graph/graph_sensor_ids.txt",
            "sensor_graph/METR-LA_partial_nodes.npz",
        ),
    ),
    "pems-bay": ArchiveSpec(
        "pems-bay",
        (
            "PEMS-BAY/train.npz",
            "PEMS-BAY/val.npz",
            "PEMS-BAY/test.npz",
            "sensor_graph/adj_mx_bay.pkl",
        ),
        (
            "sensor_graph/graph_sensor_locations_bay.csv",
            "sensor_graph/distances_bay_2017.csv",
            "sensor_graph/PEMS-BAY_partial_nodes.npz",
        ),
    ),
}


class Progress:
    """A one-line progress bar on a stream (stderr by default), redrawn at most 10x/s."""

    def __init__(
        self, total: int | None, done: int = 0, stream: IO[str] | None = None, width: int = 30
    ):
        self.total, self.done, self.width = total, done, width
        self.stream = stream or sys.stderr
        self._last = 0.0

    def update(self, n: int, force: bool = False) -> None:
        """Add ``n`` bytes and redraw when due."""
        self.done += n
        now = time.monotonic()
        if not force and now - self._last < 0.1:
            return
        self._last = now
        mb = self.done / 1e6
        if self.total:
            frac = min(self.done / self.total, 1.0)
            bar = "#" * int(frac * self.width)
            line = f"\r[{bar:<{self.width}}] {100 * frac:5.1f}% {mb:.1f}/{self.total / 1e6:.1f} MB"
        else:
            line = f"\r{mb:.1f} MB"
        self.stream.write(line)
        self.stream.flush()

    def close(self) -> None:
        """Final redraw and newline."""
        self.update(0, force=True)
        self.stream.write("\n")
        self.stream.flush()


def download(
    url: str, path: Path, progress: bool = True, timeout: float = 60.0, chunk: int = 1 << 16
) -> Path:
    """Download ``url`` to ``path`` via ``path.part``, resuming a partial ``.part``.

    Returns:
        ``path`` once complete.
    """
    part = path.with_name(path.name + ".part")
    have = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": "cnfgnn-data", **({"Range": f"bytes={have}-"} if have else {})}
    try:
        resp = urlopen(Request(url, headers=headers), timeout=timeout)
    except HTTPError as e:
        if e.code == 416 and have:  # nothing left to send: the .part is complete
            part.rename(path)
            return path
        raise bad_input(
            url,
            f"download failed: HTTP {e.code} {e.reason}",
            "check --url; run again later to resume",
        ) from None
    except (URLError, OSError) as e:
        raise bad_input(
            url,
            f"download failed ({getattr(e, 'reason', e)})",
            "check the network and --url; run again to resume",
        ) from None
    with resp:
        length = resp.headers.get("Content-Length")
        if have and resp.status == 206:
            start = resp.headers.get("Content-Range", "").split(" ")[-1].split("-")[0]
            if start != str(have):
                raise bad_input(
                    url,
                    f"server resumed at byte {start}, expected {have}",
                    f"delete {part} and run again",
                )
        else:
            have = 0  # the server sent the whole file
        total = have + int(length) if length is not None else None
        bar = Progress(total, have) if progress else None
        try:
            with part.open("ab" if have else "wb") as f:
                while block := resp.read(chunk):
                    f.write(block)
                    if bar:
                        bar.update(len(block))
        except (HTTPException, OSError) as e:
            raise bad_input(
                url,
                f"download interrupted ({type(e).__name__}) after {part.stat().st_size} bytes",
                "run the same command again to resume",
            ) from None
        finally:
            if bar:
                bar.close()
    size = part.stat().st_size
    if total is not None and size != total:
        raise bad_input(
            url,
            f"download incomplete ({size} of {total} bytes)",
            "run the same command again to resume",
        )
    part.rename(path)
    return path


def sha256sum(path: Path, chunk: int = 1 << 20, algorithm: str = "sha256") -> str:
    """Hex digest of a file (sha256 unless ``algorithm`` names another hashlib algorithm)."""
    h = hashlib.new(algorithm)
    with path.open("rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _match(name: str, wanted: tuple[str, ...]) -> str | None:
    name = name.lstrip("./")
    for w in wanted:
        if name == w or name.endswith("/" + w):
            return w
    return None


def unpack(archive: Path, spec: ArchiveSpec, staging: Path) -> list[str]:
    """Stream through the bz2 tar once, copying the dataset's members flat into ``staging``.

    Returns:
        The file names written. Raises DataError when the archive is not a valid bz2 tar or
        lacks a required member.
    """
    wanted = spec.required + spec.optional
    found: dict[str, str] = {}
    try:
        with tarfile.open(archive, mode="r|bz2") as tar:
            for m in tar:
                w = _match(m.name, wanted)
                if w is None or not m.isfile() or w in found:
                    continue
                src = tar.extractfile(m)
                if src is None:
                    continue
                target = staging / Path(w).name
                with src, target.open("wb") as dst:
                    shutil.copyfileobj(src, dst)
                found[w] = m.name
    except (tarfile.TarError, EOFError, OSError, ValueError) as e:
        raise bad_input(
            archive,
            f"not a valid bz2 tar archive ({type(e).__name__}: {e})",
            "the file is corrupt or not the CNFGNN archive; run again to "
            "re-download, or check --url",
        ) from None
    absent = [w for w in spec.required if w not in found]
    if absent:
        raise bad_input(
            archive,
            f"archive lacks {absent}",
            "use the CNFGNN authors' data.tar.bz2 (Zenodo record 4521262)",
        )
    for w in spec.required:
        if w.endswith(".npz"):
            try:
                with np.load(staging / Path(w).name) as z:
                    ok = {"x", "y"} <= set(z.files)
            except (OSError, ValueError, zipfile.BadZipFile):
                ok = False
            if not ok:
                raise bad_input(
                    archive,
                    f"member {found[w]} is not an npz with x and y",
                    "re-download the archive",
                )
    return sorted(Path(w).name for w in found)


def fetch(
    dataset: str,
    url: str = DEFAULT_URL,
    dest: str | Path = "data",
    sha256: str | None = None,
    progress: bool = True,
) -> Path:
    """Download (or reuse) the archive and unpack ``dataset`` into ``dest/<dataset>/``.

    Args:
        dataset: ``metr-la`` or ``pems-bay``.
        url: archive URL.
        dest: data directory.
        sha256: expected hex SHA-256 of the archive. Needed unless ``PINNED_SHA256`` has one
            for ``url`` (today none); without it the archive is downloaded (and kept) but not
            unpacked, and the error gives its SHA-256 and MD5.
        progress: draw a progress bar on stderr.

    Returns:
        The dataset directory.
    """
    expected = sha256 if sha256 is not None else PINNED_SHA256.get(url)
    if expected is not None and not (
        len(expected) == 64 and all(c in "0123456789abcdefABCDEF" for c in expected)
    ):
        raise bad_input(
            "cnfgnn-data fetch",
            f"--sha256 {expected!r} is not 64 hex digits",
            "pass the archive's SHA-256 as printed by sha256sum",
        )
    if dataset not in DATASETS:
        raise bad_input(
            "cnfgnn-data fetch", f"unknown dataset {dataset!r}", f"use one of {sorted(DATASETS)}"
        )
    spec = DATASETS[dataset]
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    target = dest / spec.dirname
    if target.exists():
        raise bad_input(target, "already exists", "remove it to fetch again")
    archive = dest / (Path(urlparse(url).path).name or "data.tar.bz2")
    if not archive.exists():
        download(url, archive, progress=progress)
    if expected is None:
        got, md5 = sha256sum(archive), sha256sum(archive, algorithm="md5")
        raise bad_input(
            archive,
            f"no SHA-256 is pinned for {url} (the authors publish none), "
            f"so it was downloaded but not unpacked. Its SHA-256 is {got}, its MD5 "
            f"{md5}",
            f"compare the MD5 with the one on {RECORD_URL}; if they "
            f"agree, run again with --sha256 {got}",
        )
    staging = Path(tempfile.mkdtemp(prefix=f".{spec.dirname}.tmp-", dir=dest))
    try:
        if sha256sum(archive) != expected.lower():
            raise bad_input(
                archive, "sha256 mismatch", "run again to re-download, or check --sha256"
            )
        unpack(archive, spec, staging)
        staging.rename(target)
    except DataError:
        shutil.rmtree(staging, ignore_errors=True)
        archive.unlink(missing_ok=True)  # corrupt: nothing left behind
        raise
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target
