"""Shared fixtures: tiny random-init backbones of each supported family (fast, offline)."""

from __future__ import annotations

import pytest
import torch
from transformers import BertConfig, BertModel, LlamaConfig, LlamaModel, MPNetConfig, MPNetModel

import adapters

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=120)


def tiny_backbone(arch: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if arch == "bert":
        model = BertModel(BertConfig(**TINY, max_position_embeddings=256), add_pooling_layer=False)
    elif arch == "mpnet":
        model = MPNetModel(MPNetConfig(**TINY, max_position_embeddings=256))
    elif arch == "llama":
        model = LlamaModel(LlamaConfig(**TINY, num_key_value_heads=2, max_position_embeddings=256))
    else:
        raise ValueError(arch)
    return model.eval()


ARCHS = ["bert", "mpnet", "llama"]


def method_config(method: str) -> dict:
    """A small config of each registered method that every test can use."""
    small = {
        "prompt": {"num_tokens": 4},
        "prefix": {"num_tokens": 3, "hidden_dim": 16},
        "selective": {"patterns": ["attn|attention"]},
        "bottleneck": {"bottleneck_dim": 8},
        "parallel": {"bottleneck_dim": 8},
        "compacter": {"bottleneck_dim": 8},
        "lora": {"rank": 4},
    }
    return {"method": method, **small.get(method, {})}


def supports(method: str, arch: str) -> bool:
    """Combinations the library refuses by design (with a clear error, tested separately)."""
    return not (method == "prefix" and adapters.ARCHITECTURES[arch].attention is None)


def batch(vocab: int = 120, b: int = 3, t: int = 9, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (b, t), generator=g)
    mask = torch.ones(b, t, dtype=torch.long)
    mask[1, 6:] = 0  # one padded row, so masks are exercised
    return {"input_ids": ids, "attention_mask": mask}


@pytest.fixture(params=ARCHS)
def arch(request) -> str:
    return request.param


@pytest.fixture
def tiny_model(arch) -> adapters.DeltaModel:
    return adapters.DeltaModel(tiny_backbone(arch))
