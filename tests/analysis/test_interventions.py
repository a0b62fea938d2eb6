import pytest
import torch

from neox_lab import NeoXConfig, NeoXForCausalLM
from neox_lab.analysis.interventions import (
    add_vector,
    clamp,
    mean_ablate,
    patch_from_cache,
    record,
    resample_ablate,
    selection_mask,
    zero_ablate,
)

CFG = NeoXConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                 intermediate_size=64, rotary_pct=0.5, max_position_embeddings=64)
Z, RESID, PATTERN = "blocks.1.attn.hook_z", "blocks.1.hook_resid_pre", "blocks.0.attn.hook_pattern"


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return NeoXForCausalLM(CFG, attn_backend="eager").eval()


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, CFG.vocab_size, (3, 7), generator=torch.Generator().manual_seed(1))


def seen(model, tokens, name, fn):
    """(activation before, activation after `fn`) at hook `name`, and the hooked run's logits."""
    before, after = {}, {}
    with torch.no_grad():
        hooks = [(name, record(before)), (name, fn), (name, record(after))]
        out = model.run_with_hooks(tokens, fwd_hooks=hooks)
    return before[name], after[name], out.logits


def test_zero_ablate_whole_stream(model, tokens):
    _, after, _ = seen(model, tokens, RESID, zero_ablate())
    assert torch.equal(after, torch.zeros_like(after))


def test_zero_ablate_heads_on_z(model, tokens):
    before, after, _ = seen(model, tokens, Z, zero_ablate(heads=[0, 2]))  # [batch pos n_heads d_head]
    assert torch.equal(after[:, :, [0, 2]], torch.zeros_like(after[:, :, [0, 2]]))
    assert torch.equal(after[:, :, [1, 3]], before[:, :, [1, 3]])


def test_zero_ablate_heads_on_pattern_uses_axis_1(model, tokens):
    before, after, _ = seen(model, tokens, PATTERN, zero_ablate(heads=1))  # [batch n_heads query_pos key_pos]
    assert torch.equal(after[:, 1], torch.zeros_like(after[:, 1]))
    assert torch.equal(after[:, [0, 2, 3]], before[:, [0, 2, 3]])


def test_zero_ablate_positions_and_heads(model, tokens):
    before, after, _ = seen(model, tokens, Z, zero_ablate(heads=[3], positions=[0, -1]))
    expected = before.clone()
    expected[:, [0, 6], 3] = 0
    assert torch.equal(after, expected)


@pytest.mark.parametrize("positions", [slice(2, 4), torch.tensor([0, 0, 1, 1, 0, 0, 0], dtype=torch.bool)])
def test_positions_as_slice_or_bool_mask(model, tokens, positions):
    before, after, _ = seen(model, tokens, RESID, zero_ablate(positions=positions))
    assert torch.equal(after[:, 2:4], torch.zeros_like(after[:, 2:4]))
    assert torch.equal(after[:, [0, 1, 4, 5, 6]], before[:, [0, 1, 4, 5, 6]])


def test_zero_ablate_changes_logits_only_downstream(model, tokens):
    with torch.no_grad():
        clean = model(tokens).logits
    _, _, logits = seen(model, tokens, RESID, zero_ablate(positions=[5]))
    # Causal attention: positions before 5 cannot see the ablation.
    assert torch.equal(logits[:, :5], clean[:, :5])
    assert not torch.allclose(logits[:, 5:], clean[:, 5:])


def test_heads_on_stream_without_heads_axis_names_the_hook(model, tokens):
    with pytest.raises(ValueError, match=r"blocks\.1\.hook_resid_pre.*no n_heads axis"):
        seen(model, tokens, RESID, zero_ablate(heads=[0]))


def test_out_of_range_selection_errors(model, tokens):
    with pytest.raises(IndexError, match=r"hook_z.*heads \[4\]"):
        seen(model, tokens, Z, zero_ablate(heads=[4]))
    with pytest.raises(IndexError, match=r"positions \[7\].*KV-cache"):
        seen(model, tokens, RESID, zero_ablate(positions=[7]))


def test_mean_ablate_with_a_tensor(model, tokens):
    mean = torch.arange(CFG.hidden_size, dtype=torch.float32)
    before, after, _ = seen(model, tokens, RESID, mean_ablate(mean, positions=[1]))
    assert torch.equal(after[:, 1], mean.expand(3, -1))
    assert torch.equal(after[:, [0, 2]], before[:, [0, 2]])


@pytest.mark.parametrize("over", ["batch", "batch pos"])
def test_mean_ablate_from_a_cache(model, tokens, over):
    ref = torch.randint(0, CFG.vocab_size, (5, 7), generator=torch.Generator().manual_seed(2))
    cache = {}
    with torch.no_grad():
        model.run_with_hooks(ref, fwd_hooks=[(Z, record(cache))])
    before, after, _ = seen(model, tokens, Z, mean_ablate(cache, heads=[2], average_over=over))
    dims = (0,) if over == "batch" else (0, 1)
    mean = cache[Z].mean(dim=dims, keepdim=True)[:, :, 2].expand(3, 7, -1)
    torch.testing.assert_close(after[:, :, 2], mean, rtol=0, atol=1e-7)
    assert torch.equal(after[:, :, [0, 1, 3]], before[:, :, [0, 1, 3]])


def test_resample_ablate_draws_rows_of_the_source(model, tokens):
    source = torch.randn(4, 7, CFG.num_attention_heads, CFG.head_dim)
    fn = resample_ablate(source, heads=[1], generator=torch.Generator().manual_seed(0))
    before, after, _ = seen(model, tokens, Z, fn)
    rows = torch.randint(4, (3,), generator=torch.Generator().manual_seed(0))
    assert torch.equal(after[:, :, 1], source[rows][:, :, 1])
    assert torch.equal(after[:, :, [0, 2, 3]], before[:, :, [0, 2, 3]])


def test_resample_ablate_shape_mismatch(model, tokens):
    with pytest.raises(ValueError, match=r"resample_ablate.*hook_z"):
        seen(model, tokens, Z, resample_ablate(torch.zeros(4, 6, 4, 8)))


def test_patch_from_cache_restores_the_clean_run(model, tokens):
    corrupted = tokens.flip(0)
    cache = {}
    with torch.no_grad():
        clean = model.run_with_hooks(tokens, fwd_hooks=[(RESID, record(cache))]).logits
    _, _, logits = seen(model, corrupted, RESID, patch_from_cache(cache))
    # Everything downstream of resid_pre 1 is a function of it alone.
    assert torch.equal(logits, clean)


def test_patch_from_cache_selection_and_batch_one_broadcast(model, tokens):
    cache = {Z: torch.randn(1, 7, 4, 8)}
    before, after, _ = seen(model, tokens, Z, patch_from_cache(cache, heads=0, positions=-1))
    expected = before.clone()
    expected[:, -1, 0] = cache[Z][0, -1, 0]
    assert torch.equal(after, expected)


def test_patch_from_cache_errors_name_the_hook(model, tokens):
    with pytest.raises(KeyError, match=r"hook_z"):
        seen(model, tokens, Z, patch_from_cache({RESID: torch.zeros(3, 7, 32)}))
    with pytest.raises(ValueError, match=r"hook_z.*\(3, 7, 4, 8\)"):
        seen(model, tokens, Z, patch_from_cache({Z: torch.zeros(2, 7, 4, 8)}))


def test_add_vector(model, tokens):
    vec = torch.randn(CFG.hidden_size)
    before, after, _ = seen(model, tokens, RESID, add_vector(vec, scale=2.5, positions=[0, 3]))
    expected = before.clone()
    expected[:, [0, 3]] += 2.5 * vec
    assert torch.equal(after, expected)
    before, after, _ = seen(model, tokens, RESID, add_vector(vec))
    assert torch.equal(after, before + vec)


def test_add_vector_bad_shape(model, tokens):
    with pytest.raises(ValueError, match=r"add_vector.*hook_resid_pre"):
        seen(model, tokens, RESID, add_vector(torch.zeros(5)))


def test_clamp(model, tokens):
    before, after, _ = seen(model, tokens, Z, clamp(min=-0.01, max=0.01, heads=[2]))
    assert torch.equal(after[:, :, 2], before[:, :, 2].clamp(-0.01, 0.01))
    assert torch.equal(after[:, :, [0, 1, 3]], before[:, :, [0, 1, 3]])
    _, after, _ = seen(model, tokens, RESID, clamp(max=0.0))
    assert float(after.max()) <= 0.0
    with pytest.raises(ValueError, match="min, max"):
        clamp()


def test_record_changes_nothing_and_copies(model, tokens):
    store = {}
    with torch.no_grad():
        plain = model(tokens).logits
    with model.hooks(fwd_hooks=[(lambda n: n.endswith("hook_resid_post"), record(store))]):
        logits = model(tokens).logits
    assert torch.equal(logits, plain)
    assert sorted(store) == ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
    assert not store["blocks.0.hook_resid_post"].requires_grad


def test_selection_mask_none_means_everything(model, tokens):
    hp = model.hook_dict[Z]
    assert selection_mask(torch.zeros(3, 7, 4, 8), hp) is None
    assert selection_mask(torch.zeros(3, 7, 4, 8), hp, heads=[1]).shape == (1, 1, 4, 1)


def test_hooks_during_kv_cache_decoding(model, tokens):
    """Step-by-step decoding (what generate does) with a steering vector on every position and a
    recorder: matches one full forward, and the recorder sees the 1-position decode calls."""
    vec = torch.randn(CFG.hidden_size)
    steer = [("blocks.0.hook_resid_post", add_vector(vec, scale=3.0))]
    with torch.no_grad():
        full = model.run_with_hooks(tokens, fwd_hooks=steer).logits
        calls = {}
        with model.hooks(fwd_hooks=steer + [("blocks.0.hook_resid_post", record(calls, append=True))]):
            out = model(tokens[:, :4], use_cache=True)
            steps = [out.logits]
            for i in range(4, 7):
                out = model(tokens[:, i:i + 1], past_key_values=out.past_key_values, use_cache=True)
                steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-5, atol=1e-5)
    assert [t.shape[1] for t in calls["blocks.0.hook_resid_post"]] == [4, 1, 1, 1]


def test_interventions_keep_gradients(model, tokens):
    fn = clamp(min=-1.0, max=1.0, heads=[0])
    steer = add_vector(torch.ones(32), positions=[1])
    out = model.run_with_hooks(tokens, fwd_hooks=[(Z, fn), (RESID, steer)])
    out.logits.sum().backward()
    assert model.unembed.weight.grad is not None
    model.zero_grad(set_to_none=True)


def test_steering_during_generate_matches_a_full_forward_loop(model, tokens):
    """generate decodes with a KV cache (1-position decode calls); a steering hook on every position
    must give the tokens that greedy decoding with full forwards gives under the same hook."""
    steer = [("blocks.1.hook_resid_pre", add_vector(torch.randn(CFG.hidden_size), scale=4.0))]
    with torch.no_grad(), model.hooks(fwd_hooks=steer):
        generated = model.generate(tokens, max_new_tokens=4, eos_token_id=None)
        plain_loop = tokens
        for _ in range(4):
            next_token = model(plain_loop).logits[:, -1].argmax(-1, keepdim=True)
            plain_loop = torch.cat([plain_loop, next_token], 1)
    assert torch.equal(generated, plain_loop)
    with torch.no_grad():
        unsteered = model.generate(tokens, max_new_tokens=4, eos_token_id=None)
    assert not torch.equal(unsteered, generated)


def test_patch_and_mean_from_an_activation_cache(model, tokens):
    logits, cache = model.run_with_cache(tokens, names_filter=[RESID, Z])
    with torch.no_grad():
        patched = model.run_with_hooks(tokens.flip(0), fwd_hooks=[(RESID, patch_from_cache(cache))]).logits
    assert torch.equal(patched, logits)
    _, after, _ = seen(model, tokens.flip(0), Z, mean_ablate(cache, heads=[0]))
    torch.testing.assert_close(after[:, :, 0], cache[Z][:, :, 0].mean(0, keepdim=True).expand(3, -1, -1))
