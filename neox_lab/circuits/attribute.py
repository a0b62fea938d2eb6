"""Edge attribution: how much each edge of a `Graph` matters to a metric, clean vs corrupted.

Every method scores an edge ``s -> r`` as (an estimate of) the metric change when that one edge
carries the corrupted sender's output into an otherwise clean run:

    score(s -> r) = metric(clean run, r's input + out_s(corrupted) - out_s(clean)) - metric(clean run)

EAP-IG's sign convention (its ``activation_difference`` is corrupted minus clean): an edge the clean
behaviour needs gets a score of the opposite sign to the clean-minus-corrupted metric gap.

    "exact"               the definition: one patched run per edge, batched over edges; each batch
                          starts at the receiver's block from the cached clean stream
    "EAP"                 first order: (out_s(corrupted) - out_s(clean)) . d metric / d input_r at the
                          clean run (Syed, Rager, Conmy 2023): a corrupted forward, a clean forward
                          with gradients, one backward
    "EAP-IG"              the gradient averaged over the straight path from the corrupted to the clean
    ("EAP-IG-inputs")     embeddings, at alpha = k / ig_steps, k = 0 .. ig_steps - 1 (Hanna et al. 2024,
                          as hannamw/EAP-IG computes it)
    "EAP-IG-activations"  the activation-path variant: for each group of senders in turn (the input, each
                          layer's heads, each MLP) its output is moved along the path from corrupted to
                          clean (alpha = k / ig_steps, k = 1 .. ig_steps) in an otherwise clean run, and
                          every receiver's gradient is averaged over all those runs (EAP-IG's
                          ``get_scores_ig_activations``); costs (2 n_layers + 1) x ig_steps backwards

`metric(logits) -> scalar` follows TransformerLens' patching convention (as `activation_patch`):
it sees the logits of the batch's rows and returns one number (average over rows inside it).

Memory: the sender changes, one activation per sender node and position ([senders batch pos
d_model]), are all scoring keeps; each input's gradient is dotted with them as it arrives. Neither
exact patching nor the gradient methods materialise a per-head copy of the stream for every head's
q, k and v (TransformerLens' `use_split_qkv_input`): a head's input is rebuilt or differentiated
through its own ln1 and W_Q/W_K/W_V instead (`_patch`, `_head_input_grads`). The tests check both
against the split inputs themselves.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from einops import einsum

from ..dtypes import widen
from ..hooks.registry import block_hook
from .runs import Inputs, Metric, Recorded, metric_value, prepare, record, tile
from .streams import (
    EDGE_SCORES,
    HEAD_COTANGENT,
    PROJECT_ROWS,
    TOKEN_SCORES,
    ReceiverHook,
    SenderHook,
    Streams,
    per_position,
    sender_major,
    sender_output,
    stream_flags,
    transformers_view,
)

__all__ = ["METHODS", "attribute"]

METHODS = ("exact", "EAP", "EAP-IG", "EAP-IG-inputs", "EAP-IG-activations")


def attribute(model, graph, clean, corrupted, metric: Metric, method: str = "EAP-IG", *, ig_steps: int = 5,
              attention_mask=None, batch_size: int = 64, logits_to_keep: int = 0) -> dict[str, float]:
    """Score every edge of `graph` (built by ``Graph.from_model(model)``); returns ``{edge name: score}``
    in the graph's edge order. See the module docstring for the methods and the sign convention.

    clean, corrupted: token ids [batch pos] of the same shape; `attention_mask` (the same padding for
        both, 1 = real token) is passed to every run.
    ig_steps: points on the integration path for the EAP-IG methods.
    batch_size: the most rows one forward runs (edges for "exact", path points for EAP-IG, each
        ``batch`` rows); the larger, the faster, at the cost of memory.
    logits_to_keep: unembed only the last N positions (`metric` then sees [batch N d_vocab]).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if isinstance(ig_steps, bool) or not isinstance(ig_steps, int) or ig_steps < 1:
        raise ValueError(f"ig_steps must be an int >= 1, got {ig_steps!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1 (rows per forward), got {batch_size!r}")
    model = transformers_view(model)
    inp = prepare(model, graph, clean, corrupted, attention_mask, logits_to_keep)
    streams = Streams(graph)
    # Sender outputs do not depend on the stream flags: record them on the model as it is. `delta` holds
    # the corrupted outputs, then (in place) corrupted minus clean, [senders batch pos d_model]: the one
    # activation per sender and position that scoring keeps.
    delta = record(model, streams, inp.corrupted, inp.mask, inp.fwd).outputs
    corrupted_embed = delta[0].clone()
    clean_run = None
    if method != "EAP":  # EAP's gradient run is a clean run: it records the clean outputs itself
        clean_run = record(model, streams, inp.clean, inp.mask, inp.fwd, keep_resid=method == "exact")
        delta -= clean_run.outputs
        if method != "EAP-IG-activations":
            clean_run.outputs = None
    if method == "exact":
        # Neither path materialises per-head copies of the stream: see `_patch` and `_gradient`.
        with stream_flags(model, split_qkv_input=False):
            values = _exact(model, streams, inp, metric, clean_run, delta, batch_size)
    else:
        with stream_flags(model, split_qkv_input=False):
            values = _gradient(model, streams, inp, metric, clean_run, delta, corrupted_embed, method, ig_steps,
                               batch_size)
    return dict(zip(graph.edges, values.tolist(), strict=True))


# ---------------------------------------------------------------------------------------------- exact
def _exact(model, streams: Streams, inp: Inputs, metric: Metric, clean_run: Recorded, delta: torch.Tensor,
           batch_size: int) -> torch.Tensor:
    """One run per edge (`batch` rows each, many edges per forward), from the receiver's block on."""
    graph = streams.graph
    batch = inp.batch
    clean_value = metric_value(metric, clean_run.logits, "exact").double()
    sender, receiver = graph.endpoints
    out = torch.zeros(len(graph), dtype=torch.float64)
    where = {r: (hook, slot) for hook in streams.receivers for slot, r in enumerate(hook.receivers)}
    per_forward = max(1, batch_size // batch)
    for layer in range(graph.n_layers + 1):
        ids = [i for i in range(len(graph)) if where[int(receiver[i])][0].layer == layer]
        for start in range(0, len(ids), per_forward):
            chunk = ids[start:start + per_forward]
            stream = tile(clean_run.resid[layer], len(chunk))
            hooks = []
            if layer == graph.n_layers:  # the logits read the final stream directly: add each edge's change
                stream = stream.clone()
                for g, i in enumerate(chunk):
                    stream[g * batch:(g + 1) * batch] += delta[int(sender[i])].to(stream.dtype)
            else:
                for hook in streams.in_layer(layer):
                    mine = [(g, where[int(receiver[i])][1], int(sender[i])) for g, i in enumerate(chunk)
                            if where[int(receiver[i])][0] is hook]
                    if mine:
                        hooks.append(_patch(model, hook, mine, clean_run.resid[layer], delta, batch))
            with torch.no_grad(), model.hooks(fwd_hooks=hooks):
                logits = model(inputs_embeds=stream, start_at_layer=layer,
                               attention_mask=inp.mask_for(len(chunk)), **inp.fwd).logits
            for g, i in enumerate(chunk):
                out[i] = metric_value(metric, logits[g * batch:(g + 1) * batch], "exact").double() - clean_value
    return out


def _patch(model, receiver: ReceiverHook, entries: list[tuple[int, int, int]], resid: torch.Tensor,
           delta: torch.Tensor, batch: int) -> tuple[str, Callable]:
    """(hook name, hook) giving rows g*batch.. the receiver input with sender s's corrupted-minus-clean
    output added, for each (g, slot, s) in `entries` (slot: the head of a q/k/v input).

    An MLP input is patched at `hook_mlp_in`. A head's q/k/v input is not materialised per head: the
    patched copy goes through the block's own ln1 and that head's W_Q/W_K/W_V and bias, and replaces
    the head's q/k/v at `attn.hook_q`/`hook_k`/`hook_v` (before rotary) in just those rows, so the block
    runs its fused projection for everything else."""
    device = delta.device
    rows = torch.cat([g * batch + torch.arange(batch) for g, _, _ in entries]).to(device)
    src_rows = torch.arange(batch, device=device).repeat(len(entries))
    heads = torch.tensor([slot for _, slot, _ in entries], device=device).repeat_interleave(batch)
    senders = torch.tensor([s for _, _, s in entries], device=device).repeat_interleave(batch)

    def change(like: torch.Tensor) -> torch.Tensor:  # [rows pos d_model]: each row's sender change
        return delta[senders, src_rows].to(like.device, like.dtype)

    if not receiver.per_head:  # the MLP input (a sequential block's resid_mid, which is not `resid`)
        def add(x: torch.Tensor, *, hook) -> torch.Tensor:
            x = x.clone()
            x[rows.to(x.device)] += change(x)
            return x
        return receiver.name, add

    kind = receiver.kind
    block = model.blocks[receiver.layer]
    weight, bias = {"q": (block.attn.W_Q, block.attn.b_Q), "k": (block.attn.W_K, block.attn.b_K),
                    "v": (block.attn.W_V, block.attn.b_V)}[kind]

    def project(x: torch.Tensor, *, hook) -> torch.Tensor:
        normed = block.ln1(resid[src_rows].to(x.device, x.dtype) + change(x))
        w, b = weight.to(x.device, x.dtype), bias.to(x.device, x.dtype)
        new = einsum(normed, w[heads.to(x.device)], PROJECT_ROWS) + b[heads.to(x.device)][:, None]
        x = x.clone()
        x[rows.to(x.device), :, heads.to(x.device)] = new
        return x
    return f"blocks.{receiver.layer}.attn.hook_{kind}", project


# ---------------------------------------------------------------------------------------------- gradients
@dataclass(frozen=True)
class _Point:
    """One run on the integration path: the input embedding at `embed_alpha` between corrupted (0)
    and clean (1), and optionally one sender hook's output at `alpha` between them."""

    embed_alpha: float = 1.0
    hook: str | None = None
    alpha: float = 1.0


def _path(method: str, streams: Streams, steps: int) -> list[_Point]:
    if method == "EAP":
        return [_Point()]
    if method in ("EAP-IG", "EAP-IG-inputs"):
        return [_Point(embed_alpha=k / steps) for k in range(steps)]
    points = []
    for sender in streams.senders:  # the input, then each layer's heads and its MLP
        for k in range(1, steps + 1):
            points.append(_Point(embed_alpha=k / steps) if sender.name == "hook_embed"
                          else _Point(hook=sender.name, alpha=k / steps))
    return points


def _gradient(model, streams: Streams, inp: Inputs, metric: Metric, clean_run: Recorded | None, delta: torch.Tensor,
              corrupted_embed: torch.Tensor, method: str, steps: int, batch_size: int) -> torch.Tensor:
    """Gradient scores: for each chunk of path points, one forward with gradients and one backward.

    A head's q/k/v input is not materialised per head (TransformerLens' split inputs would keep 3 x
    n_heads copies of the stream per layer for the backward). Its gradient follows from the chain rule
    through what the head does with it, q_h = ln1(x) W_Q[h] + b_Q[h]: the backward hooks keep the
    gradient at `attn.hook_q` / `hook_k` / `hook_v` (one activation per layer each), and afterwards each
    layer's is taken back through W_Q[h] (W_K, W_V) and, as one batched vector-Jacobian product, through
    the block's own ln1 at the stream the run fed it. MLP inputs (`hook_mlp_in`) and the logits' input
    are scored in their backward hooks directly."""
    graph = streams.graph
    batch = inp.batch
    points = _path(method, streams, steps)
    scores = torch.zeros(len(graph.senders), len(graph.receivers), dtype=torch.float64, device=delta.device)
    per_forward = max(1, batch_size // batch)
    for start in range(0, len(points), per_forward):
        chunk = points[start:start + per_forward]
        copies = len(chunk)
        leaf: list[torch.Tensor] = []

        def start_graph(x, *, hook, chunk=chunk, leaf=leaf):
            # x is the clean embedding in every row group; group c goes to its point of the path. The
            # result is a leaf: gradients start here whether or not the weights want them.
            if any(p.embed_alpha != 1.0 for p in chunk):
                alphas = torch.tensor([p.embed_alpha for p in chunk], dtype=x.dtype, device=x.device)
                base = tile(corrupted_embed.to(x.device, x.dtype), len(chunk))
                x = base + alphas.repeat_interleave(batch)[:, None, None] * (x - base)
            leaf.append(x.detach().requires_grad_())
            return leaf[0]

        streams_in: dict[int, torch.Tensor] = {}  # layer -> the stream entering it in this run
        head_grads: dict[tuple[int, str], torch.Tensor] = {}  # (layer, "q") -> gradient at attn.hook_q

        def keep_stream(x, *, hook, streams_in=streams_in):
            streams_in[hook.layer()] = x.detach()

        def keep_grad(kind, head_grads=head_grads):
            def hook(g, *, hook):
                head_grads[hook.layer(), kind] = g.detach()
            return hook

        hooks = [("hook_embed", start_graph)]
        hooks += [(block_hook(layer, "hook_resid_pre"), keep_stream) for layer in range(graph.n_layers)]
        if clean_run is None:  # EAP: this run is the clean run; finish delta as its senders write
            hooks += [(sender.name, _subtract(sender, delta)) for sender in streams.senders]
        for name in {p.hook for p in chunk if p.hook is not None}:
            mine = [(c, p.alpha) for c, p in enumerate(chunk) if p.hook == name]
            hooks.append((name, _interpolate(mine, streams, name, clean_run.outputs, delta, batch)))
        bwd = [(r.name, _accumulate(r, scores, delta, copies, batch)) for r in streams.receivers if not r.per_head]
        bwd += [(block_hook(layer, f"attn.hook_{kind}"), keep_grad(kind)) for layer in range(graph.n_layers)
                for kind in "qkv"]
        with torch.enable_grad(), model.hooks(fwd_hooks=hooks, bwd_hooks=bwd):
            logits = model(tile(inp.clean, copies), attention_mask=inp.mask_for(copies), **inp.fwd).logits
            total = sum(metric_value(metric, logits[c * batch:(c + 1) * batch], method) for c in range(copies))
            if not total.requires_grad:
                raise ValueError(f"{method} needs a metric differentiable in the logits (it returned a tensor "
                                 "that does not require grad)")
            # Only the activations' gradients are taken: parameters' .grad stay as they were.
            torch.autograd.grad(total, leaf[0])
            del logits, total
            for layer in range(graph.n_layers):
                heads = [r for r in streams.in_layer(layer) if r.per_head and (layer, r.kind) in head_grads]
                if heads:  # none: this layer's heads had no path to the metric in this run
                    grads = [head_grads.pop((layer, r.kind)) for r in heads]
                    _score_heads(model, layer, heads, streams_in[layer], grads, delta, scores, copies)
    sender, receiver = graph.endpoints
    return (scores[sender, receiver] / len(points)).cpu()


#: Elements (receivers x tokens x d_model) of one step of `_score_heads`: its tensors stay in cache.
_CHUNK = 2**21


def _score_heads(model, layer: int, heads: list[ReceiverHook], stream: torch.Tensor, grads: list[torch.Tensor],
                 delta: torch.Tensor, scores: torch.Tensor, copies: int) -> None:
    """Score the edges into block `layer`'s q/k/v inputs (`heads`, one ReceiverHook per kind) from the
    gradients at its heads' q (k, v) [rows pos n_heads d_head] and the stream the block read [rows pos
    d_model].

    The gradient at head h's own copy of the input is the gradient at its q taken back through W_Q[h]
    (a linear map) and through the block's ln1 at the stream (a vector-Jacobian product per head and
    kind, batched). The q, k and v inputs read the same senders, so their scores come from one product
    with the sender changes. Done over a few tokens (rows x positions) at a time: the products are sums
    over tokens, and on a CPU the per-head tensors of a whole batch would not stay in cache."""
    block = model.blocks[layer]
    weights = {"q": block.attn.W_Q, "k": block.attn.W_K, "v": block.attn.W_V}
    weights = [weights[r.kind].to(grads[0].device, grads[0].dtype) for r in heads]
    ids = torch.tensor(sum((r.receivers for r in heads), ()), device=scores.device)
    up, d_model = heads[0].upstream, stream.shape[-1]
    tokens = delta.shape[1] * delta.shape[2]  # one copy's rows x positions
    changes = delta[:up].reshape(up, tokens, d_model)
    stream = stream.reshape(copies, tokens, d_model)
    grads = [g.reshape(copies, tokens, *g.shape[2:]) for g in grads]
    step = max(1, _CHUNK // (len(ids) * d_model))
    total = torch.zeros(up, len(ids), dtype=torch.float64, device=scores.device)
    for start in range(0, tokens, step):
        part = slice(start, start + step)
        inputs = 0.0  # [receivers tokens d_model]: the gradients at the inputs, summed over the copies
        for copy in range(copies):
            cotangents = torch.cat([einsum(g[copy, part], w, HEAD_COTANGENT) for g, w in zip(grads, weights)])
            _, pullback = torch.func.vjp(block.ln1, stream[copy, part].to(cotangents.device, cotangents.dtype))
            inputs = inputs + torch.func.vmap(pullback)(cotangents)[0]
        total += einsum(changes[:, part], inputs.to(changes.device, changes.dtype), TOKEN_SCORES).double()
    scores[:up, ids] += total


def _subtract(sender: SenderHook, delta: torch.Tensor) -> Callable:
    """A forward hook turning `sender`'s corrupted outputs in `delta` into corrupted minus this run's."""
    def hook(x: torch.Tensor, *, hook) -> None:
        delta[sender.first:sender.first + sender.count] -= sender_major(sender, x.detach()).to(delta)
    return hook


def _interpolate(entries: list[tuple[int, float]], streams: Streams, name: str, clean: torch.Tensor,
                 delta: torch.Tensor, batch: int) -> Callable:
    """A hook setting the rows of each (copy c, alpha) in `entries` to that sender group's corrupted
    output + alpha (clean - corrupted) = clean + (1 - alpha) (corrupted - clean)."""
    sender = next(s for s in streams.senders if s.name == name)

    def hook(x: torch.Tensor, *, hook) -> torch.Tensor:
        x = x.clone()
        for c, alpha in entries:
            value = sender_output(clean, sender) + (1 - alpha) * sender_output(delta, sender)
            x[c * batch:(c + 1) * batch] = value.to(x.dtype)
        return x
    return hook


def _accumulate(receiver: ReceiverHook, scores: torch.Tensor, delta: torch.Tensor, copies: int, batch: int):
    """A backward hook adding (sender change) . (gradient at this input), summed over the path's row
    groups, batch and positions, to scores[senders upstream, this hook's receivers]."""
    up = receiver.upstream
    ids = torch.tensor(receiver.receivers, device=scores.device)

    def hook(grad: torch.Tensor, *, hook) -> None:
        g = per_position(grad, receiver.per_head)
        g = widen(g).reshape(copies, batch, *g.shape[1:]).sum(0).to(delta.device, delta.dtype)
        scores[:up, ids] += einsum(delta[:up], g, EDGE_SCORES).double()
    return hook
