"""HuggingFace PEFT's checkpoint format, both ways: a task's delta exported as a PEFT adapter
(``adapter_config.json`` + ``adapter_model.safetensors``), and a PEFT adapter imported as a task.

Which methods travel, and why only those. A PEFT adapter is a function of the base model; an
export is only right if PEFT computes the same function from it:

  ours       PEFT            tensors (keys under ``base_model.model.<module path>``)
  lora       LORA            ``.lora_A.weight`` (r, in), ``.lora_B.weight`` (out, r); scale alpha / r
  ia3        IA3             ``.ia3_l``: (out, 1) rescales the output, (1, in) the input (feedforward)
  prompt     PROMPT_TUNING   ``prompt_embeddings`` (P, d), prepended to the input embeddings
  bitfit     (with lora)     LORA with ``bias="all"``: the biases themselves (backbone's + ours)

  prefix     PREFIX_TUNING   ``prompt_embeddings`` (P, layers*2*kv_heads*head_dim); rotary models only

Prefix tuning needs a conversion. PEFT hands the prefix to the model as past keys and values, as
Li & Liang's code did, so every real token sits P positions further on; ours prepends the prefix
inside attention and leaves the tokens at 0..T-1. With rotary position embeddings (Llama, Mistral,
Qwen, Gemma) only query-to-prefix scores see that shift: a query at t+P against key k scores as a
query at t against k rotated back by P. So the export rotates our prefix keys forward by P
positions (the import back by P) and PEFT computes our function exactly. With absolute positions
(BERT) the shift changes the token embeddings themselves, which no prefix can undo: refused.

Several LoRAs on disjoint modules (what an adapter saved with rank_pattern or alpha_pattern
imports as) travel as one LORA with those patterns. Refused, with the reason: methods PEFT has no
type for (bottleneck, parallel, Compacter, fusion), two LoRAs on one module, and other
combinations than lora+bitfit (one PEFT adapter holds one method).

A classification head has no exact PEFT form either: PEFT keeps it in ``modules_to_save`` of a
``*ForSequenceClassification`` model, whose head is that architecture's own (BERT pools [CLS]
through its pooler, Llama's ``score`` has no bias), not our pooled linear layer. So the adapter is
exported for the bare backbone (``FEATURE_EXTRACTION``) and the head goes beside it, in
``head.safetensors``; ``delta_continual.json`` records labels, pooling, the backbone's fingerprint
and every file's SHA-256, so importing our own export back is exact and verified. A generative
task is ``CAUSAL_LM`` (decoders) or ``SEQ_2_SEQ_LM`` (T5); the LM head is the model's own.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any, Sequence

import torch
from safetensors.torch import save_file
from torch import nn

from .fingerprint import backbone_fingerprint, json_digest, output_dir, sha256_file
from .targets import block_paths
from .config import DeltaConfig
from .errors import ConfigError

CONFIG, WEIGHTS, HEAD, SIDECAR = "adapter_config.json", "adapter_model.safetensors", "head.safetensors", "delta_continual.json"
SIDECAR_FORMAT = "delta-continual/peft-export"
PEFT_TYPES = {"lora": "LORA", "ia3": "IA3", "prompt": "PROMPT_TUNING", "prefix": "PREFIX_TUNING"}
ROOT = "base_model.model."
PREFIX_REASON = ("PEFT passes a prefix to the model as past keys and values, which moves the real tokens P positions "
                 "on; this library's prefix keeps them at 0..T-1. On a model with rotary positions that is converted "
                 "exactly; this backbone has absolute positions, where no conversion can make the two agree")


def exportable(configs: Sequence[DeltaConfig], model: Any = None, deltas: Sequence[Any] | None = None) -> str | None:
    """None when a task with these delta configs can be written as one PEFT adapter (on
    ``model``'s backbone, where given; ``deltas``, the task's, are checked too: several LoRAs
    travel as one with rank_pattern / alpha_pattern where no two act on one module), else why not."""
    methods = sorted(c.method for c in configs)
    loras = methods.count("lora")
    if loras > 1 and [m for m in methods if m != "lora"] in ([], ["bitfit"]):
        if deltas is not None:
            clash = _shared_module([d for d in deltas if d.config.method == "lora"])
            if clash:
                return (f"{loras} LoRAs act on {clash}: a PEFT adapter holds one LoRA per module (rank_pattern and "
                        "alpha_pattern give modules their own rank and alpha, not a second LoRA)")
        return None
    if not methods:
        return "it has no delta of its own (a head only: its delta is another task's, e.g. a shared delta)"
    if methods == ["prefix"]:
        if model is not None and rope_of(model.backbone) is None:
            return f"prefix tuning is not exported: {PREFIX_REASON}"
        return None
    if methods in (["lora"], ["ia3"], ["prompt"], ["bitfit", "lora"]):
        return None
    what = "+".join(c.method for c in configs)
    return (f"PEFT cannot hold {what}: one PEFT adapter is one of lora, ia3, prompt, prefix or lora+bitfit "
            "(LoRA with bias='all'); bottleneck, parallel and compacter adapters have no PEFT type")


def task_type(model: Any, task: Any, generative: bool = False) -> str:
    """PEFT's task_type for a task: a generative one is the model's LM; a classification task's
    delta is exported for the bare backbone (its head goes beside it). A task without a head (a
    shared delta) is generative when ``generative`` says the tasks it serves are."""
    if getattr(task.head, "generative", False) or (task.head is None and generative):
        return "SEQ_2_SEQ_LM" if model.seq2seq else "CAUSAL_LM"
    return "FEATURE_EXTRACTION"


def module_prefix(model: Any, kind: str) -> str:
    """Where our backbone sits inside the model PEFT wraps for ``kind``: LlamaForCausalLM keeps its
    LlamaModel under ``model.``; AutoModel (feature extraction) and T5 are the backbone itself."""
    if kind == "CAUSAL_LM" and not model.seq2seq:
        return model.backbone.base_model_prefix + "."
    return ""


# -- export --------------------------------------------------------------------------------------
def export_peft(model: Any, name: str, directory: str | Path, base_model: str | None = None,
                generative: bool = False) -> Path:
    """Write task ``name`` as a PEFT adapter in ``directory`` (see the module docstring); returns it.

    ``base_model``: the ``base_model_name_or_path`` to record (default: the hub id of a short
    backbone name, else the name the model was loaded by). ``generative``: a task without a head
    (a shared delta) serves generative tasks, so it is the LM's adapter. Raises
    :class:`ConfigError` naming what can be exported when PEFT cannot hold the task's delta."""
    task = model.task(name)
    why = exportable(task.configs, model, list(task.deltas.values()))
    if why:
        raise ConfigError(f"task {name!r}: {why}")
    kind = task_type(model, task, generative)
    prefix = module_prefix(model, kind)
    loras = [d for c, d in zip(task.configs, task.deltas.values()) if c.method == "lora"]
    deltas = dict(zip([c.method for c in task.configs], task.deltas.values()))
    main = next(m for m in ("lora", "ia3", "prompt", "prefix") if m in deltas)
    config, tensors = _loras_out(model, loras, prefix) if len(loras) > 1 else _EXPORTERS[main](model, deltas[main], prefix)
    if "bitfit" in deltas:
        config["bias"] = "all"
        wrapped = {k[:-len(".lora_A.weight")] for k in tensors if k.endswith(".lora_A.weight")}
        for key, value in _bias_tensors(model, deltas["bitfit"], prefix).items():
            module = key[:-len(".bias")]  # PEFT keeps a LoRA-wrapped layer's own weights under base_layer
            tensors[f"{module}.base_layer.bias" if module in wrapped else key] = value
    from .backbones import hub_id

    config.update(peft_type=PEFT_TYPES[main], task_type=kind, inference_mode=True, revision=None,
                  base_model_name_or_path=base_model or hub_id(model.backbone_name))
    out = output_dir(directory, f"task {name!r} as a PEFT adapter")
    _save(tensors, out / WEIGHTS)
    files = [WEIGHTS]
    if task.head is not None and not task.head.generative:
        _save({k: v for k, v in task.head.state_dict().items()}, out / HEAD)
        files.append(HEAD)
    else:  # a head left by an earlier export into this directory would be read back as this task's
        (out / HEAD).unlink(missing_ok=True)
    _write_json(out / CONFIG, config)
    meta = {"format": SIDECAR_FORMAT, "version": 1, "task": name, "methods": [c.to_dict() for c in task.configs],
            "label_names": task.label_names, "num_labels": getattr(task.head, "num_labels", None),
            "pooling": getattr(task.head, "pooling", None), "generative": bool(getattr(task.head, "generative", False)),
            "backbone": backbone_fingerprint(model.backbone), "backbone_name": model.backbone_name,
            "sha256": {f: sha256_file(out / f) for f in (*files, CONFIG)}}
    _write_json(out / SIDECAR, {**meta, "checksum": json_digest(meta)})  # the record seals itself too
    return out


def _save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().float().contiguous().cpu() for k, v in tensors.items()}, str(tmp))
    tmp.replace(path)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    tmp.replace(path)


def _site_paths(delta: Any, prefix: str) -> list[str]:
    bad = [s.output for s in delta.sites if s.input != s.output]
    if bad:
        raise ConfigError(f"{delta.config.method} on blocks ({bad[0]}, ...) reads one module's input and adds to "
                          "another's output: PEFT's LoRA and (IA)^3 act on one linear layer each")
    return [prefix + s.output for s in delta.sites]


def target_modules(model: Any, paths: Sequence[str], prefix: str) -> list[str]:
    """The shortest module-name suffixes that, matched as PEFT matches ``target_modules`` (a name
    equal to a suffix or ending in '.' + suffix), select exactly ``paths`` among the wrapped model's
    modules; the full paths where no shorter suffixes do."""
    names = [prefix + n for n, _ in model.backbone.named_modules() if n]
    wanted = set(paths)
    for depth in range(1, max(p.count(".") for p in paths) + 2):
        suffixes = sorted({".".join(p.split(".")[-depth:]) for p in paths})
        if any(x[0].isdigit() for x in suffixes):  # "1.self_attn.q_proj" would work, but reads as noise
            continue
        hit = {n for n in names if any(n == s or n.endswith("." + s) for s in suffixes)}
        if hit == wanted:
            return suffixes
    return sorted(wanted)


def _lora_out(model: Any, delta: Any, prefix: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    c = delta.config
    paths = _site_paths(delta, prefix)
    tensors = {}
    for site, path in zip(delta.sites, paths):
        m = delta.site_modules[site.key]
        tensors[f"{ROOT}{path}.lora_A.weight"] = m.lora_A
        tensors[f"{ROOT}{path}.lora_B.weight"] = m.lora_B
    conv1d = any(not isinstance(model.backbone.get_submodule(s.output), nn.Linear) for s in delta.sites)
    config = {"r": c.rank, "lora_alpha": c.alpha, "lora_dropout": c.dropout, "target_modules": target_modules(model, paths, prefix),
              "bias": "none", "fan_in_fan_out": conv1d, "use_rslora": False, "use_dora": False, "modules_to_save": None,
              "init_lora_weights": True, "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {},
              "alpha_pattern": {}}
    return config, tensors


def _shared_module(loras: Sequence[Any]) -> str | None:
    seen: set[str] = set()
    for delta in loras:
        for site in delta.sites:
            if site.output in seen:
                return site.output
            seen.add(site.output)
    return None


def _loras_out(model: Any, loras: Sequence[Any], prefix: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Several LoRAs on disjoint modules (an adapter PEFT saved with rank_pattern or alpha_pattern,
    imported as one LoRA per rank, alpha and layer set) as one PEFT LoRA: ``r`` and ``lora_alpha``
    those of the most modules, the others in ``rank_pattern`` / ``alpha_pattern`` under each
    module's full name, which PEFT (and vLLM) match against the name's end."""
    parts = [_lora_out(model, d, prefix) for d in loras]
    paths = {d: _site_paths(d, prefix) for d in loras}
    weight = {}
    for d in loras:
        weight[(d.config.rank, d.config.alpha)] = weight.get((d.config.rank, d.config.alpha), 0) + len(paths[d])
    r, alpha = max(weight, key=weight.__getitem__)
    names = [prefix + n for n, _ in model.backbone.named_modules() if n]
    config = {**parts[0][0], "r": r, "lora_alpha": alpha, "fan_in_fan_out": any(c["fan_in_fan_out"] for c, _ in parts),
              "target_modules": target_modules(model, [p for d in loras for p in paths[d]], prefix),
              "rank_pattern": {_pattern(p, names): d.config.rank for d in loras if d.config.rank != r for p in paths[d]},
              "alpha_pattern": {_pattern(p, names): d.config.alpha for d in loras if d.config.alpha != alpha for p in paths[d]}}
    return config, {k: v for _, tensors in parts for k, v in tensors.items()}


def _pattern(path: str, names: Sequence[str]) -> str:
    """``path`` as a pattern key that PEFT's rule (the key, a regular expression, matching the end of
    a module's name after a '.') gives to that module alone: itself, or escaped where its dots
    would match another name's characters."""
    hits = [n for n in names if re.match(rf"(.*\.)?({path})$", n)]
    return path if hits == [path] else re.escape(path)


def _ia3_out(model: Any, delta: Any, prefix: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    paths = _site_paths(delta, prefix)
    tensors, feedforward = {}, []
    for site, path in zip(delta.sites, paths):
        m = delta.site_modules[site.key]
        ff = m.base is not None  # the input is rescaled
        tensors[f"{ROOT}{path}.ia3_l"] = m.scale.view(1, -1) if ff else m.scale.view(-1, 1)
        if ff:
            feedforward.append(path)
    targets = target_modules(model, paths, prefix)
    ff_names = target_modules(model, feedforward, prefix) if feedforward else []
    if not set(ff_names) <= set(targets):  # PEFT wants feedforward_modules among target_modules
        targets, ff_names = sorted(paths), sorted(feedforward)
    config = {"target_modules": targets, "feedforward_modules": ff_names, "fan_in_fan_out": False,
              "modules_to_save": None, "init_ia3_weights": True}
    return config, tensors


def _prompt_out(model: Any, delta: Any, prefix: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    cfg = model.backbone.config
    config = {"num_virtual_tokens": delta.prompt.shape[0], "token_dim": delta.prompt.shape[1],
              "num_transformer_submodules": 1,  # ours prompts the encoder only (T5: not the decoder)
              "num_attention_heads": getattr(cfg, "num_attention_heads", getattr(cfg, "num_heads", None)),
              "num_layers": getattr(cfg, "num_hidden_layers", getattr(cfg, "num_layers", None)),
              "prompt_tuning_init": "RANDOM", "prompt_tuning_init_text": None, "tokenizer_name_or_path": None}
    return config, {"prompt_embeddings": delta.prompt}


def _bias_tensors(model: Any, delta: Any, prefix: str) -> dict[str, torch.Tensor]:
    """BitFit as PEFT's ``bias="all"``: PEFT stores (and loads over the model's) whole bias vectors,
    so each is the backbone's bias plus ours; a module without a bias of its own cannot be held."""
    if tuple(delta.config.params) != ("bias",):
        raise ConfigError("bitfit exports to PEFT only as bias deltas (params=[bias]): PEFT's bias='all' holds biases")
    out = {}
    for site in delta.sites:
        base = getattr(model.backbone.get_submodule(site.output), "bias", None)
        if not isinstance(base, torch.Tensor):
            raise ConfigError(f"bitfit adds a bias to {site.output}, which has none: PEFT's bias='all' can only "
                              "hold the model's own biases")
        out[f"{ROOT}{prefix}{site.output}.bias"] = base.detach().float() + delta.site_modules[site.key].deltas["bias"].float()
    return out


def rope_of(backbone: nn.Module) -> nn.Module | None:
    """The backbone's rotary position embedding (Llama-family ``rotary_emb``), or None."""
    rope = getattr(backbone, "rotary_emb", None)
    return rope if isinstance(rope, nn.Module) else None


def rotate_keys(backbone: nn.Module, kv: torch.Tensor, positions: int) -> torch.Tensor:
    """Prefix keys and values (layers, 2, heads, P, head_dim) with the keys rotated as rotary
    embeddings rotate a key ``positions`` on (negative: back); the values unchanged. The rotation
    is the model's own (its frequencies and scaling), without its attention scaling factor."""
    rope = rope_of(backbone)
    if rope is None:
        raise ConfigError(f"prefix tuning is not converted: {PREFIX_REASON}")
    # An imported prefix arrives on the CPU while the rotary module may sit on a GPU.
    kv = kv.to(next(iter(rope.buffers()), kv).device)
    keys = kv[:, 0].float()
    cos, sin = rope(keys, torch.full((1, 1), positions, device=keys.device))
    scale = float(getattr(rope, "attention_scaling", 1.0))
    cos, sin = cos.reshape(-1).float() / scale, sin.reshape(-1).float() / scale
    if cos.shape[-1] != keys.shape[-1]:
        raise ConfigError("prefix tuning is not converted for partial rotary embeddings (rotary size "
                          f"{cos.shape[-1]} of head size {keys.shape[-1]})")
    half = keys.shape[-1] // 2
    rotated_half = torch.cat([-keys[..., half:], keys[..., :half]], dim=-1)
    return torch.stack([keys * cos + rotated_half * sin, kv[:, 1].float()], dim=1)


def _prefix_out(model: Any, delta: Any, prefix: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    layers = len(block_paths(model.backbone))
    if list(delta.layer_ids) != list(range(layers)):
        raise ConfigError(f"prefix tuning on layers {delta.layer_ids} only: PEFT's prefix covers every layer")
    L, _, H, P, D = delta.shape
    kv = rotate_keys(model.backbone, delta.kv().detach(), P)
    config = {"num_virtual_tokens": P, "token_dim": H * D, "num_attention_heads": H, "num_layers": L,
              "encoder_hidden_size": H * D, "prefix_projection": False, "num_transformer_submodules": 1}
    return config, {"prompt_embeddings": kv.permute(3, 0, 1, 2, 4).reshape(P, L * 2 * H * D)}


_EXPORTERS = {"lora": _lora_out, "ia3": _ia3_out, "prompt": _prompt_out, "prefix": _prefix_out}



# -- serving -------------------------------------------------------------------------------------
VLLM_MAX_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)  # the values vLLM's --max-lora-rank takes
# the layers vLLM applies LoRA to in Llama-family models (attention and MLP projections)
VLLM_LLAMA_MODULES = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def max_rank(config: dict[str, Any]) -> int:
    """A PEFT LoRA config's largest rank: ``r`` or one ``rank_pattern`` gives (vLLM checks this
    one against ``--max-lora-rank``)."""
    return max([config.get("r") or 0, *(config.get("rank_pattern") or {}).values()])


def vllm_scaling(config: dict[str, Any]) -> float:
    """The factor vLLM multiplies B A x by: lora_alpha / r, or lora_alpha / sqrt(r) for rsLoRA."""
    r, alpha = config["r"], config["lora_alpha"]
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


def vllm_problems(config: dict[str, Any], max_lora_rank: int = 16) -> list[str]:
    """What keeps vLLM (``vllm serve --enable-lora``) from loading this adapter, as its LoRA loader
    checks a PEFT config: a LoRA of a causal LM with r, lora_alpha and target_modules, no
    modules_to_save, no DoRA, no trained biases (unless --enable-lora-bias), rank within
    ``--max-lora-rank`` (vLLM's default 16), on the projections vLLM adapts. Empty: servable."""
    out = []
    if config.get("peft_type") != "LORA":
        out.append(f"vLLM serves LoRA adapters only; this is {config.get('peft_type')}")
        return out
    if config.get("task_type") != "CAUSAL_LM":
        out.append(f"vLLM serves causal language models; this adapter is for {config.get('task_type')}")
    out += [f"{k} is missing" for k in ("r", "lora_alpha", "target_modules") if config.get(k) in (None, "", [])]
    if config.get("modules_to_save"):
        out.append(f"modules_to_save {config['modules_to_save']}: vLLM supports none")
    if config.get("use_dora"):
        out.append("DoRA: vLLM does not support it")
    if config.get("bias", "none") != "none":
        out.append(f"bias={config['bias']!r}: needs vLLM's --enable-lora-bias")
    r = max_rank(config)
    if r > VLLM_MAX_RANKS[-1]:
        out.append(f"rank {r} is above vLLM's largest --max-lora-rank ({VLLM_MAX_RANKS[-1]})")
    elif r > max_lora_rank:
        out.append(f"rank {r} is above --max-lora-rank {max_lora_rank}: start vLLM with --max-lora-rank "
                   f"{next(m for m in VLLM_MAX_RANKS if m >= r)}")
    leaves = {t.split(".")[-1] for t in (config.get("target_modules") or [])}
    if leaves and not leaves <= VLLM_LLAMA_MODULES:
        out.append(f"target modules {sorted(leaves - VLLM_LLAMA_MODULES)} are not among the projections vLLM adapts "
                   f"in Llama-family models ({', '.join(sorted(VLLM_LLAMA_MODULES))})")
    return out
