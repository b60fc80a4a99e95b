"""Multi-process Flower deployment on loopback: one SuperLink, N SuperNodes, ``flwr run``.

* :mod:`cnfgnn.deploy.launcher`: the launcher (``cnfgnn-deploy demo|run``, or
  ``python -m cnfgnn.deploy``; ``make deploy-demo``). Processes start and stop through
  :mod:`cnfgnn.procs` (process groups, stopped by their ids only).
* :mod:`cnfgnn.deploy.supernode`: a SuperNode (optionally with Flower's fixed waits shortened).
* :mod:`cnfgnn.deploy.clientworker`: one long-lived ClientApp process per SuperNode.
* :mod:`cnfgnn.deploy.fastwaits`: the run-time patches of Flower's fixed waits (version-checked).
* :mod:`cnfgnn.deploy.register`: ``flwr supernode register`` for every key in one process.
* :mod:`cnfgnn.deploy.certs`: CA, SuperLink certificate and SuperNode keys for
  ``engine.launch.secure=true`` (TLS + SuperNode authentication).
* :mod:`cnfgnn.deploy.forecast`: federated inference on such a deployment.

This package drives Flower's processes and CLI, so it may import ``flwr`` (as
:mod:`cnfgnn.flower` does); the core packages never do.
"""
