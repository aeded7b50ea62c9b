"""A stream logged to a real ``mlflow server`` on 127.0.0.1 (one worker), checked through MLflow's
client; the server is stopped by its pid."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from conftest import FAST, toy_stream
from continual import MLflowLogger, TrainConfig, make_strategy, run_stream


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def mlflow_server(tmp_path):
    mlflow_bin = shutil.which("mlflow") or os.path.join(os.path.dirname(sys.executable), "mlflow")
    port = free_port()
    cmd = [mlflow_bin, "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
           "--backend-store-uri", f"sqlite:///{tmp_path}/server.db", "--artifacts-destination", str(tmp_path / "artifacts")]
    log = open(tmp_path / "server.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 90
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"mlflow server did not start:\n{(tmp_path / 'server.log').read_text()[-3000:]}")
            time.sleep(0.5)
        yield url
    finally:
        os.kill(proc.pid, signal.SIGTERM)  # the parent stops its worker
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


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
    assert any((tmp_path / "artifacts").rglob("heatmap.png"))
