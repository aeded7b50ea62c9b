"""A short stream on the real MiniLM and real data: one LoRA per task learns each task, and the
old tasks' scores do not move at all. (Slow: sequential fine-tuning of the same backbone forgets.)"""

import numpy as np
import pytest
import torch

import adapters
from continual import TrainConfig, majority_rate, make_strategy, run_stream
from streams import TaskStream, builtin_task

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def stream():
    tasks = [builtin_task(n, seed=0, max_train=500, max_eval=120) for n in ("trec", "sms", "movie")]
    return TaskStream("mini", tasks)


def test_per_task_lora_on_real_minilm(stream, tmp_path):
    torch.set_num_threads(2)
    model = adapters.DeltaModel.from_pretrained()
    # the CLI's defaults: bf16 where the CPU has it, length buckets, fast dropout masks
    config = TrainConfig(max_steps=60, batch_size=16, max_length=48, eval_every=30, progress=False, precision="auto",
                         bucket=True, dropout_masks="fast")
    res = run_stream(stream, model, make_strategy("per-task", ["lora"]), config, tmp_path / "run")
    R = res.matrix.R
    for j, task in enumerate(stream):
        assert R[j, j] >= majority_rate(task.test) + 0.05 or R[j, j] >= 0.9, (task.name, R[j, j])
    assert res.metrics["BWT"] == 0.0 and res.metrics["forgetting"] == 0.0
    np.testing.assert_array_equal(R[-1, :-1], np.diag(R)[:-1])
    assert res.metrics["FWT"] == 0.0  # zero-init LoRA + the same seeded head: R[j-1, j] == b[j]
    assert (tmp_path / "run" / "checkpoints" / "sms" / "sms" / "delta.safetensors").exists()


@pytest.mark.slow
def test_sequential_fine_tuning_forgets_on_real_minilm(stream, tmp_path):
    torch.set_num_threads(2)
    model = adapters.DeltaModel.from_pretrained()
    config = TrainConfig(max_steps=150, batch_size=16, max_length=48, eval_every=50, progress=False)
    res = run_stream(stream, model, make_strategy("seq-ft"), config, tmp_path / "run")
    assert res.metrics["BWT"] < 0 and res.metrics["forgetting"] > 0, res.table()


@pytest.mark.slow
@pytest.mark.skipif(__import__("importlib").util.find_spec("avalanche") is None, reason="the [avalanche] extra is not installed")
def test_avalanche_replay_on_real_minilm_learns_each_task(stream, tmp_path):
    torch.set_num_threads(2)
    model = adapters.DeltaModel.from_pretrained()
    config = TrainConfig(max_steps=60, batch_size=16, max_length=48, eval_every=30, progress=False)
    res = run_stream(stream, model, make_strategy("avalanche-replay", mem_size=100), config, tmp_path / "run")
    R = res.matrix.R
    for j, task in enumerate(stream):
        assert R[j, j] >= majority_rate(task.test) + 0.05 or R[j, j] >= 0.9, (task.name, R[j, j])
    assert np.isfinite(res.metrics["BWT"]) and (tmp_path / "run" / "checkpoints" / "backbone.safetensors").exists()
