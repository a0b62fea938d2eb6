"""TransformerLens' weight processing, in place: fold_ln, center_writing_weights, center_unembed,
fold_value_biases (and refactor_factored_attn_matrices, which rotary rules out).

Each step rewrites weights so the model computes the same next-token distribution (exactly, in real
arithmetic) while its weights and some streams become easier to read:

- fold_ln: each LayerNorm's weight and bias move into the weights that read its output: ln1 into the
  q/k/v projection, ln2 into fc_in, ln_final into the unembedding (a causal LM only; that bias becomes
  the unembedding bias b_U). The LayerNorms are left with weight 1 and bias 0, so they compute pure
  standardisation and `hook_scale` / the standardised stream keep their meaning. Like TransformerLens,
  the reading weights are then centred over d_model (a standardised vector has zero mean, so the
  all-ones direction is never read). The parallel residual changes nothing here: ln1 and ln2 both read
  resid_pre but each feeds its own reader.
- center_writing_weights: everything that writes into the residual stream (W_E, W_O, b_O, W_out, b_out)
  loses its mean over d_model. Every reader of the residual stream is a LayerNorm, which removes the mean
  anyway; this holds for the parallel and the sequential residual alike. Residual-stream hooks
  (resid_pre, attn_out, ...) then hold mean-free values, as in TransformerLens.
- center_unembed: W_U (and b_U) lose their mean over the vocabulary: every logit at a position moves by
  the same amount, so probabilities do not change.
- fold_value_biases: attention rows sum to 1, so b_V reaches the output as sum_h b_V[h] @ W_O[h]; it is
  moved into b_O. (Exact for every query that attends somewhere; a query whose keys a hook masked out
  entirely attends to nothing and no longer gets b_V's share, as in TransformerLens.)
- refactor_factored_attn_matrices: refused, as TransformerLens refuses it for rotary models: the QK
  circuit of a rotary head depends on the query and key positions, so no fixed change of basis keeps it.

Arithmetic is done in float64 and rounded once into the parameters' dtype. Parameters keep their
identity (edited in place), except where a tensor must appear: an unembedding bias, q/k/v biases on a
layer without any (attention_bias=False), and a tied unembedding, which processing unties (the embedding
and unembedding then change differently), setting `cfg.tie_word_embeddings` to False.
"""

from __future__ import annotations

import torch
from torch import nn

#: TransformerLens' from_pretrained defaults, which `HookedTransformer.from_pretrained` and
#: `process_weights_()` apply. `NeoXForCausalLM.from_pretrained` loads weights unprocessed (the
#: transformers-equivalent reference).
TL_DEFAULTS = dict(fold_ln=True, center_writing_weights=True, center_unembed=True, fold_value_biases=True,
                   refactor_factored_attn_matrices=False)


def _set(param: torch.Tensor, value: torch.Tensor) -> None:
    param.copy_(value.to(param.dtype))


def _ensure_bias(linear: nn.Linear) -> torch.Tensor:
    """`linear.bias`, created as zeros when the layer has none (folding a LayerNorm bias needs one)."""
    if linear.bias is None:
        w = linear.weight
        linear.bias = nn.Parameter(torch.zeros(w.shape[0], dtype=w.dtype, device=w.device),
                                   requires_grad=w.requires_grad)
    return linear.bias


def _fold_ln_into(ln, linear: nn.Linear, *, center: bool = True, need_bias: bool = True) -> None:
    """linear(ln(x)) == linear'(standardize(x)): scale the input columns by ln.weight, absorb ln.bias."""
    w = linear.weight.double()
    # A model split across devices may hold the LayerNorm apart from its reader (ln_final, unembed).
    gamma, beta = ln.weight.to(w.device, torch.float64), ln.bias.to(w.device, torch.float64)
    shift = w @ beta  # [out]
    if bool(shift.any()) or linear.bias is not None or need_bias:
        bias = _ensure_bias(linear)
        _set(bias, bias.double() + shift)
    w = w * gamma[None, :]
    if center:
        w = w - w.mean(1, keepdim=True)
    _set(linear.weight, w)


def _reset_ln(ln) -> None:
    ln.weight.fill_(1.0)
    ln.bias.zero_()


def _untie(model) -> None:
    unembed = model._modules.get("unembed")
    if unembed is None or unembed.weight is not model.body.embed.weight:
        return
    unembed.weight = nn.Parameter(unembed.weight.detach().clone(), requires_grad=unembed.weight.requires_grad)
    cfg = model.cfg.replace(tie_word_embeddings=False)
    model.cfg = cfg
    model.body.cfg = cfg


def _center_rows(t: torch.Tensor, dim: int) -> None:
    d = t.double()
    _set(t, d - d.mean(dim, keepdim=True))


@torch.no_grad()
def process_weights(model, *, fold_ln: bool = True, center_writing_weights: bool = True,
                    center_unembed: bool = True, fold_value_biases: bool = True,
                    refactor_factored_attn_matrices: bool = False) -> None:
    """Apply the chosen steps to `model` (a transformers-convention model: `body`, maybe `unembed`) in place,
    in TransformerLens' order, and record them in `model.weights_processed`."""
    if refactor_factored_attn_matrices:
        raise ValueError(
            "refactor_factored_attn_matrices=True is not possible for a NeoX: its attention is rotary "
            f"(rotary_pct={model.cfg.rotary_pct}), so a head's QK circuit depends on the query and key "
            "positions and no fixed change of basis of W_Q/W_K preserves it; TransformerLens refuses rotary "
            "models for the same reason. Use the other steps, and read model.QK / model.OV as FactoredMatrix")
    if any(p.device.type == "meta" for p in model.parameters()):
        # Refused before any step: a half-processed model would compute neither function.
        raise ValueError("weight processing edits weights in memory, and this model (placed with device_map) "
                         "holds offloaded weights as placeholders; load it without device_map to process it")
    body = model.body
    unembed = model._modules.get("unembed")
    if fold_ln or center_writing_weights or center_unembed:
        _untie(model)  # W_E and W_U are about to change in different ways
    if fold_ln:
        for block in body.blocks:
            # q/k/v biases appear only when ln1 has a bias to fold (a layer built without biases).
            _fold_ln_into(block.ln1, block.attn.qkv, need_bias=block.attn.qkv.bias is not None)
            _reset_ln(block.ln1)
            _fold_ln_into(block.ln2, block.mlp.fc_in)
            _reset_ln(block.ln2)
        if unembed is not None:
            # NeoX's unembedding has no bias: one appears only when ln_final's bias is not zero.
            _fold_ln_into(body.ln_final, unembed, need_bias=False)
            _reset_ln(body.ln_final)
        # Other heads (classifiers, QA, the bare model) keep ln_final's affine: their readers are not
        # TransformerLens weights, and the bare model's output *is* ln_final's output.
    if center_writing_weights:
        _center_rows(body.embed.weight, -1)
        for block in body.blocks:
            for linear in (block.attn.out, block.mlp.fc_out):
                _center_rows(linear.weight, 0)  # [d_model in]: the written vector is a column
                if linear.bias is not None:
                    _center_rows(linear.bias, 0)
    if center_unembed and unembed is not None:
        _center_rows(unembed.weight, 0)  # [d_vocab d_model]
        if unembed.bias is not None:
            _center_rows(unembed.bias, 0)
    if fold_value_biases:
        for block in body.blocks:
            attn = block.attn
            if attn.qkv.bias is None:
                continue
            b_v = attn.b_V.double()  # a view into qkv.bias
            moved = torch.einsum("hd,hdm->m", b_v, attn.W_O.double())
            out_bias = _ensure_bias(attn.out)
            new_bias = out_bias.double() + moved
            if center_writing_weights:
                new_bias = new_bias - new_bias.mean()  # as TransformerLens: b_O stays mean-free
            _set(out_bias, new_bias)
            attn.b_V.zero_()
    steps = dict(fold_ln=fold_ln, center_writing_weights=center_writing_weights, center_unembed=center_unembed,
                 fold_value_biases=fold_value_biases)
    model.weights_processed |= {name for name, on in steps.items() if on}
