"""The examples keep working (run with a tiny backbone and few steps)."""

import importlib.util
from pathlib import Path

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
