"""The side adapter of neox_lab models: every stream is a hook point, read with `run_with_cache`."""

from __future__ import annotations

import copy

import torch

from ..model.kernels import resolve_backend
from .side_base import Side, Variant, eval_mode
from .weight_diff import named_weights

#: Streams that exist only in the eager attention kernel.
EAGER_ONLY = ("attn.hook_attn_scores", "attn.hook_pattern")


def is_neox(model) -> bool:
    return hasattr(model, "hook_dict") and hasattr(model, "run_with_cache")


class NeoxSide(Side):
    kind = "neox_lab"

    @classmethod
    def accepts(cls, model) -> bool:
        return is_neox(model)

    def __init__(self, model, label: str):
        # A HookedTransformer runs through its transformers-convention view: the same modules and hooks.
        model = model.hf()
        super().__init__(model, label)
        param = next(model.parameters())
        # A model placed across devices (device_map) takes its inputs where it embeds, which an
        # offloaded first parameter (on "meta" between forwards) does not tell.
        self.dtype, self.device = param.dtype, getattr(model, "input_device", param.device)
        self.cfg = model.cfg
        self.backend = resolve_backend(model.attn_backend, torch.empty(0, dtype=self.dtype, device=self.device))
        self.architecture = getattr(model, "hf_architecture", type(model).__name__)
        self.processed = set(getattr(model, "weights_processed", ()) or ())
        self.can_step = self.can_generate = self.architecture == "GPTNeoXForCausalLM"

    def unobservable(self, names):
        out = {}
        for name in names:
            if name.endswith(EAGER_ONLY) and self.backend != "eager":
                # Caching these forces the eager kernel, and the comparison would silently test eager.
                out[name] = f"attention scores/pattern exist only in the eager kernel; {self.label} runs " \
                            f"{self.backend!r} (compare an eager copy to check them)"
            elif name not in self.model.hook_dict:
                out[name] = f"{self.label} has no such hook point"
        return out

    def run(self, ids, mask, names, stop_at_layer=None):
        ids = ids.to(self.device)
        kwargs = {} if mask is None else {"attention_mask": mask.to(self.device)}
        if stop_at_layer is not None:
            kwargs["stop_at_layer"] = stop_at_layer
        with eval_mode(self.model), torch.no_grad():
            logits, cache = self.model.run_with_cache(ids, names_filter=names, **kwargs)
        return dict(cache.items()), (logits if stop_at_layer is None else None)

    def weights(self):
        return named_weights(self.model)

    def recast(self, dtype):
        if getattr(self.model, "device_map", None):
            return None  # a placed model is not copied (its offloaded parts live on disk)
        return NeoxSide(copy.deepcopy(self.model).to(dtype), self.label)

    def step(self, ids, mask, past):
        with eval_mode(self.model), torch.no_grad():
            out = self.model(ids.to(self.device), attention_mask=None if mask is None else mask.to(self.device),
                             past_key_values=past, use_cache=True)
        return out.logits, out.past_key_values

    def variants(self):
        flag = "--dtype-" + self.label[-1]
        out = []
        for dtype in (torch.float32, torch.float64):
            if dtype != self.dtype:
                out.append(Variant(f"neox_lab ({self.backend}, {str(dtype).removeprefix('torch.')})",
                                   f"{flag} {str(dtype).removeprefix('torch.')}",
                                   lambda dtype=dtype: self.recast(dtype)))
        return out
