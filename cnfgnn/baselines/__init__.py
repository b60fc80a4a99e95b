"""The paper's baselines (docs/method.md §6), as configurations over the same modules.

Federated baselines run through the same :class:`~cnfgnn.federation.rounds.Orchestrator`
and :class:`~cnfgnn.federation.node.NodeWorker`, selected by ``federation=<preset>``:

==================  ==============================  =========================================
preset              paper row                       what changes
==================  ==============================  =========================================
``cnfgnn``          CNFGNN (64K + 1M)               (the method)
``fedavg``          GRU (63K/727K) + FedAvg         ``model=gru_*``: no graph embedding
``local``           GRU (local)                     ``aggregate: none``: no weights leave a node
``fmtl``            GRU + FMTL                      ``aggregate: fmtl``: graph regulariser
``at_no_fedavg``    AT, w/o FedAvg (Fig. 2)         ``aggregate: none`` with the CNFGNN round
``split_learning``  Split Learning (Fig. 2)         ``alternating: false``
``central``         GRU / GRU + GN (centralized)    :mod:`cnfgnn.baselines.centralized`
==================  ==============================  =========================================

Only the centralised baselines need code of their own: they pool the data in one place.
"""
