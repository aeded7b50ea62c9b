"""A stream logged to a real ``mlflow server`` on 127.0.0.1 (one worker), checked through MLflow's
client; the server is stopped by its pid."""


import pytest

from conftest import FAST, start_mlflow_server, stop_mlflow_server, toy_stream
from continual import MLflowLogger, TrainConfig, make_strategy, run_stream


@pytest.fixture
def mlflow_server(tmp_path):
    proc, url = start_mlflow_server(tmp_path, "server")
    try:
        yield url
    finally:
        stop_mlflow_server(proc)


def test_stream_logged_to_a_real_server(mlflow_server, text_model, tmp_path):
    from mlflow import MlflowClient

    config = TrainConfig(**{**FAST, "max_steps": 30})
    logger = MLflowLogger(mlflow_server, "server-test", "toy-on-server")
    res = run_stream(toy_stream(), text_model(), make_strategy("per-task", [{"method": "lora", "rank": 4}]), config,
                     tmp_path / "run", loggers=[logger])
    client = MlflowClient(mlflow_server)
    parent = client.get_run(res.tracking["parent_run_id"])
    assert parent.info.status == "FINISHED"
    assert parent.data.params["stream"] == "toy" and parent.data.params["backbone_name"] == "tiny-bert"
    assert parent.data.metrics["ACC"] == pytest.approx(res.metrics["ACC"])
    for i in range(3):
        for j in range(i + 1):
            assert parent.data.metrics[f"R.{i}.{j}"] == pytest.approx(res.matrix.R[i, j])
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {"heatmap.png", "matrix.csv", "results.json"}
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(c.info.run_name for c in children) == ["0-a", "1-b", "2-c"]
    for c in children:
        assert c.info.status == "FINISHED"
        assert client.get_metric_history(c.info.run_id, "train/loss")
        (ckpt,) = client.list_artifacts(c.info.run_id, "checkpoint")
        files = {a.path.rsplit("/", 1)[-1] for a in client.list_artifacts(c.info.run_id, ckpt.path)}
        assert files == {"delta.json", "delta.safetensors"}
    # the artifacts went through the server to its own store
    assert any((tmp_path / "server-artifacts").rglob("heatmap.png"))
