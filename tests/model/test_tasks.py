"""The task heads' own arguments: the causal LM's logits_to_keep."""

import pytest
import torch

from neox_lab import NeoXConfig, NeoXForCausalLM

CFG = NeoXConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                 intermediate_size=64, max_position_embeddings=32)
IDS = torch.tensor([[1, 5, 9, 2, 7], [3, 3, 8, 1, 0]])


def test_logits_to_keep_unembeds_the_last_positions_only():
    torch.manual_seed(0)
    model = NeoXForCausalLM(CFG).eval()
    full = model(IDS).logits
    seen = []
    model.add_hook("hook_logits", lambda x, hook: seen.append(x.shape))
    for n in (1, 3):
        # fp32 rounding only: a matmul over fewer rows may block its sums differently.
        torch.testing.assert_close(model(IDS, logits_to_keep=n).logits, full[:, -n:], rtol=1e-5, atol=1e-6)
    assert seen == [(2, 1, CFG.vocab_size), (2, 3, CFG.vocab_size)]
    with pytest.raises(ValueError, match="labels= needs logits at every position"):
        model(IDS, labels=IDS, logits_to_keep=1)
