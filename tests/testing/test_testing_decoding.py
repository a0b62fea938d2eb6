"""The decoding check of `compare`: prefill plus one call per token with the KV cache against the side's
own full forward, and greedy tokens across sides. A model whose new token gets the position after the
right one passes every forward comparison (its prompt is right) and fails here, named by step.

Bounds: a side against itself in its own dtype, twice its measured rounding (fp32: ~2e-6 relative on
the logits); the off-by-one moves the step's logits by tens of percent.
"""

from __future__ import annotations

import pytest
import torch
import transformers

from neox_lab import NeoXForCausalLM
from neox_lab.testing import compare
from neox_lab.testing.code_bugs import decode_position_off_by_one
from neox_lab.testing.decoding import top1_agrees
from neox_lab.testing.mutations import named_place
from neox_lab.testing.pairs import build_pair, make_trained_like, tiny_config
from neox_lab.testing.plain_port import PlainNeoX, port

CFG = tiny_config(num_hidden_layers=3, max_position_embeddings=128)


@pytest.fixture(scope="module")
def ref():
    torch.manual_seed(0)
    return make_trained_like(NeoXForCausalLM(CFG, attn_backend="eager").eval(), seed=0, std=0.2)


def test_off_by_one_decoding_fails_and_is_named_by_its_step(ref):
    bad, expected = decode_position_off_by_one(ref)
    ids = torch.randint(0, CFG.vocab_size, (4, 32), generator=torch.Generator().manual_seed(0))
    report = compare(bad, ref, ids)
    assert all(h.passed for h in report.all_hooks) and report.logits.passed  # every forward is right
    assert not report.equivalent and named_place(report, expected)
    prompt = report.decoding.prompt_len
    failure = report.decoding.failures()[0]
    assert failure.startswith(f"decoding: step 1 (position {prompt}): model_a's logits with the KV cache"), failure
    assert report.decoding.consistency["model_b"][1].passed  # the reference decodes right
    assert any(not g.passed for g in report.decoding.greedy)  # and its greedy tokens part ways
    assert report.summary().startswith(f"NOT EQUIVALENT: decoding: step 1 (position {prompt})")


def test_neox_lab_and_transformers_decode_alike():
    hf, nx = build_pair(CFG, 1, trained_like=0.2)
    report = compare(nx, hf)
    assert report.equivalent, report.table()
    assert set(report.decoding.consistency) == {"model_a", "model_b"}
    assert all(g.first_difference is None for g in report.decoding.greedy)


def test_a_top1_flip_counts_only_past_twice_the_per_logit_bound():
    want = torch.tensor([[3.0, 2.99, -1.0, 0.0]])  # rms ~2.1: per-logit bound 1e-2 x 2.1
    near_tie = torch.tensor([[2.99, 3.0, -1.0, 0.0]])
    assert top1_agrees(near_tie, want, 1e-2) and not top1_agrees(near_tie, want, 1e-4)
    clear = torch.tensor([[0.0, 2.99, 3.0, -1.0]])  # the full forward ranks token 2 4 below its top-1
    assert not top1_agrees(clear, want, 1e-2)


def test_transformers_fp16_sdpa_decoding_passes_at_a_near_tie(tmp_path):
    """transformers' fp16 sdpa model with its KV cache picks, at step 5, a token its own full forward ranks
    second by a near tie (its logits there 0.07 of their bound from the full forward): rounding, not a
    decoding bug. Before the near-tie rule this failed as "decoding: step 5 (position 20)"."""
    cfg = tiny_config(num_hidden_layers=6, hidden_size=128, num_attention_heads=4, intermediate_size=512,
                      rotary_pct=0.25, vocab_size=128, max_position_embeddings=2048)
    _, nx = build_pair(cfg, 0, trained_like=0.2, directory=str(tmp_path))
    nx.set_attn_backend("eager")
    half = transformers.GPTNeoXForCausalLM.from_pretrained(tmp_path, dtype=torch.float16,
                                                           attn_implementation="sdpa").eval()
    report = compare(half, nx)
    assert report.equivalent, report.summary()
    assert report.decoding.consistency["model_a"] and report.decoding.passed


def test_a_ports_step_is_checked_and_its_bug_named(ref):
    plain = PlainNeoX.from_neox(ref)
    assert compare(port(plain), ref).decoding.passed

    def off_by_one(ids, past=None):
        """The port's step with the classic bug: a cached step's token one position too far."""
        if past is None:
            return plain.step(ids, None)
        start, (b, p) = past["length"], ids.shape
        positions = torch.arange(start + 1, start + 1 + p)[None].expand(b, -1)
        allowed = torch.ones(1, 1, p, start + p, dtype=torch.bool)
        logits, kv = plain._run(ids, positions, allowed, past)
        return logits, {"length": start + p, "kv": kv}

    report = compare(port(plain, step=off_by_one), ref)
    assert report.decoding.failures()[0].startswith("decoding: step 1 (position 16): model_a's"), report.table()


def test_decoding_is_skipped_with_the_reason_where_a_side_cannot_decode(ref):
    plain = PlainNeoX.from_neox(ref)
    report = compare(lambda ids, mask: plain(ids, mask), ref)
    assert report.equivalent
    assert "model_a cannot decode with a KV cache" in report.decoding.skipped["model_a"]
    assert "greedy generation not compared: model_a cannot generate" == report.decoding.skipped["greedy"]
    assert compare(ref, ref, decode_steps=0).decoding is None


def test_a_port_with_only_generate_is_compared_by_its_tokens(ref):
    plain = PlainNeoX.from_neox(ref)

    def generate(ids, n):
        """The port's own greedy loop (no step exposed): returns only the new tokens."""
        logits, past = plain.step(ids, None)
        out = []
        for _ in range(n):
            token = logits[:, -1].argmax(-1, keepdim=True)
            out.append(token)
            logits, past = plain.step(token, past)
        return torch.cat(out, dim=1)

    report = compare(port(plain, step=None, generate=generate), ref)
    assert report.equivalent and "model_a" not in report.decoding.consistency
    assert all(g.first_difference is None for g in report.decoding.greedy)
