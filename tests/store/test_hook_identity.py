"""hook_fingerprint changes exactly when what a hook does can change: its code, closure values, partial
arguments, bound object, globals; and it refuses values it cannot read."""

import functools
import io

import pytest
import torch

from neox_lab.store.hook_identity import HookIdentityError, hook_fingerprint

OFFSET = 1.0


def steer(vector):
    def add(x, hook):
        return x + vector
    return add


def add_offset(x, hook):
    return x + OFFSET


def recursive(x, hook, depth=2):
    return x if depth == 0 else recursive(x, hook, depth - 1)


class Scaler:
    def __init__(self, by):
        self.by = by

    def __call__(self, x, hook):
        return x * self.by

    def apply(self, x, hook):
        return x * self.by


def test_values_a_hook_holds_are_part_of_its_fingerprint():
    v = torch.ones(4)
    assert hook_fingerprint(steer(v)) == hook_fingerprint(steer(torch.ones(4)))  # by content, not object
    assert hook_fingerprint(steer(v)) != hook_fingerprint(steer(v.clone().index_fill_(0, torch.tensor([3]), 2)))
    assert hook_fingerprint(Scaler(2)) != hook_fingerprint(Scaler(3))
    assert hook_fingerprint(Scaler(2).apply) != hook_fingerprint(Scaler(3).apply)
    partial = functools.partial(recursive, depth=1)
    assert hook_fingerprint(partial) != hook_fingerprint(functools.partial(recursive, depth=2))
    assert hook_fingerprint(recursive) == hook_fingerprint(recursive)  # a function naming itself ends
    sae = torch.nn.Linear(4, 4)
    before = hook_fingerprint(lambda x, hook: sae(x))
    with torch.no_grad():
        sae.weight[0, 0] += 1
    assert hook_fingerprint(lambda x, hook: sae(x)) != before


def test_globals_count_and_the_cached_model_is_a_marker():
    global OFFSET
    before = hook_fingerprint(add_offset)
    OFFSET = 2.0
    try:
        assert hook_fingerprint(add_offset) != before
    finally:
        OFFSET = 1.0
    model = torch.nn.Linear(3, 3)
    uses_model = lambda x, hook: x @ model.weight  # noqa: E731
    marked = hook_fingerprint(uses_model, model)
    with torch.no_grad():
        model.weight.add_(1)  # the model's weights have their own fingerprint in the manifest
    assert hook_fingerprint(uses_model, model) == marked


def test_a_value_with_no_content_is_refused_naming_where_it_is():
    fh = io.BytesIO(b"")
    locked = lambda x, hook: (fh, x)[1]  # noqa: E731
    with pytest.raises(HookIdentityError, match=r"closure variable 'fh' is a _io\.BytesIO"):
        hook_fingerprint(locked)
    meta = torch.empty(3, device="meta")
    with pytest.raises(HookIdentityError, match="meta device"):
        hook_fingerprint(steer(meta))
