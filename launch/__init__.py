"""Multi-process Flower deployment on loopback: one SuperLink, N SuperNodes, ``flwr run``.

* :mod:`launch.deploy`: the launcher (``python -m launch.deploy demo|run``; ``make deploy-demo``).
* :mod:`launch.procs`: process groups it starts, and stops by their ids only.
* :mod:`launch.supernode`: a SuperNode (optionally with Flower's fixed waits shortened).
* :mod:`launch.clientworker`: one long-lived ClientApp process per SuperNode.
* :mod:`launch.fastwaits`: the run-time patches of Flower's fixed waits (version-checked).
* :mod:`launch.certs`: CA, SuperLink certificate and SuperNode keys for
  ``engine.launch.secure=true`` (TLS + SuperNode authentication).
"""
