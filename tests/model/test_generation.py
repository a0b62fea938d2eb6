"""generate(): token-for-token equality with transformers, cached steps against full forwards, sampling,
eos handling, hooks at every step, return_cache, the `generate` CLI command and input errors."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from neox_lab import NeoXConfig, NeoXForCausalLM, default_model
from neox_lab.model.generation import filter_logits
from neox_lab.tokenizer import NeoXTokenizer

transformers = pytest.importorskip("transformers")

# initializer_range=0.2 gives logits of magnitude ~1 (0.02 gives ~0.1 and near-constant greedy output).
CFG = NeoXConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                 intermediate_size=64, rotary_pct=0.5, max_position_embeddings=64, initializer_range=0.2)
# Cached-step logits vs a full forward, fp32: only the reduction order differs (one query row vs many,
# keys read from the cache). Logits reach |4|; fp32 eps 1.2e-7 * 4 * ~20 accumulated roundings ~ 1e-5.
# Measured: <= 2.2e-6 on these models (eager and sdpa, parallel and sequential blocks).
LOGIT_ATOL = 1e-5
N_NEW = 8


def _pair(tmp_path_factory, **changes):
    cfg = CFG.replace(**changes)
    torch.manual_seed(0)
    hf_cfg = transformers.GPTNeoXConfig(**cfg.to_hf(), attn_implementation="eager")
    hf = transformers.GPTNeoXForCausalLM(hf_cfg)
    path = tmp_path_factory.mktemp("ckpt")
    hf.save_pretrained(path)
    return hf.eval(), NeoXForCausalLM.from_pretrained(path)


@pytest.fixture(scope="module", params=[True, False], ids=["parallel", "sequential"])
def pair(request, tmp_path_factory):
    return _pair(tmp_path_factory, use_parallel_residual=request.param)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return _pair(tmp_path_factory)[1]


@pytest.fixture(scope="module")
def text_model():
    """A tiny model over the real GPT-NeoX vocabulary, with the bundled tokenizer attached."""
    cfg = CFG.replace(vocab_size=50304, hidden_size=16, num_attention_heads=2, intermediate_size=32)
    torch.manual_seed(0)
    m = NeoXForCausalLM(cfg).eval()
    m.tokenizer = NeoXTokenizer.default()
    return m


def left_padded(seed: int, lengths: list[int], pad: int = 0):
    """Random ids [batch max(lengths)] (no eos=2 inside) left-padded with `pad`, and the mask."""
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.randint(3, CFG.vocab_size, (len(lengths), width), generator=g)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        mask[row, width - n:] = 1
    return ids.masked_fill(mask == 0, pad), mask


def hf_generate(hf, ids, mask, **kw):
    kw.setdefault("pad_token_id", 0)
    with torch.no_grad():
        return hf.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=N_NEW, **kw)


prompts = st.tuples(st.integers(0, 2**16), st.lists(st.integers(1, 7), min_size=1, max_size=4))


# ------------------------------------------------------------------------------------- against transformers
def test_greedy_matches_hf_single_prompt(pair):
    hf, ours = pair
    ids, mask = left_padded(1, [6])
    want = hf_generate(hf, ids, mask, max_length=None)
    assert torch.equal(ours.generate(ids, max_new_tokens=N_NEW, pad_token_id=0), want)
    assert torch.equal(ours.generate(ids[0], max_length=6 + N_NEW, pad_token_id=0), want)  # [pos] accepted


@given(prompts)
def test_greedy_matches_hf_left_padded_batches(pair, prompt):
    hf, ours = pair
    ids, mask = left_padded(prompt[0], prompt[1])
    got = ours.generate(ids, attention_mask=mask, max_new_tokens=N_NEW, pad_token_id=0)
    assert torch.equal(got, hf_generate(hf, ids, mask))


def test_eos_matches_hf_and_stops_rows_independently(pair):
    hf, ours = pair
    ids, mask = left_padded(3, [5, 3, 7])
    free = ours.generate(ids, attention_mask=mask, max_new_tokens=N_NEW, eos_token_id=None)
    new = free[:, 7:]
    eos = int(new[0, 2])  # row 0 emits it at step 2; pick a row that never emits it to keep running
    others = [r for r in (1, 2) if eos not in new[r].tolist()]
    assert others, "degenerate draw: every row emits the chosen eos"
    got = ours.generate(ids, attention_mask=mask, max_new_tokens=N_NEW, eos_token_id=eos, pad_token_id=1)
    assert torch.equal(got, hf_generate(hf, ids, mask, eos_token_id=eos, pad_token_id=1))
    first = new[0].tolist().index(eos)
    assert got[0, 7 + first] == eos and (got[0, 8 + first:] == 1).all()
    for r in others:
        assert torch.equal(got[r], free[r, : got.shape[1]])


def test_stops_early_when_all_rows_finish(model):
    ids, mask = left_padded(4, [4, 2])
    free = model.generate(ids, attention_mask=mask, max_new_tokens=N_NEW, eos_token_id=None)
    eos = [int(free[0, 4]), int(free[1, 4])]  # each row's first new token
    out = model.generate(ids, attention_mask=mask, max_new_tokens=N_NEW, eos_token_id=eos)
    assert out.shape == (2, 5) and torch.equal(out, free[:, :5])


# ------------------------------------------------------------------------------------ KV cache consistency
@given(prompts)
def test_cached_step_logits_equal_full_forward(model, prompt):
    ids, mask = left_padded(prompt[0], prompt[1])
    steps = []
    with model.hooks([("hook_logits", lambda t, hook: steps.append(t[:, -1].clone()))]):
        out = model.generate(ids, attention_mask=mask, max_new_tokens=N_NEW, eos_token_id=None)
    assert len(steps) == N_NEW
    full_mask = torch.cat([mask, torch.ones(len(ids), N_NEW, dtype=mask.dtype)], 1)
    with torch.no_grad():
        for i, step in enumerate(steps):
            n = ids.shape[1] + i
            full = model(out[:, :n], attention_mask=full_mask[:, :n]).logits[:, -1]
            torch.testing.assert_close(step, full, atol=LOGIT_ATOL, rtol=0)


def test_use_cache_false_equals_use_cache_true(model):
    ids, mask = left_padded(5, [3, 7, 1])
    cached = model.generate(ids, attention_mask=mask, max_new_tokens=N_NEW, eos_token_id=None)
    plain = model.generate(ids, attention_mask=mask, max_new_tokens=N_NEW, eos_token_id=None, use_cache=False)
    assert torch.equal(cached, plain)


# -------------------------------------------------------------------------------------------------- sampling
def test_top_k_1_sampling_equals_greedy(model):
    ids, mask = left_padded(6, [5, 2])
    greedy = model.generate(ids, attention_mask=mask, max_new_tokens=N_NEW)
    sampled = model.generate(ids, attention_mask=mask, max_new_tokens=N_NEW, do_sample=True, top_k=1,
                             temperature=0.7, generator=torch.Generator().manual_seed(0))
    assert torch.equal(sampled, greedy)


def test_sampling_is_deterministic_per_seed_and_varies_with_it(model):
    ids, mask = left_padded(7, [4, 6])

    def draw(seed, **kw):
        return model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=True, eos_token_id=None,
                              generator=torch.Generator().manual_seed(seed), **kw)

    assert torch.equal(draw(0), draw(0))
    filtered = dict(top_k=5, top_p=0.9, temperature=1.5)
    assert torch.equal(draw(3, **filtered), draw(3, **filtered))
    assert len({tuple(draw(seed).flatten().tolist()) for seed in range(4)}) > 1


@given(st.integers(0, 2**16), st.floats(0.1, 3.0), st.one_of(st.none(), st.integers(1, 120)),
       st.one_of(st.none(), st.floats(0.01, 1.0)))
def test_filter_logits_matches_hf_warpers(seed, temperature, top_k, top_p):
    from transformers.generation.logits_process import (
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    logits = torch.randn(3, 97, generator=torch.Generator().manual_seed(seed)) * 3
    want = TemperatureLogitsWarper(temperature)(None, logits)
    if top_k is not None:
        want = TopKLogitsWarper(top_k)(None, want)
    if top_p is not None and top_p < 1.0:
        want = TopPLogitsWarper(top_p)(None, want)
    got = filter_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p)
    assert torch.equal(got, want)
    assert bool(torch.isfinite(got).any(-1).all())  # at least one token always survives


def test_top_p_keeps_the_most_likely_token():
    logits = torch.tensor([[0.0, 5.0, 1.0, -2.0]])
    assert filter_logits(logits, top_p=1e-6).isfinite().tolist() == [[False, True, False, False]]


# ----------------------------------------------------------------------------------------------------- hooks
@pytest.mark.parametrize("use_cache", [True, False])
def test_hooks_fire_every_step_with_documented_shapes(model, use_cache):
    ids, mask = left_padded(8, [5, 3])
    seen = {"resid": [], "pattern": [], "rot_k": []}
    hooks = [("blocks.1.hook_resid_post", lambda t, hook: seen["resid"].append(tuple(t.shape))),
             ("blocks.0.attn.hook_pattern", lambda t, hook: seen["pattern"].append(tuple(t.shape))),
             ("blocks.0.attn.hook_rot_k", lambda t, hook: seen["rot_k"].append(tuple(t.shape)))]
    with model.hooks(hooks):
        model.generate(ids, attention_mask=mask, max_new_tokens=4, eos_token_id=None, use_cache=use_cache)
    d, h = CFG.hidden_size, CFG.num_attention_heads
    q = [1 if use_cache and i else 5 + i for i in range(4)]
    assert seen["resid"] == [(2, n, d) for n in q]
    assert seen["pattern"] == [(2, h, n, 5 + i) for i, n in enumerate(q)]  # keys include cached positions
    assert seen["rot_k"] == [(2, n, h, CFG.head_dim) for n in q]  # only new keys are hooked


def test_hooks_can_steer_generation(model):
    ids, _ = left_padded(9, [4])

    def force_token_5(logits, hook):
        logits[:, -1] = 0
        logits[:, -1, 5] = 1

    with model.hooks([("hook_logits", force_token_5)]):
        out = model.generate(ids, max_new_tokens=3, eos_token_id=None)
    assert out[0, 4:].tolist() == [5, 5, 5]


# ----------------------------------------------------------------------------------------------- return_cache
def test_return_cache_covers_the_whole_sequence(model):
    ids, mask = left_padded(10, [6, 3])
    name = "blocks.1.hook_resid_post"
    steps = []
    with model.hooks([(name, lambda t, hook: steps.append(t.clone()))]):
        out = model.generate(ids, attention_mask=mask, max_new_tokens=5, eos_token_id=None)
    ids2, cache = model.generate(ids, attention_mask=mask, max_new_tokens=5, eos_token_id=None,
                                 return_cache=True, names_filter=[name, "hook_logits"])
    assert torch.equal(ids2, out)
    assert set(cache.keys()) == {name, "hook_logits"}
    assert cache[name].shape == (2, 11, CFG.hidden_size)
    # The incremental passes saw positions 0..9 (the last token is never fed back); on real tokens they agree.
    incremental = torch.cat(steps, dim=1)
    real = torch.cat([mask, torch.ones(2, 4, dtype=mask.dtype)], 1).bool()
    torch.testing.assert_close(cache[name][:, :10][real], incremental[real], atol=LOGIT_ATOL, rtol=0)
    _, all_hooks = model.generate(ids, attention_mask=mask, max_new_tokens=2, return_cache=True)
    # as run_with_cache(): every hook but the opt-in per-head attn.hook_result
    assert len(list(all_hooks.keys())) == len([n for n in model.hook_names() if not n.endswith("hook_result")])
    with pytest.raises(KeyError, match="no_such_hook"):
        model.generate(ids, max_new_tokens=2, return_cache=True, names_filter="no_such_hook")


# -------------------------------------------------------------------------------------------------- prompts
def test_prompt_strings_are_left_padded_with_the_tokenizer(text_model):
    tok = text_model.tokenizer
    texts = ["Hello world, this is", "A"]
    enc = tok(texts, padding=True, padding_side="left", return_tensors="pt")
    want = text_model.generate(enc.input_ids, attention_mask=enc.attention_mask, max_new_tokens=4)
    assert torch.equal(text_model.generate(prompt=texts, max_new_tokens=4), want)
    single = text_model.generate(prompt="A", max_new_tokens=4)
    assert torch.equal(single, text_model.generate(torch.tensor([tok.encode("A")]), max_new_tokens=4))


def test_prompt_without_tokenizer_says_how_to_attach_one(model):
    with pytest.raises(RuntimeError, match=r"model.tokenizer = NeoXTokenizer.default\(\)"):
        model.generate(prompt="hi", max_new_tokens=2)


# ------------------------------------------------------------------------------------------------ bad input
BAD = [
    (dict(input_ids=torch.zeros(1, 0, dtype=torch.long), max_new_tokens=2), "empty prompt"),
    (dict(input_ids=torch.zeros(0, 3, dtype=torch.long), max_new_tokens=2), "empty prompt"),
    (dict(input_ids=[[3, 4]], attention_mask=[[0, 0]], max_new_tokens=2), r"row\(s\) \[0\].*all padding"),
    (dict(input_ids=[[3, 4, 5]], max_length=3), "must exceed its length 3"),
    (dict(input_ids=[[3, 4, 5]], max_length=2), "must exceed its length 3"),
    (dict(input_ids=[[3, 4, 5]]), "pass max_new_tokens"),
    (dict(input_ids=[[3, 4]], max_new_tokens=0), "max_new_tokens must be an int >= 1"),
    (dict(input_ids=[[3, 97]], max_new_tokens=2), r"token id 97, outside the model's vocabulary \[0, 97\)"),
    (dict(input_ids=[[-1, 4]], max_new_tokens=2), "token id -1"),
    (dict(input_ids=[[3.0, 4.0]], max_new_tokens=2), "integer token ids"),
    (dict(input_ids=[[3, 4]], max_new_tokens=2, do_sample=True, temperature=0.0), "temperature must be"),
    (dict(input_ids=[[3, 4]], max_new_tokens=2, do_sample=True, temperature=-1.0), "temperature must be"),
    (dict(input_ids=[[3, 4]], max_new_tokens=2, top_p=0.0), r"top_p must be None \(off\) or in \(0, 1\]"),
    (dict(input_ids=[[3, 4]], max_new_tokens=2, top_p=1.5), "top_p must be"),
    (dict(input_ids=[[3, 4]], max_new_tokens=2, top_k=0), "top_k must be"),
    (dict(input_ids=[[3, 4]], max_new_tokens=2, eos_token_id=97), "eos_token_id 97"),
    (dict(input_ids=[[3, 4]], max_new_tokens=2, pad_token_id=-3), "pad_token_id -3"),
    (dict(input_ids=[[3, 4]], attention_mask=[[1, 0]], max_new_tokens=2), "left padding"),
    (dict(input_ids=[[3, 4]], attention_mask=[[1, 1, 1]], max_new_tokens=2), "must match input_ids"),
    (dict(input_ids=[[3, 4]], attention_mask=[[2, 1]], max_new_tokens=2), "only 0"),
    (dict(max_new_tokens=2), "exactly one of input_ids and prompt"),
    (dict(input_ids=[[3, 4]], max_new_tokens=2, names_filter="hook_logits"), "return_cache=True"),
]


@pytest.mark.parametrize("kwargs, match", BAD, ids=[m for _, m in BAD])
def test_bad_input_raises_clear_value_errors(model, kwargs, match):
    with pytest.raises(ValueError, match=match):
        model.generate(**kwargs)


@pytest.mark.parametrize("prompt", ["", ["Hello", ""], []])
def test_empty_text_prompts_are_refused(text_model, prompt):
    with pytest.raises(ValueError, match="empty|non-empty"):
        text_model.generate(prompt=prompt, max_new_tokens=2)


def test_max_new_tokens_wins_over_max_length_with_a_warning(model):
    with pytest.warns(UserWarning, match="max_new_tokens wins"):
        out = model.generate([[3, 4]], max_new_tokens=3, max_length=10, eos_token_id=None)
    assert out.shape == (1, 5)


# ------------------------------------------------------------------------------------------------------ CLI
@pytest.fixture()
def cli(monkeypatch):
    from neox_lab import cli as cli_module

    # Only this command: the other subcommands' modules are not this test's concern.
    monkeypatch.setattr(cli_module, "COMMANDS", {"generate": cli_module.COMMANDS["generate"]})
    return cli_module.main


@pytest.fixture(scope="module")
def text_ckpt(text_model, tmp_path_factory):
    path = tmp_path_factory.mktemp("text_ckpt")
    text_model.save_pretrained(path)
    return path


def test_cli_greedy_prints_prompt_and_completion(cli, text_model, text_ckpt, capsys):
    argv = ["generate", "--model", str(text_ckpt), "--greedy", "--max-new-tokens", "5", "Hello world"]
    assert cli(argv) == 0
    ids = text_model.generate(prompt="Hello world", max_new_tokens=5)
    want = "Hello world" + text_model.tokenizer.decode(ids[0, 2:], skip_special_tokens=True)
    assert capsys.readouterr().out == want + "\n"


def test_cli_sampling_is_reproducible_with_a_seed(cli, text_ckpt, capsys):
    argv = ["generate", "--model", str(text_ckpt), "--seed", "3", "--temperature", "2", "--top-k", "50",
            "--top-p", "0.9", "--max-new-tokens", "6", "--completion-only", "One", "Two three"]
    assert cli(argv) == 0
    first = capsys.readouterr().out
    assert cli(argv) == 0
    assert capsys.readouterr().out == first and len(first.splitlines()) == 2


def test_cli_errors(cli, text_ckpt, tmp_path, capsys, monkeypatch):
    assert cli(["generate", "--model", str(text_ckpt), "--greedy", "--temperature", "2", "x"]) == 2
    assert "--greedy" in capsys.readouterr().err
    from neox_lab.model import shipped

    monkeypatch.setattr(shipped, "package_model_dir", lambda: tmp_path / "no-default-here")
    assert cli(["generate", "x"]) == 2
    assert "default model's package data is missing" in capsys.readouterr().err
    assert cli(["generate", "--model", str(tmp_path / "nowhere"), "x"]) == 2
    assert "no checkpoint" in capsys.readouterr().err


def test_cli_uses_the_default_model_when_there_is_one(cli, text_model, capsys, monkeypatch):
    monkeypatch.setattr(default_model, "load_default", lambda **kw: text_model)
    assert cli(["generate", "--greedy", "--max-new-tokens", "3", "--completion-only", "Hi"]) == 0
    ids = text_model.generate(prompt="Hi", max_new_tokens=3)
    new = ids[0, len(text_model.tokenizer.encode("Hi")):]
    assert capsys.readouterr().out == text_model.tokenizer.decode(new, skip_special_tokens=True) + "\n"
