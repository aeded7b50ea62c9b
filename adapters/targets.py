"""Per-architecture module names, as data.

This is the only file that knows HuggingFace module names. A method asks for *roles* ("query",
"attn_out", the "ffn" block, ...) and gets back the concrete modules of every selected layer.
Supporting a new architecture is one more :class:`ArchSpec` entry (or a call to
:func:`register_architecture`), not a code path in any method.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Iterable

from torch import nn

from .errors import TargetError


@dataclasses.dataclass(frozen=True)
class ArchSpec:
    """Where things are inside one transformer family.

    layers:     path of the ``ModuleList`` of transformer blocks.
    roles:      role -> module path *inside one block*; the module's input and output are used.
    blocks:     role -> (input module, output module) inside one block, for methods that read a
                sub-layer's input and add to its output projection (parallel adapters).
    attention:  path of the module whose forward calls transformers' attention interface (prefix
                tuning hooks in there), or None where the architecture has none.
    pooling:    how a classification head pools tokens: "mean" (encoders) or "last" (decoders).
    kind:       "encoder" or "decoder": a decoder is loaded with its language-model head, so its
                tasks can also be generative (text in, text out).
    """

    layers: str
    roles: dict[str, str]
    blocks: dict[str, tuple[str, str]]
    attention: str | None
    pooling: str = "mean"
    kind: str = "encoder"


_BERT = ArchSpec(
    layers="encoder.layer",
    roles={
        "query": "attention.self.query",
        "key": "attention.self.key",
        "value": "attention.self.value",
        "attn_out": "attention.output.dense",
        "ffn_up": "intermediate.dense",
        "ffn_out": "output.dense",
        "attn_norm": "attention.output.LayerNorm",
        "ffn_norm": "output.LayerNorm",
    },
    blocks={"attn": ("attention", "attention.output.dense"), "ffn": ("intermediate", "output.dense")},
    attention="attention.self",
)

_MPNET = ArchSpec(
    layers="encoder.layer",
    roles={
        "query": "attention.attn.q",
        "key": "attention.attn.k",
        "value": "attention.attn.v",
        "attn_out": "attention.attn.o",
        "ffn_up": "intermediate.dense",
        "ffn_out": "output.dense",
        "attn_norm": "attention.LayerNorm",
        "ffn_norm": "output.LayerNorm",
    },
    blocks={"attn": ("attention", "attention.attn.o"), "ffn": ("intermediate", "output.dense")},
    attention=None,  # MPNet computes attention inline (relative position bias), no interface
)

_LLAMA = ArchSpec(
    layers="layers",
    roles={
        "query": "self_attn.q_proj",
        "key": "self_attn.k_proj",
        "value": "self_attn.v_proj",
        "attn_out": "self_attn.o_proj",
        "ffn_gate": "mlp.gate_proj",
        "ffn_up": "mlp.up_proj",
        "ffn_out": "mlp.down_proj",
        "attn_norm": "input_layernorm",
        "ffn_norm": "post_attention_layernorm",
    },
    blocks={"attn": ("self_attn", "self_attn.o_proj"), "ffn": ("mlp", "mlp")},
    attention="self_attn",
    pooling="last",
    kind="decoder",
)

ARCHITECTURES: dict[str, ArchSpec] = {
    "bert": _BERT,
    "roberta": _BERT,
    "mpnet": _MPNET,
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "qwen3": _LLAMA,
    "gemma": _LLAMA,
    "gemma2": _LLAMA,
}


def register_architecture(model_type: str, spec: ArchSpec) -> None:
    """Teach the library a new ``config.model_type``."""
    ARCHITECTURES[model_type] = spec


def arch_spec(model: nn.Module) -> ArchSpec:
    """The spec of a HF model, by ``model.config.model_type``; for an architecture not listed
    here, one inferred from the module tree (:func:`infer_spec`), which has no roles: methods then
    need the user to name target modules (``lora:targets=c_attn``)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in ARCHITECTURES:
        return ARCHITECTURES[model_type]
    return infer_spec(model)


def infer_spec(model: nn.Module) -> ArchSpec:
    """A role-less spec for an unknown architecture: its blocks are the longest ``ModuleList``
    whose items are all of one class; decoders (``is_decoder`` or a ``*CausalLM`` architecture)
    pool the last token."""
    best = ""
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 0 and len({type(m) for m in mod}) == 1:
            if not best or len(mod) > len(model.get_submodule(best)):
                best = name
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if not best:
        raise TargetError(
            f"unknown architecture {model_type!r} with no list of transformer blocks; supported: "
            f"{', '.join(sorted(ARCHITECTURES))}. Add one with adapters.targets.register_architecture(model_type, ArchSpec(...))."
        )
    decoder = is_decoder_config(getattr(model, "config", None))
    return ArchSpec(layers=best, roles={}, blocks={}, attention=None, pooling="last" if decoder else "mean",
                    kind="decoder" if decoder else "encoder")


def is_decoder_config(config: object) -> bool:
    """Whether a HF config describes a decoder-only language model: listed here as one, marked
    ``is_decoder`` or ``*CausalLM``, or a type transformers has a causal-LM class for and no
    masked-LM class (GPT-2 yes; BERT, which has both, no)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_FOR_MASKED_LM_MAPPING_NAMES

    model_type = getattr(config, "model_type", None)
    if model_type in ARCHITECTURES:
        return ARCHITECTURES[model_type].kind == "decoder"
    if getattr(config, "is_decoder", False) or any("CausalLM" in a for a in (getattr(config, "architectures", None) or [])):
        return True
    return model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES


def linear_dims(module: nn.Module) -> tuple[int, int] | None:
    """(in, out) features of a linear map: ``nn.Linear``, or GPT-2's ``Conv1D`` (weight stored
    transposed, ``nf`` outputs); None for anything else."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    weight, nf = getattr(module, "weight", None), getattr(module, "nf", None)
    if isinstance(nf, int) and getattr(weight, "ndim", 0) == 2 and weight.shape[1] == nf:
        return int(weight.shape[0]), nf
    return None


def linear_names(block: nn.Module) -> list[str]:
    """Paths inside a block of the modules holding a 2-D weight (Linear, GPT-2's Conv1D): the
    names a user can give as targets."""
    return sorted(n for n, m in block.named_modules() if n and linear_dims(m) is not None)


@dataclasses.dataclass(frozen=True)
class Site:
    """One place a layer-wise delta acts: read ``input`` module's input, add to ``output``'s output.

    ``key`` is a ModuleDict-safe name ("L3_query"); ``layer`` the block index.
    """

    key: str
    layer: int
    input: str
    output: str


def layers_path(model: nn.Module, spec: ArchSpec) -> str:
    """Path of the block list, also when the model wraps a base model (``model.bert.encoder...``)."""
    candidates = [spec.layers]
    prefix = getattr(model, "base_model_prefix", "")
    if prefix:
        candidates.append(f"{prefix}.{spec.layers}")
    for path in candidates:
        try:
            mod = model.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(mod, nn.ModuleList):
            return path
    raise TargetError(f"no block list at {candidates} in {type(model).__name__}")


def num_layers(model: nn.Module) -> int:
    return len(model.get_submodule(layers_path(model, arch_spec(model))))


def select_layers(model: nn.Module, layers: Iterable[int] | None, skip_first: int = 0) -> list[int]:
    """Block indices to use: all (or ``layers``), minus the first ``skip_first`` (AdapterDrop)."""
    n = num_layers(model)
    chosen = list(range(n)) if layers is None else sorted({i % n if i < 0 else i for i in layers})
    bad = [i for i in chosen if not 0 <= i < n]
    if bad:
        raise TargetError(f"layer indices {bad} out of range: the backbone has {n} layers")
    return [i for i in chosen if i >= skip_first]


def resolve_sites(
    model: nn.Module, targets: Iterable[str], layers: Iterable[int] | None = None, skip_first: int = 0
) -> list[Site]:
    """Concrete sites for ``targets`` in the selected layers.

    A target is a role of the architecture (``"query"``), a block (``"ffn"``), or a module path
    inside a block (``"attention.self.query"``); anything else is an error listing the candidates.
    """
    spec = arch_spec(model)
    root = layers_path(model, spec)
    chosen = select_layers(model, layers, skip_first)
    block0 = model.get_submodule(f"{root}.0")
    inner = {name for name, _ in block0.named_modules() if name}
    sites: list[Site] = []
    for target in targets:
        if target in spec.blocks:
            pair = spec.blocks[target]
        elif target in spec.roles:
            pair = (spec.roles[target], spec.roles[target])
        elif target in inner:
            pair = (target, target)
        else:
            roles = f"roles {sorted(spec.roles)}, blocks {sorted(spec.blocks)}, or " if spec.roles else ""
            raise TargetError(
                f"target {target!r} matches no module of {model.config.model_type}: "
                f"{roles}a linear layer inside a block: {linear_names(block0)}"
            )
        for i in chosen:
            safe = re.sub(r"\W", "_", target)
            sites.append(Site(f"L{i}_{safe}", i, f"{root}.{i}.{pair[0]}", f"{root}.{i}.{pair[1]}"))
    if not sites:
        raise TargetError(f"targets {list(targets)} in layers {chosen} give no site (is skip_first too large?)")
    return sites


def attention_modules(model: nn.Module) -> dict[int, str]:
    """Layer index -> path of the module calling the attention interface (for prefix tuning)."""
    spec = arch_spec(model)
    if spec.attention is None:
        supported = sorted(k for k, v in ARCHITECTURES.items() if v.attention)
        raise TargetError(
            f"{model.config.model_type} computes attention without transformers' attention "
            f"interface, so prefix tuning cannot reach its keys and values; supported: {supported}"
        )
    root = layers_path(model, spec)
    return {i: f"{root}.{i}.{spec.attention}" for i in range(num_layers(model))}
