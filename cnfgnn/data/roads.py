"""Synthetic road network: a grid of two-way roads with sensors along each carriageway.

Layout: ``n_roads ~ sqrt(N) / 3`` straight roads (alternately east-west and north-south) across
a square region; every road has two carriageways (opposite directions) and the N sensors are
spread evenly over the carriageways, about ``spacing_km`` apart. The sensor-level road graph
has a *through* edge from each sensor to the next one downstream on its carriageway and, at
every crossing, *turn* edges from the last sensor before the crossing to the first sensor after
it on each carriageway of the crossing road. Shortest paths on this graph are the directed road
distances ``d(i -> j)`` that feed the DCRNN kernel.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import numpy as np

KM_PER_DEG_LAT = 111.32


@dataclass
class RoadNetwork:
    """Sensors on directed carriageways.

    Attributes:
        pos_km: ``[N, 2]`` (x east, y north) in km.
        carriageway: ``[N]`` carriageway index of each sensor.
        peak_weights: ``[N, 2]`` (AM, PM) rush-hour weight of the sensor's direction.
        entry: ``[N]`` bool, first sensor of its carriageway (traffic enters the region there).
        src, dst: ``[E]`` int64 road-graph edges (driving direction).
        length_km: ``[E]`` edge lengths.
        turn: ``[E]`` bool, True for turns at crossings, False for through edges.
    """

    pos_km: np.ndarray
    carriageway: np.ndarray
    peak_weights: np.ndarray
    entry: np.ndarray
    src: np.ndarray
    dst: np.ndarray
    length_km: np.ndarray
    turn: np.ndarray

    @property
    def num_nodes(self) -> int:
        """N."""
        return len(self.pos_km)

    def latlon(self, origin: tuple[float, float] = (34.0, -118.45)) -> np.ndarray:
        """``[N, 2]`` (lat, lon) degrees, the region's south-west corner at ``origin``."""
        lat0, lon0 = origin
        lat = lat0 + self.pos_km[:, 1] / KM_PER_DEG_LAT
        lon = lon0 + self.pos_km[:, 0] / (KM_PER_DEG_LAT * np.cos(np.radians(lat0)))
        return np.stack([lat, lon], axis=1)


def _layout(
    num_nodes: int, roads_per_sqrt_node: float = 1 / 3, min_per_carriageway: int = 3
) -> tuple[int, int, list[int]]:
    """(horizontal roads, vertical roads, sensors per carriageway)."""
    n_roads = max(1, int(round(np.sqrt(num_nodes) * roads_per_sqrt_node)))
    while n_roads > 1 and num_nodes // (2 * n_roads) < min_per_carriageway:
        n_roads -= 1
    lanes = 2 * n_roads if num_nodes >= 2 else 1
    per = [num_nodes // lanes + (1 if k < num_nodes % lanes else 0) for k in range(lanes)]
    return (n_roads + 1) // 2, n_roads // 2, per


def road_network(
    num_nodes: int,
    spacing_km: float,
    rng: np.random.Generator,
    road_jitter: float = 0.15,
    sensor_jitter: float = 0.3,
    carriageway_gap_km: float = 0.04,
    rush_weights: tuple[float, float] = (1.0, 0.6),
) -> RoadNetwork:
    """Build the grid of roads and place ``num_nodes`` sensors on it.

    Args:
        num_nodes: N >= 1.
        spacing_km: mean distance between consecutive sensors of a carriageway.
        rng: random generator (jitter of roads and sensors, rush-hour direction).
        road_jitter: random shift of each road, as a fraction of the gap between roads.
        sensor_jitter: random shift of each sensor along its road, in units of the spacing.
        carriageway_gap_km: distance between the two carriageways of a road.
        rush_weights: (heavy, light) rush-hour weight; each road is AM-heavy one way and
            PM-heavy the other.
    """
    n_h, n_v, per = _layout(num_nodes)
    size = max(per) * spacing_km  # side of the square region
    # roads: (horizontal?, offset across the region)
    roads = [(True, (r + 0.5) * size / n_h) for r in range(n_h)]
    roads += [(False, (c + 0.5) * size / max(n_v, 1)) for c in range(n_v)]
    shift = rng.uniform(-road_jitter, road_jitter, len(roads)) * size / len(roads)
    roads = [(h, off + dx) for (h, off), dx in zip(roads, shift, strict=True)]
    road_am = rng.random(len(roads)) < 0.5
    pos, cw, peak, entry = [], [], [], []
    lanes: list[tuple[int, int, np.ndarray, np.ndarray]] = []  # (road, dir, node ids, s)
    node = 0
    for k, m in enumerate(per):
        road, direction = k // 2, (1 if k % 2 == 0 else -1)
        horizontal, off = roads[road]
        s = (np.arange(m) + 0.5) * size / m + rng.uniform(
            -sensor_jitter, sensor_jitter, m
        ) * spacing_km
        s = np.sort(np.clip(s, 0.0, size))[::direction]  # in driving order
        lateral = off + carriageway_gap_km / 2 * direction
        xy = (
            np.stack([s, np.full(m, lateral)], 1)
            if horizontal
            else np.stack([np.full(m, lateral), s], 1)
        )
        ids = np.arange(node, node + m)
        node += m
        pos.append(xy)
        cw += [k] * m
        am_heavy = bool(road_am[road]) == (direction == 1)  # the other way is PM-heavy
        peak += [rush_weights if am_heavy else rush_weights[::-1]] * m
        entry += [True] + [False] * (m - 1)
        lanes.append((road, direction, ids, s))
    src, dst, length, turn = [], [], [], []
    for _, _, ids, s in lanes:  # through edges
        src += list(ids[:-1])
        dst += list(ids[1:])
        length += list(np.abs(np.diff(s)))
        turn += [False] * (len(ids) - 1)
    for ra, da, ia, sa in lanes:  # turns at crossings
        for rb, db, ib, sb in lanes:
            if roads[ra][0] == roads[rb][0] or ra == rb:
                continue
            cross_a, cross_b = roads[rb][1], roads[ra][1]  # crossing position on a and on b
            before = np.flatnonzero((sa - cross_a) * da < 0)
            after = np.flatnonzero((sb - cross_b) * db > 0)
            if len(before) and len(after):
                u, v = before[-1], after[0]
                src.append(ia[u])
                dst.append(ib[v])
                length.append(abs(sa[u] - cross_a) + abs(sb[v] - cross_b))
                turn.append(True)
    return RoadNetwork(
        pos_km=np.concatenate(pos) if pos else np.zeros((0, 2)),
        carriageway=np.asarray(cw, np.int64),
        peak_weights=np.asarray(peak, np.float64),
        entry=np.asarray(entry, bool),
        src=np.asarray(src, np.int64),
        dst=np.asarray(dst, np.int64),
        length_km=np.asarray(length, np.float64),
        turn=np.asarray(turn, bool),
    )


def road_distances(net: RoadNetwork, cutoff_km: float) -> np.ndarray:
    """Directed shortest-path road distances, ``inf`` beyond ``cutoff_km``.

    Returns:
        ``[N, N]`` float32, ``d[i, j]`` = driving distance from sensor i to sensor j (0 on the
        diagonal).
    """
    n = net.num_nodes
    out: list[list[tuple[int, float]]] = [[] for _ in range(n)]
    for u, v, w in zip(net.src.tolist(), net.dst.tolist(), net.length_km.tolist(), strict=True):
        out[u].append((v, w))
    dist = np.full((n, n), np.inf, dtype=np.float32)
    for s in range(n):  # bounded Dijkstra: only a few dozen nodes lie within the cutoff
        best = {s: 0.0}
        heap = [(0.0, s)]
        while heap:
            d, u = heapq.heappop(heap)
            if d > best.get(u, np.inf):
                continue
            dist[s, u] = d
            for v, w in out[u]:
                nd = d + w
                if nd <= cutoff_km and nd < best.get(v, np.inf):
                    best[v] = nd
                    heapq.heappush(heap, (nd, v))
    return dist
