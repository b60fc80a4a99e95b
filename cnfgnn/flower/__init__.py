"""Flower adapters: the only modules (with :mod:`cnfgnn.deploy`) that import ``flwr``.

* :mod:`cnfgnn.flower.client_app`: the ClientApp, thin handlers around ``NodeWorker``.
* :mod:`cnfgnn.flower.server_app`: the ServerApp, the ``Orchestrator`` (or the
  ``Forecaster``) over the run's ``Grid``.
* :mod:`cnfgnn.flower.engine`: the ``Engine`` protocol on a Flower ``Grid``.
* :mod:`cnfgnn.flower.codec`: protocol payloads <-> Flower ``RecordDict``.
* :mod:`cnfgnn.flower.simulation`: both apps in a Flower simulation (Ray).
"""
