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

    layers:     path of the ``ModuleList`` of transformer blocks; an encoder-decoder gives both
                lists, (encoder, decoder), numbered on: layer i of a 6+6 T5 is encoder block i
                for i < 6 and decoder block i - 6 after.
    roles:      role -> module path *inside one block*; the module's input and output are used.
                A tuple lists alternatives, the first that exists in a block is used (T5's
                feed-forward is sub-layer 1 in an encoder block, 2 in a decoder block).
    blocks:     role -> (input module, output module) inside one block, for methods that read a
                sub-layer's input and add to its output projection (parallel adapters).
    attention:  path of the module whose forward calls transformers' attention interface (prefix
                tuning hooks in there), or None where the architecture has none.
    pooling:    how a classification head pools tokens: "mean" (encoders) or "last" (decoders).
    kind:       "encoder", "decoder" or "encoder-decoder": the last two are loaded with their
                language-model head, so their tasks can also be generative (text in, text out).
    """

    layers: str | tuple[str, ...]
    roles: dict[str, str | tuple[str, ...]]
    blocks: dict[str, tuple[str | tuple[str, ...], str | tuple[str, ...]]]
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

_FF = ("layer.2.DenseReluDense", "layer.1.DenseReluDense")  # decoder block first: its layer.1 is cross-attention
_T5 = ArchSpec(
    layers=("encoder.block", "decoder.block"),
    roles={
        "query": "layer.0.SelfAttention.q",
        "key": "layer.0.SelfAttention.k",
        "value": "layer.0.SelfAttention.v",
        "attn_out": "layer.0.SelfAttention.o",
        "ffn_up": tuple(f"{f}.wi" for f in _FF) + tuple(f"{f}.wi_0" for f in _FF),  # T5 v1.0 / gated (Flan-T5)
        "ffn_out": tuple(f"{f}.wo" for f in _FF),
        "attn_norm": "layer.0.layer_norm",
        "ffn_norm": ("layer.2.layer_norm", "layer.1.layer_norm"),
    },
    blocks={"attn": ("layer.0.SelfAttention", "layer.0.SelfAttention.o"), "ffn": (_FF, _FF)},
    attention=None,  # T5 adds its relative position bias inside its own attention code
    pooling="mean",
    kind="encoder-decoder",
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
    "t5": _T5,
    "mt5": _T5,
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


def _list_path(model: nn.Module, layers: str) -> str:
    candidates = [layers]
    prefix = getattr(model, "base_model_prefix", "")
    if prefix:
        candidates.append(f"{prefix}.{layers}")
    for path in candidates:
        try:
            mod = model.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(mod, nn.ModuleList):
            return path
    raise TargetError(f"no block list at {candidates} in {type(model).__name__}")


def layers_path(model: nn.Module, spec: ArchSpec) -> str:
    """Path of the block list, also when the model wraps a base model (``model.bert.encoder...``);
    the first list of an encoder-decoder."""
    return _list_path(model, spec.layers if isinstance(spec.layers, str) else spec.layers[0])


def block_paths(model: nn.Module) -> list[str]:
    """Path of every transformer block, in layer order (an encoder-decoder's encoder blocks first)."""
    spec = arch_spec(model)
    lists = [spec.layers] if isinstance(spec.layers, str) else list(spec.layers)
    paths = []
    for layers in lists:
        root = _list_path(model, layers)
        paths += [f"{root}.{i}" for i in range(len(model.get_submodule(root)))]
    return paths


def num_layers(model: nn.Module) -> int:
    return len(block_paths(model))


def _inside(block: nn.Module, path: str | tuple[str, ...]) -> str | None:
    """The first of ``path``'s alternatives that exists inside ``block``."""
    for p in (path,) if isinstance(path, str) else path:
        try:
            block.get_submodule(p)
            return p
        except AttributeError:
            continue
    return None


def select_layers(model: nn.Module, layers: Iterable[int] | None, skip_first: int = 0) -> list[int]:
    """Block indices to use: all (or ``layers``), minus the first ``skip_first`` (AdapterDrop)."""
    n = num_layers(model)
    # negative indices count from the end, as in Python: -1 is the last block, -n the first
    bad = [i for i in (layers or ()) if not -n <= i < n]  # (i % n had wrapped -5 of 2 blocks to block 1)
    if bad:
        raise TargetError(f"layer indices {bad} out of range: the backbone has {n} layers (indices {-n} to {n - 1})")
    chosen = list(range(n)) if layers is None else sorted(i + n if i < 0 else i for i in layers)
    twice = sorted({i for i in chosen if chosen.count(i) > 1})
    if twice:  # (0 and -n are one block: it had been deduplicated without a word)
        raise TargetError(f"layer indices {list(layers or ())} name block(s) {twice} more than once (the backbone has {n} layers)")
    return [i for i in chosen if i >= skip_first]


def resolve_sites(
    model: nn.Module, targets: Iterable[str], layers: Iterable[int] | None = None, skip_first: int = 0
) -> list[Site]:
    """Concrete sites for ``targets`` in the selected layers.

    A target is a role of the architecture (``"query"``), a block (``"ffn"``), or a module path
    inside a block (``"attention.self.query"``); anything else is an error listing the candidates.
    """
    spec = arch_spec(model)
    blocks = block_paths(model)
    chosen = select_layers(model, layers, skip_first)
    block0 = model.get_submodule(blocks[0])
    # every block's inner names: a T5 decoder block has modules (cross-attention) its encoder blocks lack
    inner = {name for b in dict.fromkeys(blocks[i] for i in chosen) for name, _ in model.get_submodule(b).named_modules() if name}
    sites: list[Site] = []
    named: dict[tuple[str, str], str] = {}  # (input, output) paths in block 0 -> the target that named them
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
        where = tuple(_inside(block0, p) or p for p in pair)
        if where in named:  # (the delta's hooks had run twice on one module: its term added twice)
            raise TargetError(f"targets {named[where]!r} and {target!r} name the same module(s) {list(dict.fromkeys(where))}")
        named[where] = target
        safe = re.sub(r"\W", "_", target)
        for i in chosen:
            block = model.get_submodule(blocks[i])
            found = [_inside(block, p) for p in pair]
            if None in found:
                raise TargetError(f"target {target!r}: block {blocks[i]} has no {pair[found.index(None)]}")
            sites.append(Site(f"L{i}_{safe}", i, f"{blocks[i]}.{found[0]}", f"{blocks[i]}.{found[1]}"))
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
    return {i: f"{path}.{spec.attention}" for i, path in enumerate(block_paths(model))}
