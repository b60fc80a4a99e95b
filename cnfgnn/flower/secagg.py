"""The FedAvg phase through Flower's SecAgg+ (``privacy.secagg=true``, docs/privacy.md).

Server: :func:`secure_mean` runs ``SecAggPlusWorkflow`` for one phase inside our own
Message-API main loop. The workflow wants a ``LegacyContext`` (a legacy ``Strategy`` and a
``ClientManager``), so :class:`PhaseStrategy` hands it one ``FitIns`` per client (our
``train.local`` request in legacy clothing, :func:`payload_to_fitins`) and keeps what
``aggregate_fit`` receives: the unmasked mean of the clients' contributions, never one
client's. The workflow's four stages travel as plain ``"train"`` messages.

Client: the ClientApp carries ``secaggplus_mod``, which acts on ``"train"`` messages only
(every ``train.local``/``query.*``/``evaluate.*`` message passes through untouched). Its
``"train"`` handler (``client_app.secure_train``) answers the request like ``train.local``
and replies, in the legacy ``FitRes`` format, with the client's contribution
(:func:`cnfgnn.federation.secure.client_contribution`) at weight 1 (``num_examples = 1 =
max_weight``: the workflow's weighting factor is exactly 1); the mod quantises and masks it.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Context, RecordDict
from flwr.common import (
    Code,
    FitIns,
    FitRes,
    Parameters,
    Status,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.common.serde import recorddict_to_proto
from flwr.compat.common import recorddict_compat as compat
from flwr.server import ServerConfig, SimpleClientManager
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey

from cnfgnn.federation import protocol as P
from cnfgnn.federation.secure import SecureSum, tensor_names

#: FitIns config key listing the payload's array keys, in ``parameters`` order.
ARRAY_KEYS = "cnfgnn.array_keys"
#: FitRes metrics key: the node's step counter (the only metric sent, in the clear).
STEP = P.STEP
SECAGG_TYPE = "train"  # the legacy message type SecAgg+ acts on


def payload_to_fitins(payload: P.Payload) -> FitIns:
    """A ``train.local`` request as a legacy ``FitIns`` (arrays in ``parameters``)."""
    keys = sorted(k for k, v in payload.items() if isinstance(v, np.ndarray))
    config: dict[str, Any] = {ARRAY_KEYS: ",".join(keys)}
    for key, value in payload.items():
        if isinstance(value, np.ndarray):
            continue
        if isinstance(value, np.generic) or not isinstance(value, (bool, int, float, str)):
            raise TypeError(
                f"payload key {key!r}: a secure phase sends arrays and Python "
                f"scalars only, got {type(value).__name__}"
            )
        config[key] = value
    return FitIns(ndarrays_to_parameters([payload[k] for k in keys]), config)


def fitins_to_payload(fitins: FitIns) -> P.Payload:
    """Inverse of :func:`payload_to_fitins`."""
    config = dict(fitins.config)
    keys = [k for k in str(config.pop(ARRAY_KEYS, "")).split(",") if k]
    arrays = parameters_to_ndarrays(fitins.parameters)
    if len(arrays) != len(keys):
        raise ValueError(f"secure train: {len(arrays)} arrays for keys {keys}")
    return dict(zip(keys, arrays)) | config


def contribution_fitres(parts: list[np.ndarray], step: int) -> FitRes:
    """A client's contribution as the ``FitRes`` ``secaggplus_mod`` masks (weight 1)."""
    return FitRes(
        Status(Code.OK, ""),
        ndarrays_to_parameters(parts),
        num_examples=1,
        metrics={STEP: int(step)},
    )


class PhaseStrategy(Strategy):
    """A legacy ``Strategy`` for one phase: our FitIns per client; keeps the aggregate."""

    def __init__(self, fitins: dict[int, FitIns]):
        self.fitins = fitins  # Flower node id -> FitIns
        self.results: list[tuple[Any, FitRes]] = []
        self.failures: list[Any] = []

    def initialize_parameters(self, client_manager: Any) -> None:
        return None

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: Any
    ) -> list[tuple[Any, FitIns]]:
        proxies = client_manager.all()
        return [(proxies[str(n)], ins) for n, ins in self.fitins.items()]

    def aggregate_fit(
        self, server_round: int, results: list[tuple[Any, FitRes]], failures: list[Any]
    ) -> tuple[Parameters | None, dict]:
        self.results, self.failures = list(results), list(failures)
        return (results[0][1].parameters if results else None), {}

    def configure_evaluate(
        self, server_round: int, parameters: Parameters, client_manager: Any
    ) -> list:
        return []

    def aggregate_evaluate(
        self, server_round: int, results: list, failures: list
    ) -> tuple[None, dict]:
        return None, {}

    def evaluate(self, server_round: int, parameters: Parameters) -> None:
        return None


def proto_nbytes(content: RecordDict) -> int:
    """Serialized (protobuf) size of a message's content. The SecAgg+ messages carry empty
    strings, which ``count_bytes`` (:func:`cnfgnn.flower.codec.wire_nbytes`) refuses."""
    return int(recorddict_to_proto(content).ByteSize())


class CountingGrid:
    """The engine's grid for the workflow: counts serialized bytes and round trips."""

    def __init__(self, grid: Any):
        self.grid, self.down, self.up, self.trips = grid, 0, 0, 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.grid, name)

    def send_and_receive(self, messages: Any, *, timeout: float | None = None) -> Any:
        messages = list(messages)
        self.trips += 1
        self.down += sum(proto_nbytes(m.content) for m in messages)
        replies = list(self.grid.send_and_receive(messages, timeout=timeout))
        self.up += sum(proto_nbytes(r.content) for r in replies if not r.has_error())
        return replies


def secure_mean(
    grid: Any,
    node_of: dict[int, int],
    payloads: dict[int, P.Payload],
    settings: Any,
    round_no: int,
    timeout_s: float,
) -> SecureSum:
    """One FedAvg phase through ``SecAggPlusWorkflow``; the server learns only the mean.

    Args:
        grid: the ServerApp's grid.
        node_of: client id -> Flower node id (connected clients).
        payloads: client id -> ``train.local`` request (with the global model).
        settings: ``privacy.secagg_plus`` (:class:`cnfgnn.privacy.dp.SecAggSettings`).
        round_no: the FedAvg round (the workflow's ``current_round``).
        timeout_s: per-stage timeout.
    """
    names = tensor_names(next(iter(payloads.values())))
    failures = {c: "client not connected" for c in payloads if c not in node_of}
    cid_of = {node_of[c]: c for c in payloads if c in node_of}
    fitins = {node_of[c]: payload_to_fitins(p) for c, p in payloads.items() if c in node_of}
    if len(fitins) < 2:
        raise ValueError("privacy.secagg=true needs at least 2 clients in the FedAvg phase")
    cm = SimpleClientManager()
    run_id = 0  # GridClientProxy and the workflow keep it but never use it (flwr 1.42)
    for node in fitins:
        cm.register(GridClientProxy(node, grid, run_id))
    strategy = PhaseStrategy(fitins)
    lctx = LegacyContext(
        Context(run_id=run_id, node_id=0, node_config={}, state=RecordDict(), run_config={}),
        ServerConfig(num_rounds=1),
        strategy,
        cm,
    )
    lctx.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord(
        {WorkflowKey.CURRENT_ROUND: int(round_no)}
    )
    lctx.state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(
        Parameters(tensors=[], tensor_type="numpy.ndarray"), keep_input=True
    )
    workflow = SecAggPlusWorkflow(
        num_shares=int(settings.num_shares),
        reconstruction_threshold=int(settings.reconstruction_threshold),
        max_weight=1.0,
        clipping_range=float(settings.clipping_range),
        quantization_range=int(settings.quantization_range),
        modulus_range=int(settings.modulus_range),
        timeout=timeout_s,
    )
    counting = CountingGrid(grid)
    t0 = time.perf_counter()
    workflow(counting, lctx)
    seconds = time.perf_counter() - t0
    clients = sorted(cid_of[int(proxy.cid)] for proxy, _ in strategy.results)
    for c in cid_of.values():
        if c not in clients:
            failures[c] = "left out of the SecAgg+ sum (dropped during the phase)"
    if not strategy.results:
        raise RuntimeError(
            "SecAgg+ halted without an aggregate (too many dropouts for "
            "privacy.secagg_plus.reconstruction_threshold)"
        )
    mean = parameters_to_ndarrays(strategy.results[0][1].parameters)
    if len(mean) != len(names):
        raise ValueError(f"SecAgg+ returned {len(mean)} tensors, the model has {len(names)}")
    step = max(int(res.metrics.get(STEP, 0)) for _, res in strategy.results)
    return SecureSum(
        mean={n: np.asarray(m, np.float64) for n, m in zip(names, mean)},
        clients=clients,
        failures=failures,
        step=step,
        bytes_down=counting.down,
        bytes_up=counting.up,
        round_trips=counting.trips,
        seconds=seconds,
    )
