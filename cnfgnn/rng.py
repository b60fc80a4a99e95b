"""Counter-based randomness: every draw is a pure function of (seed, node, round, phase, i).

A node's window shuffles and scheduled-sampling coins never come from a shared global
stream, so results do not depend on how nodes are grouped into clients, on which engine
runs them, or on the order in which clients are called (docs/design.md §4). The generator is
SplitMix64 applied to a hash of the key, vectorised over nodes and counters with numpy.
"""

from __future__ import annotations

import numpy as np

_PHASES = {
    "local": 1,
    "split": 2,
    "server": 3,
    "init": 4,
    "eval": 5,
    "select": 6,
    "sl": 7,
    "central": 8,
    "noise": 9,
    "dp": 10,
}
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def _mix(z: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser on uint64 arrays (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        z = z + _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * _M1
        z = (z ^ (z >> np.uint64(27))) * _M2
        return z ^ (z >> np.uint64(31))


def _key(seed: int, round_: int, phase: str, extra: int) -> np.uint64:
    z = np.uint64(0)
    for part in (seed, round_, _PHASES[phase], extra):
        z = _mix(np.asarray(z ^ np.uint64(part & 0xFFFFFFFFFFFFFFFF), dtype=np.uint64))
    return np.uint64(z)


def uniforms(
    seed: int, nodes: np.ndarray, round_: int, phase: str, count: int, extra: int = 0
) -> np.ndarray:
    """Uniform draws in [0, 1) for each node.

    Args:
        seed: experiment seed.
        nodes: ``[K]`` global node indices.
        round_: training round.
        phase: one of ``local``, ``split``, ``server``, ``init``, ``eval``, ``select``.
        count: draws per node.
        extra: further key (epoch, step counter, ...).

    Returns:
        ``[K, count]`` float64 array; row k depends only on (seed, nodes[k], round_, phase,
        extra), never on the other nodes.
    """
    key = _key(seed, round_, phase, extra)
    node_keys = _mix(np.asarray(nodes, dtype=np.uint64) ^ key)  # [K]
    counters = np.arange(count, dtype=np.uint64)  # [count]
    with np.errstate(over="ignore"):
        z = _mix(node_keys[:, None] * np.uint64(0xD1B54A32D192ED03) + counters[None, :])
    return (z >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def permutations(
    seed: int, nodes: np.ndarray, round_: int, phase: str, size: int, extra: int = 0
) -> np.ndarray:
    """One random permutation of ``range(size)`` per node: ``[K, size]`` int64."""
    return np.argsort(uniforms(seed, nodes, round_, phase, size, extra), axis=1, kind="stable")


def normals(
    seed: int, nodes: np.ndarray, round_: int, phase: str, count: int, extra: int = 0
) -> np.ndarray:
    """Standard normal draws ``[K, count]`` (Box-Muller on two :func:`uniforms` streams);
    row k depends only on (seed, nodes[k], round_, phase, extra), as for :func:`uniforms`."""
    u1 = uniforms(seed, nodes, round_, phase, count, extra=2 * extra)
    u2 = uniforms(seed, nodes, round_, phase, count, extra=2 * extra + 1)
    return np.sqrt(-2.0 * np.log1p(-u1)) * np.cos(2.0 * np.pi * u2)  # 1 - u1 in (0, 1]
