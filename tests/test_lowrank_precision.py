"""The low-rank term's precision (adapters.precision.lowrank_precision): fp32 when scoring on a
CPU under bf16 autocast, autocast's dtype when training, so trained values are unchanged."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import nn

from adapters.methods.lora import LoRA, LoRASite


def site() -> LoRASite:
    torch.manual_seed(0)
    s = LoRASite(16, 12, 4, 2.0, 0.0)
    nn.init.normal_(s.lora_B)
    return s


def test_lora_term_is_fp32_when_scoring_and_autocasts_dtype_when_training():
    s = site()
    x, h = torch.randn(3, 16), torch.zeros(3, 12, dtype=torch.bfloat16)
    with torch.no_grad():
        want = (x @ s.lora_A.t()) @ s.lora_B.t() * 2.0
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with torch.no_grad():
            scored = s(x, h)
        trained = s(x, h)
    assert scored.dtype == torch.float32 and torch.equal(scored, want)
    assert trained.dtype == torch.bfloat16  # the training step's products: autocast's, as before
    trained.float().sum().backward()
    assert s.lora_B.grad is not None


def test_the_gathered_mixed_batch_term_is_fp32_when_scoring():
    s = site()
    gathered = LoRA.stack_sites([s, None])
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        want = (x[0] @ s.lora_A.t()) @ s.lora_B.t() * 2.0
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = gathered(x, None, SimpleNamespace(idx=torch.tensor([0, 1])))
    assert out.dtype == torch.float32
    torch.testing.assert_close(out[0], want, atol=1e-6, rtol=1e-5)
    assert torch.equal(out[1], torch.zeros_like(out[1]))  # the absent task adds nothing
