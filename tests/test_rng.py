"""Counter-based randomness: a node's draws never depend on the other nodes."""

import numpy as np

from cnfgnn import rng


def test_rows_depend_only_on_their_node():
    a = rng.uniforms(42, np.array([3, 7, 11]), 2, "local", 50, extra=5)
    b = rng.uniforms(42, np.array([11]), 2, "local", 50, extra=5)
    np.testing.assert_array_equal(a[2], b[0])
    assert not np.allclose(a[0], a[1])


def test_keys_change_the_stream_and_values_are_uniform():
    base = rng.uniforms(1, np.array([0]), 1, "split", 20000)
    for other in (
        rng.uniforms(2, np.array([0]), 1, "split", 20000),
        rng.uniforms(1, np.array([0]), 2, "split", 20000),
        rng.uniforms(1, np.array([0]), 1, "local", 20000),
        rng.uniforms(1, np.array([0]), 1, "split", 20000, extra=1),
    ):
        assert not np.allclose(base, other)
    assert 0.0 <= base.min() and base.max() < 1.0
    assert abs(base.mean() - 0.5) < 0.01


def test_permutations_are_permutations():
    p = rng.permutations(0, np.arange(4), 1, "local", 100)
    assert p.shape == (4, 100)
    for row in p:
        np.testing.assert_array_equal(np.sort(row), np.arange(100))
