"""Shareable checkpoints: identical predictions after a round trip; bad files refused clearly."""

import json

import pytest
import torch

import adapters
from adapters import CheckpointError, load_task, save_task
from conftest import batch, method_config, supports, tiny_backbone
from test_methods import perturb

METHODS = adapters.available_methods()


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_round_trip_gives_identical_predictions(tmp_path, method, arch):
    if not supports(method, arch):
        pytest.skip("refused by design")
    model = adapters.DeltaModel(tiny_backbone(arch))
    model.add_task("t", [method_config(method), "bitfit"], label_names=["a", "b", "c"])
    perturb(model.task("t"), scale=0.2)
    model.freeze("t")
    model.activate("t")
    model.eval()
    inputs = batch()
    with torch.no_grad():
        expected = model(**inputs)
    save_task(model, "t", tmp_path / "ckpt")

    fresh = adapters.DeltaModel(tiny_backbone(arch))  # a newly loaded backbone
    name = load_task(fresh, tmp_path / "ckpt")
    fresh.activate(name)
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(**inputs), expected)
    assert fresh.task(name).label_names == ["a", "b", "c"]
    assert fresh.task(name).frozen


def saved(tmp_path, method="lora"):
    model = adapters.DeltaModel(tiny_backbone("bert"))
    model.add_task("t", method, num_labels=2)
    return model, save_task(model, "t", tmp_path / "ckpt")


def test_another_backbone_is_refused(tmp_path):
    _, path = saved(tmp_path)
    other = tiny_backbone("bert")
    with torch.no_grad():
        other.encoder.layer[0].attention.self.query.weight.add_(1.0)  # same shapes, other weights
    with pytest.raises(CheckpointError, match="another backbone"):
        load_task(adapters.DeltaModel(other), path)
    with pytest.raises(CheckpointError, match="another backbone"):
        load_task(adapters.DeltaModel(tiny_backbone("llama")), path)


def test_truncated_tensor_file_is_refused(tmp_path):
    model, path = saved(tmp_path)
    f = path / "delta.safetensors"
    f.write_bytes(f.read_bytes()[:-40])
    fresh = adapters.DeltaModel(tiny_backbone("bert"))
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_task(fresh, path)
    assert "t" not in fresh.tasks  # nothing half-added


def test_corrupt_json_and_missing_files(tmp_path):
    _, path = saved(tmp_path)
    fresh = adapters.DeltaModel(tiny_backbone("bert"))
    (path / "delta.json").write_text('{"format": "delta-continual/task-checkpoint", "ver')
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_task(fresh, path)
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_task(fresh, tmp_path / "nowhere")
    (path / "delta.json").write_text(json.dumps({"hello": 1}))
    with pytest.raises(CheckpointError, match="not a delta-continual"):
        load_task(fresh, path)


def test_checkpoint_with_bad_config_is_refused(tmp_path):
    from adapters.fingerprint import json_digest

    _, path = saved(tmp_path)
    meta = json.loads((path / "delta.json").read_text())
    meta["methods"][0]["rank"] = "eight"
    (path / "delta.json").write_text(json.dumps({**meta, "checksum": json_digest(meta)}))  # re-sealed: a bad writer
    fresh = adapters.DeltaModel(tiny_backbone("bert"))
    with pytest.raises(CheckpointError, match="invalid config"):
        load_task(fresh, path)
    assert not fresh.tasks


def test_an_edited_checkpoint_json_is_refused(tmp_path):
    # a LoRA alpha changed by hand (or by a damaged byte) loads the same tensors at another scale
    model, path = saved(tmp_path)
    meta = json.loads((path / "delta.json").read_text())
    assert meta["checksum"]
    meta["methods"][0]["alpha"] = meta["methods"][0]["alpha"] * 2
    (path / "delta.json").write_text(json.dumps(meta))
    fresh = adapters.DeltaModel(tiny_backbone("bert"))
    with pytest.raises(CheckpointError, match="delta.json does not match its checksum"):
        load_task(fresh, path)
    assert not fresh.tasks
    del meta["checksum"]  # a checkpoint from before checksums: still read
    meta["methods"][0]["alpha"] = meta["methods"][0]["alpha"] // 2
    (path / "delta.json").write_text(json.dumps(meta))
    assert load_task(fresh, path) == "t"


def test_existing_task_name_is_refused(tmp_path):
    model, path = saved(tmp_path)
    with pytest.raises(CheckpointError, match="already has a task 't'"):
        load_task(model, path)
    assert load_task(model, path, name="t2") == "t2"
    with pytest.raises(adapters.TaskError, match="invalid task name 't 3'"):  # not "the checkpoint has an invalid config"
        load_task(model, path, name="t 3")


def test_a_file_where_the_folder_goes_is_named(tmp_path):
    model, _ = saved(tmp_path)
    (tmp_path / "f").write_text("x")
    for where in (tmp_path / "f", tmp_path / "f" / "under"):  # mkdir said only "File exists"
        with pytest.raises(CheckpointError, match=f"{tmp_path / 'f'} is a file, not a directory"):
            save_task(model, "t", where)
    with pytest.raises(CheckpointError, match="as a PEFT adapter to"):  # the task is a LoRA
        model.export_peft("t", tmp_path / "f")
