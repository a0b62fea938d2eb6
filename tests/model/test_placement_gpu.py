"""CUDA only: a model placed over two GPUs, and over one GPU plus CPU RAM plus disk (accelerate's CPU
and disk offload), against the same checkpoint loaded whole on cuda:0.

Exactness: every block runs the same kernels in fp32 (TF32 off) on a GPU of the same kind, so logits,
hook values, patching and greedy decoding must agree bit for bit (torch.equal). Placement moves
tensors between devices; it must never change a value.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from neox_lab import NeoXForCausalLM
from neox_lab.analysis.interventions import patch_from_cache
from neox_lab.analysis.patching import activation_patch, attribution_patch
from neox_lab.testing.pairs import tiny_config

pytestmark = pytest.mark.gpu
pytest.importorskip("accelerate")

CFG = tiny_config(num_hidden_layers=4, vocab_size=97)
IDS = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(0))
MASK = torch.ones_like(IDS)
MASK[1, :3] = 0  # a left-padded row


def two_gpus() -> None:
    if torch.cuda.device_count() < 2:
        pytest.skip(f"needs two CUDA devices; {torch.cuda.device_count()} visible")
    if torch.cuda.get_device_name(0) != torch.cuda.get_device_name(1):
        pytest.skip("needs two CUDA devices of the same kind (bit-for-bit comparison across GPU models "
                    "does not hold)")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(0)
    model = NeoXForCausalLM(CFG).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    path = tmp_path_factory.mktemp("ckpt")
    model.save_pretrained(path)
    return path


def device_of(model, name: str) -> str:
    """The device a hook's layer runs on, from the model's device_map (offloaded units run on the
    model's input device)."""
    if name.startswith("blocks."):
        unit = "model." + ".".join(name.split(".")[:2])
    elif name == "hook_embed":
        unit = "model.embed"
    elif name.startswith("ln_final"):
        unit = "model.ln_final"
    else:
        unit = "unembed"
    where = model.device_map[unit]
    return str(model.input_device) if where in ("cpu", "disk") else where


def check_against_whole(placed, ref):
    ids, mask = IDS.to(ref.input_device), MASK.to(ref.input_device)
    with torch.no_grad():
        assert torch.equal(placed(ids, attention_mask=mask).logits.to(ref.input_device),
                           ref(ids, attention_mask=mask).logits)

    seen = {}

    def where(x, *, hook):
        seen[hook.name] = str(x.device)

    with torch.no_grad():
        placed.run_with_hooks(ids, attention_mask=mask, fwd_hooks=[(lambda n: True, where)])
    assert seen == {name: device_of(placed, name) for name in placed.hook_names()}

    ref_logits, ref_cache = ref.run_with_cache(ids, attention_mask=mask)
    logits, cache = placed.run_with_cache(ids, attention_mask=mask, device="cpu")
    for name in ref_cache.keys():
        assert cache[name].device.type == "cpu" and torch.equal(cache[name], ref_cache[name].cpu()), name

    # A clean cache gathered on the CPU patched into a run whose layers sit elsewhere.
    corrupted = torch.flip(ids, dims=[1])
    name = "blocks.3.hook_resid_pre"
    with torch.no_grad():
        got = placed.run_with_hooks(corrupted, fwd_hooks=[(name, patch_from_cache(cache))]).logits
        want = ref.run_with_hooks(corrupted, fwd_hooks=[(name, patch_from_cache(ref_cache))]).logits
    assert torch.equal(got.to(want.device), want)

    def metric(logits):
        return logits[:, -1].log_softmax(-1)[:, 0]

    for target in ("resid_pre", "z"):
        assert torch.equal(activation_patch(placed, ids, corrupted, metric, target=target).values,
                           activation_patch(ref, ids, corrupted, metric, target=target).values)
    assert torch.equal(attribution_patch(placed, ids, corrupted, metric).values,
                       attribution_patch(ref, ids, corrupted, metric).values)

    kw = dict(attention_mask=mask, max_new_tokens=4, eos_token_id=None)
    assert torch.equal(placed.generate(ids, **kw), ref.generate(ids, **kw))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert torch.equal(placed.generate(ids, compile=True, **kw), ref.generate(ids, **kw))
    assert any("placed across devices" in str(w.message) for w in caught)


def test_two_gpus(checkpoint):
    two_gpus()
    ref = NeoXForCausalLM.from_pretrained(checkpoint, device="cuda:0", attn_backend="sdpa")
    device_map = {"model.embed": 0, "model.blocks.0": 0, "model.blocks.1": 0, "model.blocks.2": 1,
                  "model.blocks.3": 1, "model.ln_final": 1, "unembed": 1}
    placed = NeoXForCausalLM.from_pretrained(checkpoint, device_map=device_map, attn_backend="sdpa")
    assert placed.model.blocks[3].attn.qkv.weight.device == torch.device("cuda:1")
    # The per-layer eager fallback (scores requested on the sdpa backend) on a layer of the second GPU.
    with pytest.warns(UserWarning, match="layer 3"):
        _, cache = placed.run_with_cache(IDS.to("cuda:0"), names_filter="blocks.3.attn.hook_pattern")
    assert cache["blocks.3.attn.hook_pattern"].device == torch.device("cuda:1")
    assert placed.attn_kernels()[2:] == ["sdpa", "eager (fallback)"]

    check_against_whole(placed, ref)

    # The KV cache lives beside each layer.
    with torch.no_grad():
        out = placed(IDS.to("cuda:0"), use_cache=True)
    assert [str(k.device) for k in out.past_key_values.keys] == ["cuda:0", "cuda:0", "cuda:1", "cuda:1"]

    planned = NeoXForCausalLM.from_pretrained(checkpoint, device_map="balanced")
    assert {"cuda:0", "cuda:1"} <= set(planned.device_map.values())


def test_gpu_with_cpu_and_disk_offload(checkpoint):
    ref = NeoXForCausalLM.from_pretrained(checkpoint, device="cuda:0", attn_backend="eager")
    device_map = {"model.embed": "cpu", "model.blocks.0": 0, "model.blocks.1": "cpu", "model.blocks.2": "disk",
                  "model.blocks.3": 0, "model.ln_final": 0, "unembed": "cpu"}
    placed = NeoXForCausalLM.from_pretrained(checkpoint, device_map=device_map, attn_backend="eager")
    assert placed.input_device == torch.device("cuda:0")
    # CPU-offloaded weights are on "meta" between forwards, kept in RAM by accelerate's hooks.
    assert placed.model.blocks[1].attn.qkv.weight.is_meta and placed.model.blocks[2].attn.qkv.weight.is_meta
    check_against_whole(placed, ref)
