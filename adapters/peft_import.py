"""Importing a HuggingFace PEFT adapter as a task of a :class:`~adapters.DeltaModel`: a LoRA,
AdaLoRA, (IA)^3, prompt- or prefix-tuning adapter from a directory or the hub becomes the same
delta here (:mod:`adapters.peft_types` reads each type; :mod:`adapters.peft_export` says which
forms match which, and where prefix tuning does not).

    model.import_peft("path/to/adapter", "reviews", label_names=["neg", "pos"])

Checked before anything is added: the files (our own export's checksums), that the adapter was
trained for this backbone (its recorded base model name and, for our own export, the backbone's
fingerprint; every module it names must exist and every tensor fit its shape), and that every
tensor finds its place. Anything else is a :class:`CheckpointError` naming the file or tensor.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from .fingerprint import backbone_fingerprint, json_digest, read_json, read_tensors, sha256_file
from .config import DeltaConfig
from .errors import BaseModelMismatch, CheckpointError, DeltaError
from .peft_export import CONFIG, HEAD, PREFIX_REASON, ROOT, SIDECAR, SIDECAR_FORMAT, WEIGHTS, rope_of
from .peft_types import IMPORTERS

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
    if peft_type not in IMPORTERS:
        raise CheckpointError(f"PEFT adapter type {peft_type} cannot become a delta here; supported: {', '.join(IMPORTERS)}")
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
        tensors = {k: v for k, v in tensors.items() if not _saved_head(k)}
    return IMPORTERS[peft_type](model, config, tensors)


# the heads PEFT's SEQ_CLS task type saves whole (transformers' *ForSequenceClassification names)
CLASSIFIER_HEADS = ("classifier", "score")


def _saved_head(key: str) -> bool:
    """Whether a saved tensor is such a head's: under ``base_model.model.`` (LoRA, (IA)^3) or, for
    prompt learning, whose PEFT model wraps the HF model directly, under ``base_model.``."""
    for root in (ROOT, "base_model."):
        if key.startswith(root):
            return key[len(root):].split(".")[0] in CLASSIFIER_HEADS
    return False


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
    # AdaLoRA's budget schedule only steers training; its rank_pattern (masks) already trimmed the tensors
    "ADALORA": {"r", "lora_alpha", "lora_dropout", "target_modules", "exclude_modules", "fan_in_fan_out", "bias",
                "init_lora_weights", "layers_to_transform", "layers_pattern", "rank_pattern", "megatron_core",
                "qalora_group_size", "init_r", "target_r", "tinit", "tfinal", "deltaT", "beta1", "beta2",
                "orth_reg_weight", "total_step", "ensure_weight_tying"},
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
