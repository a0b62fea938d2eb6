"""Circuit discovery on a NeoX model's own graph: which edge (one head's or MLP's output, as one later
head's query, key or value input, an MLP's input or the logits read it) carries a behaviour.

    graph      `Graph`: nodes input, a{L}.h{H}, m{L}, logits; EAP-IG's edge names; the edge set of the
               model's residual kind (no a{L}.h*->m{L} in a parallel block); top-n, greedy, pruning,
               drawing, JSON
    attribute  `attribute`: exact edge patching (the ground truth, batched over edges), EAP, EAP-IG
               on the inputs and on the activations
    evaluate   `evaluate`: the metric of a circuit with every other edge ablated (corrupted or mean);
               `faithfulness`: the curve of metric vs circuit size
    select     choosing edges: top n, greedy growth from the logits, pruning
    agreement  rank correlation (Spearman) of two attributions
    streams    where nodes live: the hook points of sender outputs and receiver inputs
    runs       the recording run and the checks attribution and evaluation share
    plotting   figures of the graph and of the faithfulness curve

Uses hooked models only through their public surface (`run_with_hooks`, `hooks`, `cfg`,
`set_use_split_qkv_input`, `set_use_hook_mlp_in`, and TransformerLens' `blocks[L].ln1` and
`blocks[L].attn.W_Q` / `W_K` / `W_V` / `b_Q` ... to rebuild or differentiate one head's input); imports
the hook contract and the foundations, never the model's internals.
"""

from .agreement import spearman
from .attribute import METHODS, attribute
from .evaluate import ABLATIONS, FaithfulnessCurve, evaluate, evaluate_many, faithfulness
from .graph import Graph, SavedGraph
from .select import greedy, prune, top_edges

__all__ = ["ABLATIONS", "METHODS", "FaithfulnessCurve", "Graph", "SavedGraph", "attribute", "evaluate",
           "evaluate_many", "faithfulness", "greedy", "prune", "spearman", "top_edges"]
