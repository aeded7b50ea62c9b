"""The examples keep working (run with a tiny backbone and few steps)."""

import importlib.util
from pathlib import Path

from test_cli import toy_yaml  # noqa: F401  (a fixture)

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_stream_from_csv_example(tmp_path, tiny_backbone_dir):
    example = load("stream_from_csv")
    metrics = example.main(["--work", str(tmp_path), "--backbone", str(tiny_backbone_dir), "--steps", "10"])
    assert set(metrics) == {"ACC", "BWT", "FWT", "forgetting"}
    assert metrics["BWT"] == 0.0
    assert sorted(p.name for p in (tmp_path / "data").glob("*.csv")) == ["amazon.csv", "sms.csv", "trec.csv"]
    assert (tmp_path / "run" / "results.json").exists()


def test_fuse_stream_example(tmp_path, tiny_backbone_dir):
    """A finished (toy) stream's deltas fused for a real low-resource target; the weights are plotted."""
    from conftest import toy_stream
    from continual import TrainConfig, make_strategy, run_stream
    import torch

    from adapters import DeltaModel

    run = tmp_path / "run"
    # the stream trains on the saved tiny backbone the example loads, seeded as `continual run` seeds it
    torch.manual_seed(0)
    model = DeltaModel.from_pretrained(str(tiny_backbone_dir))
    run_stream(toy_stream(), model, make_strategy("per-task", [{"method": "lora", "rank": 4}]),
               TrainConfig(max_steps=6, batch_size=8, eval_every=3, max_length=16, progress=False), run)
    example = load("fuse_stream")
    out = example.main(["--run", str(run), "--backbone", str(tiny_backbone_dir), "--target", "sms", "--max-train", "40",
                        "--steps", "8", "--max-length", "16", "--out", str(tmp_path / "fuse")])
    assert out["sources"] == ["a", "b", "c"] and out["train_examples"] == 40
    assert set(out["mean_fusion_weight"]) == {"a", "b", "c", "sms_own"}
    assert abs(sum(out["mean_fusion_weight"].values()) - 1.0) < 0.01
    assert 0.0 <= out["fusion_test_accuracy"] <= 1.0
    png = Path(out["files"][2])
    assert png.suffix == ".png" and png.stat().st_size > 1000


def test_avalanche_loop_example(toy_yaml, tiny_backbone_dir):
    """A stream exported as an Avalanche benchmark, trained and evaluated by Avalanche's own loop."""
    import pytest

    pytest.importorskip("avalanche", reason="the [avalanche] extra is not installed")
    out = load("avalanche_loop").main(["--stream", str(toy_yaml), "--backbone", str(tiny_backbone_dir), "--strategy", "LwF",
                                       "--max-length", "16", "--lr", "1e-3", "--quiet"])
    assert out["experiences"] == 3 and out["tasks"] == ["a", "b", "c"]
    accs = {k: v for k, v in out["metrics"].items() if k.startswith("Top1_Acc_Exp/eval_phase/test_stream")}
    assert len(accs) == 3 and all(0.0 <= v <= 1.0 for v in accs.values())
    assert 0.0 <= out["metrics"]["Top1_Acc_Stream/eval_phase/test_stream/Task002"] <= 1.0


def test_generative_stream_example(tmp_path, tiny_lm_dir):
    """The generative example on the tiny Llama LM and a toy generative YAML stream."""
    from conftest import toy_generative_stream

    rows = []
    for task in toy_generative_stream():
        frame = task.train.to_pandas()
        path = tmp_path / f"{task.name}.csv"
        frame[["text", "target"]].to_csv(path, index=False)
        rows.append(f"  - name: {task.name}\n    train: {path}\n    target_column: target\n")
    (tmp_path / "s.yaml").write_text("tasks:\n" + "".join(rows))
    out = load("generative_stream").main(["--backbone", str(tiny_lm_dir), "--stream", str(tmp_path / "s.yaml"),
                                          "--steps", "10", "--max-length", "32", "--work", str(tmp_path / "w")])
    assert set(out) == {"per-task", "seq-delta"} and out["per-task"]["BWT"] == 0.0
    assert (tmp_path / "w" / "seq-delta" / "results.json").exists()
