"""Benchmarks, outside the library's core.

* :mod:`cnfgnn.bench.engines`: ``cnfgnn-bench`` (``make bench``), every engine side by side.
* :mod:`cnfgnn.bench.central_limit`: CNFGNN trained in one process, the limit on this hardware.
* :mod:`cnfgnn.bench.latency`: the latency of a real deployment
  (``python -m cnfgnn.bench.latency``).
"""
