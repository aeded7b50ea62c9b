"""Each PEFT adapter type read as this library's deltas: ``IMPORTERS[peft_type](model, config,
tensors)`` gives the delta configs and their tensors keyed ``<module path>|<parameter>``
(:mod:`adapters.peft_import` checks the files, the base model and the settings first, and loads the
values). LoRA (with rank_pattern / alpha_pattern, rsLoRA, ``bias="all"`` as BitFit), AdaLoRA (as
LoRA), (IA)^3, prompt tuning and prefix tuning on rotary models.
"""

from __future__ import annotations

import math
import re
from typing import Any, Callable, Sequence

import torch
from torch import nn

from .errors import CheckpointError
from .peft_export import ROOT, rotate_keys
from .registry import make_config
from .targets import block_paths, linear_dims


def _by_module(model: Any, tensors: dict[str, torch.Tensor], suffixes: Sequence[str]) -> dict[str, dict[str, torch.Tensor]]:
    """Tensors grouped by the backbone module they belong to: ``{path: {suffix: tensor}}``."""
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        suffix = next((s for s in suffixes if key.endswith("." + s)), None)
        if suffix is None or not key.startswith(ROOT):
            raise CheckpointError(f"unexpected tensor {key!r} in the adapter (expected {ROOT}<module>.{'|'.join(suffixes)})")
        groups.setdefault(key[len(ROOT):-len(suffix) - 1], {})[suffix] = value
    prefixes = ["", model.backbone.base_model_prefix + "."]
    for prefix in prefixes:
        if all(p.startswith(prefix) and _module(model, p[len(prefix):]) is not None for p in groups):
            return {p[len(prefix):]: v for p, v in groups.items()}
    missing = next(p for p in groups if all(_module(model, p[len(x):] if p.startswith(x) else p) is None for x in prefixes))
    raise CheckpointError(f"the adapter acts on {missing!r}, which this backbone ({model.backbone_name}, "
                          f"{model.backbone.config.model_type}) does not have: it was trained for another architecture")


def _module(model: Any, path: str) -> nn.Module | None:
    try:
        return model.backbone.get_submodule(path)
    except AttributeError:
        return None


def _layer_groups(model: Any, paths: Sequence[str], kind: Callable[[str], Any] = lambda path: None
                  ) -> dict[tuple[Any, tuple[int, ...]], list[str]]:
    """Module paths as ((kind, block indices) -> inner paths), so each group is one layer-wise config.
    ``kind``: what a config holds one value of (LoRA: the rank, which rank_pattern may set per layer)."""
    blocks = block_paths(model.backbone)
    inner: dict[tuple[str, Any], set[int]] = {}
    for path in paths:
        i = next((i for i, b in enumerate(blocks) if path.startswith(b + ".")), None)
        if i is None:
            raise CheckpointError(f"the adapter acts on {path}, outside the transformer blocks (embeddings, LM head): "
                                  "a delta here acts inside blocks only")
        inner.setdefault((path[len(blocks[i]) + 1:], kind(path)), set()).add(i)
    groups: dict[tuple[Any, tuple[int, ...]], list[str]] = {}
    for (name, value), layers in inner.items():
        groups.setdefault((value, tuple(sorted(layers))), []).append(name)
    return groups


def _layers(model: Any, layers: tuple[int, ...]) -> tuple[int, ...] | None:
    return None if len(layers) == len(block_paths(model.backbone)) else layers


def _lora_in(model: Any, config: dict[str, Any], tensors: dict[str, torch.Tensor]):
    if config.get("use_dora"):
        raise CheckpointError("DoRA adapters (use_dora) are not LoRA: not imported")
    if config.get("bias", "none") not in ("none", "all"):
        raise CheckpointError(f"LoRA bias={config['bias']!r} is not imported (bias='none' or 'all' is)")
    bias = {k.replace(".base_layer.bias", ".bias"): v for k, v in tensors.items() if k.endswith(".bias")}
    tensors = {k: v for k, v in tensors.items() if not k.endswith(".bias")}
    lora = _by_module(model, tensors, ("lora_A.weight", "lora_B.weight"))
    alphas = _alphas(config, [k[len(ROOT):-len(".lora_A.weight")] for k in tensors if k.endswith(".lora_A.weight")])
    root = math.sqrt if config.get("use_rslora") else (lambda r: 1.0)  # rsLoRA scales by alpha / sqrt(r)
    pre = model.backbone.base_model_prefix + "."  # a path is its saved name, or that name less this prefix
    pairs = {}
    for path, t in lora.items():
        r, alpha = t["lora_A.weight"].shape[0], alphas[path] if path in alphas else alphas[pre + path]
        pairs[path] = (t["lora_A.weight"], t["lora_B.weight"], alpha * root(r))
    configs, state = _as_loras(model, config, pairs)
    if bias:
        configs_b, state_b = _bias_in(model, bias)
        configs += configs_b
        state.update(state_b)
    return configs, state


def _as_loras(model: Any, config: dict[str, Any], pairs: dict[str, tuple[torch.Tensor, torch.Tensor, float]]):
    """Our LoRA configs and tensors for per-module ``(A, B, alpha)`` (scale ``alpha / rank``): one
    config per (rank, alpha, layer set), as the patterns of PEFT's LoRA and AdaLoRA's pruning set
    them per module."""
    def kind(path: str) -> tuple[int, float]:
        return pairs[path][0].shape[0], pairs[path][2]

    groups = sorted(_layer_groups(model, list(pairs), kind).items(), key=lambda g: g[0][0])
    configs = [make_config({"method": "lora", "rank": r, "alpha": alpha, "targets": names, "layers": _layers(model, layers),
                            "dropout": float(config.get("lora_dropout") or 0.0)}) for ((r, alpha), layers), names in groups]
    state = {}
    for path, (a, b, _) in pairs.items():
        state[f"{path}|lora_A"], state[f"{path}|lora_B"] = a, b
    return configs, state


def _alphas(config: dict[str, Any], modules: Sequence[str]) -> dict[str, float]:
    """Each module's lora_alpha, as PEFT reads its alpha_pattern: the first key (a regular
    expression) that the module's name ends with, after a '.', gives it; lora_alpha otherwise."""
    pattern = config.get("alpha_pattern") or {}
    out = {}
    for module in modules:
        key = next((k for k in pattern if re.match(rf"(.*\.)?({k})$", module)), None)
        out[module] = float(pattern[key] if key is not None else config.get("lora_alpha", 8))
    return out


def _bias_in(model: Any, tensors: dict[str, torch.Tensor]):
    """PEFT's whole biases -> BitFit deltas (saved bias minus the backbone's)."""
    groups = _by_module(model, tensors, ("bias",))
    state = {}
    for path, t in groups.items():
        base = getattr(model.backbone.get_submodule(path), "bias", None)
        if not isinstance(base, torch.Tensor) or base.shape != t["bias"].shape:
            raise CheckpointError(f"the adapter saves a bias for {path}, which has none of that shape here")
        state[f"{path}|bias"] = t["bias"].float() - base.detach().float().cpu()
    pattern = "^(" + "|".join(re.escape(p) for p in sorted(groups)) + ")$"
    return [make_config({"method": "bitfit", "patterns": [pattern], "exclude": []})], state


def _ia3_in(model: Any, config: dict[str, Any], tensors: dict[str, torch.Tensor]):
    scales = _by_module(model, tensors, ("ia3_l",))
    configs, state = [], {}
    for (_, layers), inner in _layer_groups(model, list(scales)).items():
        ff = [n for n in inner if any(scales[p]["ia3_l"].shape[0] == 1 and p.endswith("." + n) and
                                      (linear_dims(model.backbone.get_submodule(p)) or (0, 0))[0] == scales[p]["ia3_l"].shape[1]
                                      for p in scales)]
        configs.append(make_config({"method": "ia3", "targets": list(inner), "feedforward": ff, "layers": _layers(model, layers)}))
    for path, t in scales.items():
        state[f"{path}|scale"] = t["ia3_l"].reshape(-1)
    return configs, state


def _prompt_in(model: Any, config: dict[str, Any], tensors: dict[str, torch.Tensor]):
    if set(tensors) != {"prompt_embeddings"}:
        raise CheckpointError(f"a prompt-tuning adapter holds prompt_embeddings alone, not {sorted(tensors)}")
    if (config.get("num_transformer_submodules") or 1) != 1:
        raise CheckpointError("this prompt-tuning adapter also prompts the decoder (num_transformer_submodules=2, PEFT's "
                              "default for seq2seq); a prompt here goes to the encoder only")
    prompt = tensors["prompt_embeddings"]
    return [make_config({"method": "prompt", "num_tokens": prompt.shape[0]})], {"|prompt": prompt}


def _prefix_in(model: Any, config: dict[str, Any], tensors: dict[str, torch.Tensor]):
    """PEFT's (P, layers*2*heads*head_dim) prefix as ours, keys rotated back by P (see
    :mod:`adapters.peft_export`)."""
    if set(tensors) != {"prompt_embeddings"}:
        raise CheckpointError(f"a prefix-tuning adapter holds prompt_embeddings alone, not {sorted(tensors)}")
    if (config.get("num_transformer_submodules") or 1) != 1:
        raise CheckpointError("this prefix-tuning adapter is for an encoder-decoder (num_transformer_submodules=2)")
    cfg = model.backbone.config
    heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    layers = len(block_paths(model.backbone))
    emb = tensors["prompt_embeddings"].float()
    if emb.ndim != 2 or emb.shape[1] != layers * 2 * heads * dim:
        raise CheckpointError(f"the prefix has shape {tuple(emb.shape)}; this backbone needs (P, {layers * 2 * heads * dim}) "
                              f"({layers} layers x 2 x {heads} heads x {dim}): it was trained for another model")
    P = emb.shape[0]
    kv = rotate_keys(model.backbone, emb.view(P, layers, 2, heads, dim).permute(1, 2, 3, 0, 4), -P)
    return [make_config({"method": "prefix", "num_tokens": P, "reparameterize": False})], {"|prefix": kv}


def _adalora_in(model: Any, config: dict[str, Any], tensors: dict[str, torch.Tensor]):
    """AdaLoRA (Zhang et al. 2023) as LoRA, exactly: PEFT computes ``B (A * E) x * lora_alpha /
    (init_r + 1e-5)`` per module (E the singular values, one per kept rank; the scale keeps the
    initial rank after pruning), which is our LoRA with ``A' = A * E`` and ``alpha = lora_alpha * r
    / (init_r + 1e-5)``. A module pruned to rank 0 adds nothing and is left out."""
    if config.get("bias", "none") != "none":
        raise CheckpointError(f"AdaLoRA bias={config['bias']!r} is not imported")
    alpha, init_r = float(config.get("lora_alpha") or 0), config.get("init_r")
    if alpha <= 0 or not isinstance(init_r, int) or init_r < 1:
        raise CheckpointError(f"an AdaLoRA adapter needs lora_alpha > 0 and init_r >= 1, got {alpha} and {init_r!r}")
    svd = _by_module(model, tensors, ("lora_A", "lora_B", "lora_E"))
    bad = next((p for p, t in svd.items() if set(t) != {"lora_A", "lora_B", "lora_E"} or
                t["lora_E"].numel() != t["lora_A"].shape[0]), None)
    if bad is not None:
        raise CheckpointError(f"the AdaLoRA tensors of {bad} do not pair: lora_A, lora_B and lora_E with one value per rank")
    pairs = {p: (t["lora_A"] * t["lora_E"].reshape(-1, 1), t["lora_B"], alpha * t["lora_A"].shape[0] / (init_r + 1e-5))
             for p, t in svd.items() if t["lora_A"].shape[0] > 0}
    return _as_loras(model, config, pairs)

IMPORTERS = {"LORA": _lora_in, "ADALORA": _adalora_in, "IA3": _ia3_in, "PROMPT_TUNING": _prompt_in,
             "PREFIX_TUNING": _prefix_in}
