"""Importing a HuggingFace PEFT adapter as a task of a :class:`~adapters.DeltaModel`: a LoRA,
(IA)^3 or prompt-tuning adapter from a directory or the hub becomes the same delta here
(:mod:`adapters.peft_export` says which forms match which, and why prefix tuning does not).

    model.import_peft("path/to/adapter", "reviews", label_names=["neg", "pos"])

Checked before anything is added: the files (our own export's checksums), that the adapter was
trained for this backbone (its recorded base model name and, for our own export, the backbone's
fingerprint; every module it names must exist and every tensor fit its shape), and that every
tensor finds its place. Anything else is a :class:`CheckpointError` naming the file or tensor.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from .fingerprint import backbone_fingerprint, json_digest, read_json, read_tensors, sha256_file
from .config import DeltaConfig
from .errors import BaseModelMismatch, CheckpointError, DeltaError
from .peft_export import CONFIG, HEAD, PREFIX_REASON, ROOT, SIDECAR, SIDECAR_FORMAT, WEIGHTS, rope_of, rotate_keys
from .registry import make_config
from .targets import block_paths, linear_dims

GENERATIVE_TYPES = ("CAUSAL_LM", "SEQ_2_SEQ_LM")


def import_peft(model: Any, source: str | Path, name: str | None = None, *, strict_base: bool = True, **head: Any) -> str:
    """Add the PEFT adapter at ``source`` (a directory, or a hub id when online) to ``model`` as
    task ``name`` (default: the exported task's name, else the directory's); returns the name.

    ``head``: :meth:`DeltaModel.add_task`'s head arguments (``label_names=[...]`` for a new
    classifier, ``generative=True`` for the model's LM head). Without them our own export's head
    comes back as saved, and a foreign adapter gets the LM head when PEFT's task_type is a
    language model's, else none. ``strict_base=False`` skips the base-model name and fingerprint
    checks (shapes are always checked)."""
    directory, config, tensors = read_adapter(source)
    meta = sidecar(directory) or {}
    where = str(directory)
    if strict_base:
        check_base(model, config, meta, where)
    configs, state = import_configs(model, config, tensors, where, fresh_head=bool(head))
    own_head = not head and bool(meta) and not meta.get("generative")
    if not head and meta:
        head = {"generative": True} if meta.get("generative") else {
            "label_names": meta.get("label_names"), "num_labels": meta.get("num_labels"), "pooling": meta.get("pooling")}
    elif not head and config.get("task_type") in GENERATIVE_TYPES:
        head = {"generative": True}
    name = name or meta.get("task") or re.sub(r"[^A-Za-z0-9_\-]", "-", directory.name)
    try:
        task = model.add_task(name, configs, **head)
    except DeltaError as e:
        raise CheckpointError(f"{where}: cannot add the adapter as task {name!r}: {e}") from None
    try:
        load_values(task, state, where)
        if own_head and task.head is not None:
            task.head.load_state_dict(read_tensors(directory / HEAD), strict=True)
    except (CheckpointError, RuntimeError) as e:
        model.remove_task(name)
        raise CheckpointError(str(e) if isinstance(e, CheckpointError) else f"{where}: the saved head does not fit: {e}") from None
    return name


def check_base(model: Any, config: dict[str, Any], meta: dict[str, Any], where: str) -> None:
    """Refuse an adapter recorded for another base model (by name; by fingerprint for our own)."""
    theirs = config.get("base_model_name_or_path")
    loaded_from = getattr(getattr(model.backbone, "config", None), "name_or_path", None) or ""
    if not (same_base(model.backbone_name, theirs) or same_base(loaded_from, theirs)):
        raise BaseModelMismatch(f"{where} was trained on {theirs!r}, not on this backbone ({model.backbone_name!r})",
                                "load it onto that model, or pass strict_base=False if it is the same model under another name")
    if meta.get("backbone") and meta["backbone"] != backbone_fingerprint(model.backbone):
        diff = sorted(k for k, v in meta["backbone"].items() if backbone_fingerprint(model.backbone).get(k) != v)
        raise CheckpointError(f"{where} was exported from another backbone ({meta.get('backbone_name')!r}); differs in {diff}")


# -- import --------------------------------------------------------------------------------------
def read_adapter(source: str | Path) -> tuple[Path, dict[str, Any], dict[str, torch.Tensor]]:
    """(directory, adapter_config, tensors) of a PEFT adapter in a directory or on the hub."""
    directory = Path(source).expanduser()
    if not directory.exists():
        directory = _download(str(source))
    path = directory / CONFIG
    if not path.is_file():
        raise CheckpointError(f"no PEFT adapter at {directory}: {CONFIG} is missing")
    config = read_json(path)
    if not isinstance(config, dict) or not isinstance(config.get("peft_type"), str):
        raise CheckpointError(f"{path} is not a PEFT adapter config (no peft_type)")
    weights = directory / WEIGHTS
    if not weights.is_file():
        other = "; it has adapter_model.bin (pickle): re-save it with safetensors" if (directory / "adapter_model.bin").exists() else ""
        raise CheckpointError(f"{weights} is missing{other}")
    _verify_sidecar(directory)
    return directory, config, read_tensors(weights)


def _download(repo: str) -> Path:
    if not re.fullmatch(r"[\w.\-]+/[\w.\-]+", repo):
        raise CheckpointError(f"{repo!r} is neither a directory nor a hub id (owner/name)")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo, allow_patterns=[CONFIG, WEIGHTS, HEAD, SIDECAR]))
    except Exception as e:  # offline, unknown repo, gated: one message, the cause's first line
        raise CheckpointError(f"cannot fetch the PEFT adapter {repo!r} from the HuggingFace hub (offline, or no such "
                              f"repository?); give a local directory instead. Cause: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


def sidecar(directory: Path) -> dict[str, Any] | None:
    path = directory / SIDECAR
    if not path.is_file():
        return None
    meta = read_json(path)
    if not isinstance(meta, dict) or meta.get("format") != SIDECAR_FORMAT:
        raise CheckpointError(f"{path} is not a delta-continual export record")
    if "checksum" in meta and meta["checksum"] != json_digest(meta):  # (exports before seals have none)
        raise CheckpointError(f"{path} does not match its checksum: edited or damaged since export (delete it to "
                              "import the adapter as a foreign one)")
    return meta


def _verify_sidecar(directory: Path) -> None:
    """Our own export lists each file's SHA-256: a damaged or edited file is refused."""
    meta = sidecar(directory)
    for name, digest in ((meta or {}).get("sha256") or {}).items():
        path = directory / name
        if not path.is_file() or sha256_file(path) != digest:
            raise CheckpointError(f"{path} does not match the checksum {SIDECAR} recorded at export: damaged, or "
                                  "changed since (delete delta_continual.json to import it as a foreign adapter)")


def same_base(ours: str, theirs: str | None) -> bool:
    """Whether a recorded base model name names our backbone: equal names, our short name's hub
    id, or the same last path component (a local copy of a hub model). :func:`check_base` also
    asks it of the path the backbone was loaded from, so an adapter PEFT trained on the packaged
    copy (recorded as that directory) matches the short name."""
    from .backbones import hub_id

    if not theirs:
        return True  # nothing recorded to compare: the shapes are still checked
    if ours and Path(ours).is_dir() and Path(theirs).is_dir():
        return Path(ours).resolve() == Path(theirs).resolve()  # two directories: "model" == "model" says nothing
    leaf = lambda s: s.rstrip("/").split("/")[-1].lower()  # noqa: E731
    return leaf(theirs) in {leaf(ours), leaf(hub_id(ours))}


def import_configs(model: Any, config: dict[str, Any], tensors: dict[str, torch.Tensor], where: str = "the adapter",
                   fresh_head: bool = False) -> tuple[list[DeltaConfig], dict[str, torch.Tensor]]:
    """Our delta configs for a PEFT adapter, and its tensors keyed by backbone module path.
    ``fresh_head``: the caller gives the task a head of its own, so a classification head the
    adapter saves whole (``modules_to_save``) is left out."""
    peft_type = config["peft_type"]
    if peft_type not in _IMPORTERS:
        raise CheckpointError(f"PEFT adapter type {peft_type} cannot become a delta here; supported: {', '.join(_IMPORTERS)}")
    if peft_type == "PREFIX_TUNING" and rope_of(model.backbone) is None:
        raise CheckpointError(f"PEFT prefix tuning is not imported: {PREFIX_REASON}")
    check_settings(config, where)
    saved = config.get("modules_to_save") or []
    if saved:
        heads = {m.split(".")[-1] for m in saved} <= set(CLASSIFIER_HEADS)
        if not (heads and fresh_head):
            raise CheckpointError(
                f"{where}: the adapter also saves whole modules {saved} (modules_to_save); " + (
                    "a sequence-classification head is left out only where the task gets a fresh head: give "
                    "label_names=[...] (a stream task always gets one)" if heads else
                    "they change the model beyond a delta and cannot be imported"))
        # the *ForSequenceClassification head (BERT's pools [CLS] through its pooler, Llama's has no
        # bias) is not ours: its tensors stay behind, the delta comes as PEFT trained it
        tensors = {k: v for k, v in tensors.items() if k[len(ROOT):].split(".")[0] not in CLASSIFIER_HEADS}
    return _IMPORTERS[peft_type](model, config, tensors)


# the heads PEFT's SEQ_CLS task type saves whole (transformers' *ForSequenceClassification names)
CLASSIFIER_HEADS = ("classifier", "score")
# Every setting of each adapter type that is read here or cannot change what the adapter computes
# (initialisation that leaves the base weights alone, names, bookkeeping). Anything else a config
# sets (a variant such as aLoRA's invocation tokens, a LoRA bias, layer replication, or a newer
# PEFT's feature) is refused by name: dropping it would import an adapter that computes something
# else, a wrong number with no error.
_COMMON = {"peft_type", "task_type", "base_model_name_or_path", "revision", "inference_mode", "auto_mapping", "peft_version",
           "modules_to_save"}
_READ = {
    "LORA": {"r", "lora_alpha", "lora_dropout", "target_modules", "exclude_modules", "fan_in_fan_out", "bias", "use_rslora",
             "use_dora", "init_lora_weights", "layers_to_transform", "layers_pattern", "rank_pattern", "alpha_pattern",
             "megatron_core", "loftq_config", "eva_config", "corda_config", "lora_ga_config", "qalora_group_size",
             "runtime_config", "ensure_weight_tying"},
    "IA3": {"target_modules", "exclude_modules", "feedforward_modules", "fan_in_fan_out", "init_ia3_weights"},
    "PROMPT_TUNING": {"num_virtual_tokens", "token_dim", "num_transformer_submodules", "num_attention_heads", "num_layers",
                      "prompt_tuning_init", "prompt_tuning_init_text", "tokenizer_name_or_path", "tokenizer_kwargs"},
    "PREFIX_TUNING": {"num_virtual_tokens", "token_dim", "num_transformer_submodules", "num_attention_heads", "num_layers",
                      "encoder_hidden_size", "prefix_projection", "init_weights"},
}
# LoRA initialisations that also rewrite the base weights (W - B0 A0, or a quantised W): the saved
# B A is relative to that changed base until PEFT converts it at save time, which also resets
# init_lora_weights to true.
_BASE_CHANGING_INITS = ("pissa", "corda", "olora", "loftq", "lora_ga")


def check_settings(config: dict[str, Any], where: str) -> None:
    """Refuse a PEFT config that sets anything this importer does not read (see ``_READ``)."""
    known = _COMMON | _READ.get(config["peft_type"], set())
    unread = sorted(k for k, v in config.items() if k not in known and v not in (None, False, 0, "", [], {}))
    if unread:
        shown = ", ".join(f"{k}={config[k]!r}" for k in unread)
        raise CheckpointError(f"{where}: the {config['peft_type']} adapter sets {shown}: not read here, and one imported "
                              "without it would compute something else, so it is refused")
    init = config.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INITS):
        raise CheckpointError(f"{where} was initialised with init_lora_weights={init!r}, which also changes the base "
                              "weights: its B A is relative to that changed base, not to this backbone. Save it with PEFT's "
                              "save_pretrained(..., path_initial_model_for_weight_conversion=...) to make it a LoRA of the "
                              "original weights, then import that")


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
    configs, state = [], {}

    def kind(path: str) -> tuple[int, float]:  # a config holds one rank and one alpha; the patterns set them per module
        return lora[path]["lora_A.weight"].shape[0], next(a for m, a in alphas.items() if m == path or m.endswith("." + path))

    for ((r, alpha), layers), names in sorted(_layer_groups(model, list(lora), kind).items(), key=lambda g: g[0][0]):
        alpha *= math.sqrt(r) if config.get("use_rslora") else 1.0
        configs.append(make_config({"method": "lora", "rank": r, "alpha": alpha, "targets": names,
                                    "layers": _layers(model, layers), "dropout": float(config.get("lora_dropout") or 0.0)}))
    for path, t in lora.items():
        state[f"{path}|lora_A"], state[f"{path}|lora_B"] = t["lora_A.weight"], t["lora_B.weight"]
    if bias:
        configs_b, state_b = _bias_in(model, bias)
        configs += configs_b
        state.update(state_b)
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


_IMPORTERS = {"LORA": _lora_in, "IA3": _ia3_in, "PROMPT_TUNING": _prompt_in, "PREFIX_TUNING": _prefix_in}



def load_values(task: Any, state: dict[str, torch.Tensor], where: str) -> None:
    """Copy imported tensors into a task's fresh deltas (keys ``<module path>|<parameter>``), every
    shape checked: a tensor that does not fit names itself and both shapes."""
    used = set()
    with torch.no_grad():
        for delta in task.deltas.values():
            targets = {"": delta} if not hasattr(delta, "sites") else {s.output: delta.site_modules[s.key] for s in delta.sites}
            for path, holder in targets.items():
                params = dict(holder.named_parameters())
                for key in [k for k in state if k.rsplit("|", 1)[0] == path]:
                    leaf = key.rsplit("|", 1)[1]
                    param = params.get(leaf) if leaf in params else params.get(f"deltas.{leaf}")
                    if param is None or key in used:
                        continue
                    value = state[key]
                    if tuple(value.shape) != tuple(param.shape):
                        raise CheckpointError(f"{where}: the tensor for {path or delta.config.method} {leaf} has shape "
                                              f"{tuple(value.shape)}, this backbone needs {tuple(param.shape)}: it was "
                                              "trained for another model")
                    param.copy_(value.to(param.dtype))
                    used.add(key)
    unused = sorted(set(state) - used)
    if unused:
        raise CheckpointError(f"{where}: tensors {unused[:3]} found no place in the imported delta")
