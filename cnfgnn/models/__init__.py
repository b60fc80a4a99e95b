"""cnfgnn.models: the per-node GRU seq2seq (grouped) and the server Graph Network."""

from cnfgnn.models.graph_network import GNBlock, GraphNetwork
from cnfgnn.models.node_seq2seq import (
    GroupGRU,
    GroupLinear,
    NodeSeq2Seq,
    build_node_model,
    teacher_forcing_prob,
)

__all__ = [
    "GNBlock",
    "GraphNetwork",
    "GroupGRU",
    "GroupLinear",
    "NodeSeq2Seq",
    "build_node_model",
    "teacher_forcing_prob",
]
