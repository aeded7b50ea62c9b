"""The ``continual`` command line: run / report / list, errors, and resuming a run killed with
SIGKILL in a real subprocess."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import toy_rows
from continual.cli import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def toy_yaml(tmp_path):
    tasks = []
    for name, key, seed in (("a", "apple", 1), ("b", "river", 2), ("c", "music", 3)):
        lines = ["text,label"] + [f"{t},{'yes' if y else 'no'}" for t, y in toy_rows(key, seed, 160)]
        (tmp_path / f"{name}.csv").write_text("\n".join(lines) + "\n")
        tasks.append({"name": name, "train": f"{name}.csv"})
    path = tmp_path / "toy.yaml"
    path.write_text(yaml.safe_dump({"name": "toy", "tasks": tasks}))
    return path


def args(toy_yaml, backbone, out, *extra):
    return ["run", "--stream", str(toy_yaml), "--backbone", str(backbone), "--method", "lora:rank=4", "--steps", "60",
            "--eval-every", "20", "--max-length", "16", "--lr", "1e-2", "--head-lr", "1e-2", "--no-progress",
            "--out", str(out), *extra]


def test_run_then_report_from_directory_and_mlflow(toy_yaml, tiny_backbone_dir, tmp_path, capsys):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    assert main(args(toy_yaml, tiny_backbone_dir, tmp_path / "out", "--tracking-uri", uri, "--run-name", "cli-toy")) == 0
    out = capsys.readouterr().out
    assert "accuracy matrix R[i, j]" in out and "BWT=+0.0000" in out and f"mlflow ui --backend-store-uri {uri}" in out
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["matrix"]["tasks"] == ["a", "b", "c"] and results["metrics"]["BWT"] == 0.0
    assert (tmp_path / "out" / "heatmap.png").stat().st_size > 1000
    # the same run without the task id: printed, saved, and in results.json
    assert "without the task id (mahalanobis router" in out and "routing=" in out
    A = np.array(results["matrix"]["R_agnostic"], dtype=float)
    assert not np.isnan(np.diag(A)).any() and results["metrics"]["ACC_agnostic"] == pytest.approx(np.mean(A[-1]))
    assert (tmp_path / "out" / "matrix_agnostic.csv").read_text().splitlines()[0] == "after,a,b,c"
    assert (tmp_path / "out" / "heatmap_agnostic.png").stat().st_size > 1000

    assert main(["report", str(tmp_path / "out"), "--plot", str(tmp_path / "p.png")]) == 0
    shown = capsys.readouterr().out
    assert "toy / per-task" in shown and "untrained (b)" in shown and (tmp_path / "p.png").exists()
    assert "without the task id (mahalanobis router):" in shown and (tmp_path / "p_agnostic.png").exists()
    (tmp_path / "a-file").write_text("x")  # a plot path under a file: refused first, not a traceback after
    assert main(["report", str(tmp_path / "out"), "--plot", str(tmp_path / "a-file" / "p.png")]) == 2
    assert f"{tmp_path / 'a-file'} is a file, not a directory; give another --plot" in capsys.readouterr().err
    for bad in ("p.txt", "p"):  # matplotlib refused .txt after the tables were printed; wrote p.png for "p"
        assert main(["report", str(tmp_path / "out"), "--plot", str(tmp_path / bad)]) == 2
        said = capsys.readouterr()
        assert "give a picture file name ending in one of" in said.err and not said.out and not (tmp_path / "p.png.png").exists()
    # the same run read back from MLflow, by run name and by run id
    assert main(["report", "cli-toy", "--tracking-uri", uri, "--json", "--plot", str(tmp_path / "q.png")]) == 0
    from_mlflow = json.loads(capsys.readouterr().out)  # stdout is the JSON alone
    assert from_mlflow == results["metrics"]
    assert main(["report", results["tracking"]["parent_run_id"], "--tracking-uri", uri, "--json",
                 "--plot", str(tmp_path / "r.png")]) == 0
    assert "Downloading artifacts" not in capsys.readouterr().err  # MLflow's bar for one small file
    # a task's step run (nested) is no stream run: by id it is said so, naming the stream run; by
    # name the nested runs are not candidates (they were: "no results.json (unfinished?)")
    import mlflow

    step = mlflow.MlflowClient(uri).search_runs([mlflow.MlflowClient(uri).get_run(results["tracking"]["parent_run_id"]).info
                                                 .experiment_id], "tags.mlflow.parentRunId != ''")[0]
    assert main(["report", step.info.run_id, "--tracking-uri", uri, "--plot", str(tmp_path / "s.png")]) == 2
    assert f"is nested in run {results['tracking']['parent_run_id']}" in capsys.readouterr().err
    assert main(["report", step.info.run_name, "--tracking-uri", uri, "--plot", str(tmp_path / "s.png")]) == 2
    assert "is neither a run directory nor an MLflow run id / name" in capsys.readouterr().err
    # the store's copy is verified as the folder's is: an edited number is refused, not reported
    copy = tmp_path / "mlartifacts" / results["tracking"]["parent_run_id"] / "artifacts" / "results.json"
    edited = json.loads(copy.read_text())
    edited["metrics"]["ACC"] = 0.123
    copy.write_text(json.dumps(edited))
    assert main(["report", "cli-toy", "--tracking-uri", uri, "--json", "--plot", str(tmp_path / "q.png")]) == 2
    assert "is damaged or was edited in the store (it does not match its checksum)" in capsys.readouterr().err
    capsys.readouterr()
    # resumed with another store, where its MLflow run is not: refused before anything loads (it had
    # trained on with logging stopped at the first task)
    other = f"sqlite:///{tmp_path}/other.db"
    assert main(args(toy_yaml, tiny_backbone_dir, tmp_path / "out", "--tracking-uri", other, "--resume")) == 2
    assert f"logs to MLflow run {results['tracking']['parent_run_id']} in {uri}, not in {other}" in capsys.readouterr().err
    assert not (tmp_path / "other.db").exists()


def test_errors_are_clear_and_exit_2(toy_yaml, tiny_backbone_dir, tmp_path, capsys):
    assert main(["run", "--stream", str(tmp_path / "missing.yaml"), "--no-mlflow"]) == 2
    assert "missing.yaml: stream file not found" in capsys.readouterr().err
    assert main(args(toy_yaml, tmp_path / "no-model", tmp_path / "o", "--no-mlflow")) == 2
    assert "no-model" in capsys.readouterr().err
    assert main(args(toy_yaml, tiny_backbone_dir, tmp_path / "o", "--no-mlflow", "--method", "lora:rnak=4")) == 2
    assert "rnak" in capsys.readouterr().err
    assert main(["report", str(tmp_path)]) == 2
    assert "not a stream run directory" in capsys.readouterr().err
    # a negative seed: refused by name before a stream is drawn (numpy's own message names nothing)
    with pytest.raises(SystemExit) as exit_:  # argparse's own exit
        main(args(toy_yaml, tiny_backbone_dir, tmp_path / "s", "--no-mlflow", "--seed", "-5"))
    assert exit_.value.code == 2
    assert "argument --seed: the seed must be an integer in [0, 4294967295], got -5" in capsys.readouterr().err
    for value in ("0", "-3"):  # "use 0 for none" was said of -3, and 0 then refused
        with pytest.raises(SystemExit):
            main(["export", str(tmp_path), "--out", str(tmp_path / "e"), "--max-lora-rank", value])
        err = capsys.readouterr().err
        assert f"argument --max-lora-rank: must be at least 1, got {value}" in err and "use 0" not in err
    assert main(["compare", "--stream", str(toy_yaml), "--backbone", str(tiny_backbone_dir), "--seeds", "0,-1",
                 "--out", str(tmp_path / "c"), "--no-mlflow"]) == 2
    assert "each of --seeds must be an integer in [0, 4294967295], got -1" in capsys.readouterr().err
    # --seed beside --seeds was dropped without a word (the report named seeds the user did not ask for)
    assert main(["compare", "--stream", str(toy_yaml), "--backbone", str(tiny_backbone_dir), "--seeds", "0",
                 "--seed", "5", "--out", str(tmp_path / "c"), "--no-mlflow"]) == 2
    assert "give --seed or --seeds, not both: --seeds 0 sets every run's seed" in capsys.readouterr().err
    for flag in ("--experiment", "--run-name"):  # MLflow refused an empty experiment once the run had trained
        with pytest.raises(SystemExit):
            main(args(toy_yaml, tiny_backbone_dir, tmp_path / "e", flag, " "))
        assert f"argument {flag}: must not be empty" in capsys.readouterr().err
    for empty in ("", ",", " "):  # an unset shell variable: it ran the default seed alone, without a word
        assert main(["compare", "--stream", str(toy_yaml), "--backbone", str(tiny_backbone_dir), "--seeds", empty,
                     "--out", str(tmp_path / "c"), "--no-mlflow"]) == 2
        assert f"--seeds needs at least one integer, e.g. 0,1,2; got {empty!r}" in capsys.readouterr().err
    assert not (tmp_path / "s").exists() and not (tmp_path / "c").exists()
    # a tracking URI no MLflow store serves (a typo of the scheme): refused before anything runs,
    # where the run used to go on untracked and point at a sync that fails the same way
    assert main(args(toy_yaml, tiny_backbone_dir, tmp_path / "t", "--tracking-uri", "sqlit:///x.db")) == 2
    assert "tracking URI 'sqlit:///x.db': MLflow has no tracking store for its scheme" in capsys.readouterr().err
    assert not (tmp_path / "t").exists()


def test_ambiguous_options_and_textless_lengths_are_refused(toy_yaml, tiny_backbone_dir, tmp_path, capsys):
    # each of these used to run and exit 0: a key given twice kept one value silently, a 'method'
    # option replaced the method named before the colon, and a max_length at or below the
    # tokenizer's special tokens gave examples with no text (2) or, below that, no truncation (1)
    bad = {("--method", "lora:rank=8,rank=4"): "option 'rank' is given twice",
           ("--method", "lora:method=bitfit"): "'method' is not an option",
           ("--strategy", "ewc", "--strategy-option", "ewc_lambda=1", "--strategy-option", "ewc_lambda=2"):
               "option 'ewc_lambda' is given twice",
           ("--strategy", "replay", "--strategy-option", "memory_size="): "option 'memory_size' has no value",
           ("--method", "lora:rank="): "option 'rank' has no value",
           ("--max-length", "1"): "max_length 1 leaves no room for text",
           ("--max-length", "2"): "adds 2 special tokens to every example; use a max_length of at least 3"}
    for i, (extra, message) in enumerate(bad.items()):
        assert main(args(toy_yaml, tiny_backbone_dir, tmp_path / f"o{i}", "--no-mlflow", *extra)) == 2, extra
        assert message in capsys.readouterr().err, extra
        assert not (tmp_path / f"o{i}").exists()
    assert main(["compare", "--stream", str(toy_yaml), "--backbone", str(tiny_backbone_dir), "--entry",
                 "per-task:lora:rank=4,rank=2", "--out", str(tmp_path / "c"), "--no-mlflow"]) == 2
    assert "option 'rank' is given twice" in capsys.readouterr().err
    # an empty value was read as None: the study started, and every run failed with a TypeError
    assert main(["compare", "--stream", str(toy_yaml), "--backbone", str(tiny_backbone_dir), "--entry",
                 "replay@memory_size=:lora", "--out", str(tmp_path / "e"), "--no-mlflow"]) == 2
    assert "option 'memory_size' has no value" in capsys.readouterr().err and not (tmp_path / "e").exists()


def test_list_and_help(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for word in ("lora", "bottleneck", "per-task", "seq-ft", "default", "sentiment-domains", "minilm"):
        assert word in out
    # every strategy that takes options shows them (per-task-fusion's and seq-ft's were missing)
    lines = {line.split()[0]: line for line in out.splitlines() if line.startswith("  ")}
    assert "temperature=1.0" in lines["per-task-fusion"] and "backbone_lr=5e-05" in lines["seq-ft"]
    assert "(encoders and T5 only)" in lines["coda_prompt"] and "only" not in lines["lora"]  # capabilities.decoders
    from fusion.routing import ROUTERS

    assert all(name in lines for name in ROUTERS) and lines["mahalanobis"].endswith("(default)")
    assert "(default)" not in lines["perplexity"]
    for cmd in ("run", "report", "list"):
        with pytest.raises(SystemExit) as e:
            main([cmd, "--help"])
        assert e.value.code == 0
    assert "--resume" in capsys.readouterr().out


def test_sigkilled_run_resumes_to_the_same_matrix(toy_yaml, tiny_backbone_dir, tmp_path, capsys):
    killed = tmp_path / "killed"
    cmd = [sys.executable, "-m", "continual", *args(toy_yaml, tiny_backbone_dir, killed, "--no-mlflow", "--patience", "0",
                                                     "--steps", "150")]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    state = killed / "state.json"
    deadline = time.time() + 180
    try:
        while time.time() < deadline and proc.poll() is None:
            if state.exists() and json.loads(state.read_text() or "{}").get("done") == [0]:
                os.kill(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.05)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    assert not (killed / "results.json").exists()
    assert main(["report", str(killed), "--plot", str(tmp_path / "partial.png")]) == 0  # what is done so far
    assert "toy / per-task (unfinished)" in capsys.readouterr().out
    # --json is strict JSON on stdout alone: metrics of rows not reached are null, not the NaN token
    assert main(["report", str(killed), "--json", "--plot", str(tmp_path / "partial.png")]) == 0
    shown = capsys.readouterr()
    partial = json.loads(shown.out, parse_constant=lambda c: pytest.fail(f"{c} in --json output"))
    assert partial["ACC"] is None and "is unfinished" in shown.err and "heatmap: " in shown.err
    assert main(args(toy_yaml, tiny_backbone_dir, killed, "--no-mlflow", "--patience", "0", "--steps", "150", "--resume")) == 0
    assert f"resuming {killed}: 1/3 stream steps done" in capsys.readouterr().out
    # --resume where no run is (a mistyped --out) starts one, and says so
    assert main(args(toy_yaml, tiny_backbone_dir, tmp_path / "full", "--no-mlflow", "--patience", "0", "--steps", "150",
                     "--resume")) == 0
    assert f"{tmp_path / 'full'} holds no run to resume: starting it from the first task" in capsys.readouterr().out
    a, b = (json.loads((d / "results.json").read_text()) for d in (killed, tmp_path / "full"))
    assert [s["tasks"] for s in a["steps"]] == [["a"], ["b"], ["c"]]
    np.testing.assert_array_equal(np.array(a["matrix"]["R"], dtype=float), np.array(b["matrix"]["R"], dtype=float))
    assert a["metrics"] == b["metrics"]


def test_route_command_on_a_finished_run(toy_yaml, tiny_backbone_dir, tmp_path, capsys):
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    out = tmp_path / "out"
    assert main(args(toy_yaml, tiny_backbone_dir, out, "--tracking-uri", uri)) == 0
    capsys.readouterr()
    assert main(["route", str(out), "--backbone", str(tiny_backbone_dir), "--router", "prototype"]) == 0
    printed = capsys.readouterr().out
    routing = json.loads((out / "routing.json").read_text())["prototype"]
    results = json.loads((out / "results.json").read_text())
    assert routing["oracle_ACC"] == pytest.approx(results["metrics"]["ACC"])  # true task: the stream's own ACC
    sizes = [t["sizes"]["test"] for t in yaml.safe_load((out / "stream.yaml").read_text())["tasks_resolved"]]
    assert np.asarray(routing["confusion"]).sum(1).tolist() == sizes
    assert f"| prototype | {routing['routing_accuracy']:.3f} |" in printed
    # the files and the MLflow run are said after the tables (the run's id came first, before them)
    assert printed.rstrip().splitlines()[-1].startswith(f"files: {out / 'routing-prototype.md'}")
    assert printed.index("| prototype | ") < printed.index("(nested under the stream's run)")
    assert (out / "routing-prototype.png").stat().st_size > 1000
    client = MlflowClient(uri)
    parent = results["tracking"]["parent_run_id"]
    child = client.search_runs([client.get_run(parent).info.experiment_id], "tags.kind = 'routing'")[0]
    assert child.data.tags["mlflow.parentRunId"] == parent
    assert child.data.metrics["routing_accuracy/prototype"] == pytest.approx(routing["routing_accuracy"])
    # --fit-max 0 means no cap (it fitted on no example and failed in torch.cat): the same routing;
    # without --backbone, the one the run's checkpoints name (it loaded MiniLM and refused the run)
    assert main(["route", str(out), "--router", "prototype", "--fit-max", "0"]) == 0
    assert json.loads((out / "routing.json").read_text())["prototype"]["routing_accuracy"] == routing["routing_accuracy"]
    # a store that does not hold the run: the files are written, the warning says what to do (it
    # said only "Run with id=... not found")
    other = f"sqlite:///{tmp_path}/other.db"
    capsys.readouterr()
    assert main(["route", str(out), "--router", "prototype", "--tracking-uri", other]) == 0
    assert f"{other} does not hold this run (it was logged to {uri}); upload it there first: continual sync" in capsys.readouterr().err
    # a directory that holds no finished run is refused with the reason
    assert main(["route", str(tmp_path / "nope"), "--backbone", str(tiny_backbone_dir)]) == 2
    assert "not a finished stream run" in capsys.readouterr().err
    # a router named twice was fitted and scored twice, into the same files and two table rows
    assert main(["route", str(out), "--router", "linear", "--router", "linear"]) == 2
    assert "routers ['linear'] are given more than once" in capsys.readouterr().err


def test_route_scores_every_router_that_can_route_the_run(toy_yaml, tiny_backbone_dir, tmp_path, capsys, monkeypatch):
    from fusion.perplexity import PerplexityRouter

    out = tmp_path / "out"
    assert main(args(toy_yaml, tiny_backbone_dir, out, "--no-mlflow")) == 0
    results = json.loads((out / "results.json").read_text())
    assert main(["route", str(out), "--no-progress"]) == 0
    routing = json.loads((out / "routing.json").read_text())
    assert list(routing) == ["prototype", "linear", "mahalanobis", "perplexity"]
    assert routing["perplexity"]["oracle_ACC"] == pytest.approx(results["metrics"]["ACC"])
    assert f"| perplexity | {routing['perplexity']['routing_accuracy']:.3f} |" in capsys.readouterr().out
    # where it cannot route the run (a T5 generative run), the default leaves it out and naming it is refused
    monkeypatch.setattr(PerplexityRouter, "refusal", staticmethod(lambda generative, encoder_decoder: "it cannot, here"))
    assert main(["route", str(out), "--no-progress"]) == 0
    assert list(json.loads((out / "routing.json").read_text())) == ["prototype", "linear", "mahalanobis"]
    assert main(["route", str(out), "--router", "perplexity"]) == 2
    assert "perplexity: it cannot, here; route with another --router" in capsys.readouterr().err


def test_transfer_matrix_command(toy_yaml, tiny_backbone_dir, tmp_path, capsys):
    """The toy tasks share labels (no/yes): every pair is comparable; the diagonal is 1 and equals
    the stream's own final scores; a task's head on another's data is scored as it is."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    out = tmp_path / "out"
    assert main(args(toy_yaml, tiny_backbone_dir, out, "--tracking-uri", uri)) == 0
    capsys.readouterr()
    assert main(["transfer", str(out)]) == 0  # the backbone the run's checkpoints name
    printed = capsys.readouterr().out
    rows = [line.split(",") for line in (out / "transfer.csv").read_text().splitlines()[1:]]
    assert len(rows) == 9
    final = json.loads((out / "results.json").read_text())["matrix"]["R"][-1]
    acc = {(s, t): float(a) for s, t, a, _ in rows}
    for j, t in enumerate("abc"):
        assert acc[(t, t)] == pytest.approx(final[j])
    rel = {(s, t): float(r) for s, t, _, r in rows}
    assert rel[("a", "b")] == pytest.approx(acc[("a", "b")] / acc[("b", "b")])
    assert "| a | 1.000" in printed and (out / "transfer.png").stat().st_size > 1000
    client = MlflowClient(uri)
    child = client.search_runs([client.get_experiment_by_name("continual").experiment_id], "tags.kind = 'transfer'")[0]
    assert child.data.metrics["relative/a/b"] == pytest.approx(rel[("a", "b")])


def test_compare_command_writes_a_report(toy_yaml, tiny_backbone_dir, tmp_path, capsys):
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    out = tmp_path / "cmp"
    common = ["compare", "--stream", str(toy_yaml), "--backbone", str(tiny_backbone_dir), "--entry", "per-task:lora:rank=4",
              "--entry", "seq-ft", "--steps", "20", "--eval-every", "10", "--max-length", "16", "--no-progress",
              "--out", str(out), "--tracking-uri", uri]
    assert main(common) == 0
    printed = capsys.readouterr().out
    rows = json.loads((out / "report.json").read_text())["rows"]
    lora = "per-task-lora(rank=4)"  # the label carries the method's options (rank 8 is the default)
    assert list(rows) == [lora, "seq-ft"]
    own = json.loads((out / lora / "results.json").read_text())
    assert rows[lora]["ACC"] == own["metrics"]["ACC"] and rows[lora]["BWT"] == 0.0
    assert rows["seq-ft"]["trainable_params_per_task"] > 100 * rows[lora]["trainable_params_per_task"]
    assert rows[lora]["delta_bytes_on_disk"] > 0
    # seq-ft's "delta" is the whole fine-tuned backbone (saved with the run), not just its heads
    backbone_bytes = (out / "seq-ft" / "checkpoints" / "backbone.safetensors").stat().st_size
    assert rows["seq-ft"]["delta_bytes_on_disk"] > backbone_bytes > 10 * rows[lora]["delta_bytes_on_disk"]
    assert f"| {lora} | " in printed and (out / "report.png").stat().st_size > 1000
    for command in (["report", str(out)], ["route", str(out)], ["export", str(out), "--out", str(tmp_path / "x")]):
        assert main(command) == 2  # the study's folder given for one run: said so, with where its runs are
        assert f"is a compare study's folder, not one run: its report is {out / 'report.md'}" in capsys.readouterr().err
    assert "ACC, no task id" in printed and rows[lora]["ACC_agnostic"] == own["metrics"]["ACC_agnostic"]
    assert 0 <= rows["seq-ft"]["routing_accuracy"] <= 1
    # each entry's mean score over the tasks seen after each task, with and without the task id,
    # drawn one line per entry and logged one step per task
    R = np.array(own["matrix"]["R"], dtype=float)
    assert rows[lora]["ACC_curve"] == pytest.approx([R[i, : i + 1].mean() for i in range(3)])
    assert rows[lora]["ACC_curve"][-1] == pytest.approx(rows[lora]["ACC"])
    assert rows[lora]["ACC_agnostic_curve"][-1] == pytest.approx(rows[lora]["ACC_agnostic"])
    assert (out / "curves.png").stat().st_size > 1000
    assert "| method | 1 | 2 | 3 |" in printed  # and as numbers in the report
    assert f"| {lora} | " + " | ".join(f"{v:.4f}" for v in rows[lora]["ACC_curve"]) + " |" in printed
    client = MlflowClient(uri)
    run = client.search_runs([client.get_experiment_by_name("continual").experiment_id], "tags.kind = 'compare'")[0]
    assert run.data.metrics["ACC/seq-ft"] == pytest.approx(rows["seq-ft"]["ACC"])
    assert run.data.tags["router"] == "mahalanobis" and rows["seq-ft"]["router"] == "mahalanobis"
    history = client.get_metric_history(run.info.run_id, f"ACC_curve/{lora}".replace("(", "_").replace(")", "_").replace("=", "_"))
    assert [(m.step, m.value) for m in history] == [(i + 1, pytest.approx(v)) for i, v in enumerate(rows[lora]["ACC_curve"])]
    assert "curves.png" in [f.path.split("/")[-1] for f in client.list_artifacts(run.info.run_id, "compare")]
    streams = client.search_runs([run.info.experiment_id], "attributes.run_name = 'compare-toy-seq-ft'")
    assert streams and streams[0].data.metrics["ACC"] == pytest.approx(rows["seq-ft"]["ACC"])  # each entry logged too
    mtime = (out / "seq-ft" / "results.json").stat().st_mtime
    assert main(common) == 0  # finished entries are reused, not rerun
    assert (out / "seq-ft" / "results.json").stat().st_mtime == mtime
    # ... but only when made with the same settings: reused on the folder's name alone, a re-run
    # with other steps printed the old numbers
    assert main([*common, "--steps", "10"]) == 2
    assert "holds a different run (differs in: train.max_steps: 20 there, 10 now); give compare another --out" in capsys.readouterr().err
    # two entries of one method with other options are two rows, where one used to replace the other
    two = ["--entry", "per-task:lora:rank=2", "--entry", "per-task:lora:rank=4"]
    assert main(common[:5] + two + common[9:]) == 0
    rows = json.loads((out / "report.json").read_text())["rows"]
    assert list(rows) == ["per-task-lora(rank=2)", lora]
    assert rows["per-task-lora(rank=2)"]["trainable_params_per_task"] < rows[lora]["trainable_params_per_task"]
    capsys.readouterr()
    assert main(common[:5] + ["--entry", "per-task:lora", "--entry", "per-task:lora:rank=8"] + common[9:]) == 2
    said = capsys.readouterr()  # refused before the stream is drawn and the pool announced
    assert "entries ['per-task-lora'] are given more than once" in said.err and "entries x" not in said.out
    assert main(common[:5] + ["--entry", "nope"]) == 2
    assert "unknown strategy 'nope'" in capsys.readouterr().err
    # a killed entry resumes its MLflow run, so only in the store it was started with
    (out / "seq-ft" / "results.json").unlink()
    assert main([*common[:-1], f"sqlite:///{tmp_path}/other.db"]) == 2
    assert f"logs to MLflow run {streams[0].info.run_id} in {uri}" in capsys.readouterr().err


def test_an_entry_gives_the_same_matrix_in_compare_as_in_run(toy_yaml, tiny_backbone_dir, tmp_path):
    """Every training command takes the same options with the same defaults (formerly compare
    trained in fp32 without buckets where run used bf16 and buckets: other numbers, said nowhere)."""
    common = ["--stream", str(toy_yaml), "--backbone", str(tiny_backbone_dir), "--steps", "20", "--eval-every", "10",
              "--max-length", "16", "--no-progress", "--no-mlflow"]
    assert main(["run", "--method", "lora:rank=4", "--out", str(tmp_path / "run"), *common]) == 0
    assert main(["compare", "--entry", "per-task:lora:rank=4", "--out", str(tmp_path / "cmp"), *common]) == 0
    ran = json.loads((tmp_path / "run" / "results.json").read_text())
    compared = json.loads((tmp_path / "cmp" / "per-task-lora(rank=4)" / "results.json").read_text())
    assert ran["identity"]["train"] == compared["identity"]["train"]
    for key in ("R", "F1", "b", "b_f1", "R_agnostic", "routing"):
        assert ran["matrix"][key] == compared["matrix"][key], key


def test_output_piped_into_a_reader_that_leaves_is_no_traceback():
    """`continual list | head -1`: the reader closes the pipe; the command stops as `cat` would
    (exit 141, nothing on stderr), not with a BrokenPipeError traceback."""
    proc = subprocess.Popen([sys.executable, "-m", "continual", "list"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    proc.stdout.close()  # before the command prints anything (it is still importing)
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141, err
    assert "Traceback" not in err and "BrokenPipe" not in err


def test_report_of_a_mistyped_run_folder_makes_no_store(tmp_path, capsys, monkeypatch):
    """A name that is no folder is looked up in MLflow; a SQLite store that is not there was
    created (an empty mlflow.db in the working directory) to find nothing in it."""
    monkeypatch.chdir(tmp_path)
    assert main(["report", "runs/typo"]) == 2
    assert ("'runs/typo' is not a run directory, and there is no MLflow store at sqlite:///mlflow.db (no file "
            "mlflow.db)") in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_compare_entry_with_strategy_options_after_its_methods_names_the_order():
    """``ewc:lora@ewc_lambda=1e3`` read '@...' as part of the method's name: "unknown delta method"."""
    from continual.studies.compare import parse_entry

    with pytest.raises(ValueError, match="before the methods: ewc@ewc_lambda=1e3:lora"):
        parse_entry("ewc:lora@ewc_lambda=1e3")
    with pytest.raises(ValueError, match="names no method after ':'"):
        parse_entry("per-task:")
    entry = parse_entry("ewc@ewc_lambda=1e3:lora:rank=4")
    assert entry.options == {"ewc_lambda": 1000.0} and entry.methods[0].rank == 4


def test_transfer_ratio_to_a_target_scoring_zero_is_no_number():
    """accuracy / 0 was inf (a 'relative performance' of inf), and 0 / 0 a NaN shown as the empty
    cell that means "label spaces differ"."""
    from continual.studies.transfer import TransferMatrix

    matrix = TransferMatrix(["a", "b"], np.array([[0.0, 0.5], [0.25, 0.8]]))
    assert np.isnan(matrix.relative[:, 0]).all() and matrix.relative[0, 1] == pytest.approx(0.625)
    assert "| b | - (0.250) | 1.000 (0.800) |" in matrix.table()


def test_comparison_bars_carry_one_std_whiskers_when_seeds_give_them(tmp_path, monkeypatch):
    from matplotlib.container import BarContainer

    from continual import plots

    drawn = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: drawn.append(fig) or Path(path))
    one = {"ACC": 0.8, "BWT": -0.1}
    seeds = {"ACC": 0.7, "ACC_std": 0.05, "BWT": -0.2, "BWT_std": 0.02}
    plots.metric_bars({"one-seed": one, "two-seeds": seeds}, ("ACC", "BWT"), tmp_path / "r.png")
    ax = drawn[0].axes[0]
    bars = [c for c in ax.containers if isinstance(c, BarContainer)]
    assert [b.errorbar is None for b in bars] == [True, False]  # a single seed has no spread to draw
    segments = bars[1].errorbar.lines[2][0].get_segments()
    assert [round(float(s[1][1] - s[0][1]), 6) for s in segments] == [0.1, 0.04]  # ± one std
    assert "one std over seeds" in ax.get_title()
    plots.metric_bars({"one-seed": one}, ("ACC", "BWT"), tmp_path / "s.png")
    assert "std" not in drawn[1].axes[0].get_title()


def test_accuracy_curves_over_seeds_and_a_run_scored_only_at_its_end(tmp_path, monkeypatch):
    """The curve is the mean over the tasks seen after each row (NaN where a row was not scored, as
    joint's); over seeds point by point, with a one-std band; a panel without the task id only
    where a row has that curve."""
    from continual import plots
    from continual.metrics import accuracy_curve
    from continual.studies.compare import mean_row

    R = np.array([[0.9, 0.1, 0.2], [0.5, 0.8, 0.3], [0.4, 0.6, 0.7]])
    assert accuracy_curve(R) == pytest.approx([0.9, 0.65, 1.7 / 3])
    joint = np.full((3, 3), np.nan)
    joint[2] = [0.8, 0.7, 0.6]
    assert np.isnan(accuracy_curve(joint)[:2]).all() and accuracy_curve(joint)[2] == pytest.approx(0.7)
    base = {"ACC": 0.5, "BWT": 0.0, "FWT": 0.0, "forgetting": 0.0, "ACC_agnostic": 0.5, "BWT_agnostic": 0.0,
            "forgetting_agnostic": 0.0, "routing_accuracy": 1.0, "trainable_params_per_task": 10,
            "delta_bytes_on_disk": 1, "wall_seconds": 1.0}
    rows = [{**base, "ACC_curve": [0.9, 0.6], "ACC_agnostic_curve": [None, 0.5]},
            {**base, "ACC_curve": [0.7, 0.4], "ACC_agnostic_curve": [None, 0.3]}]
    mean = mean_row(rows)
    assert mean["ACC_curve"] == pytest.approx([0.8, 0.5]) and mean["ACC_curve_std"] == pytest.approx([0.02 ** 0.5] * 2)
    assert mean["ACC_agnostic_curve"][0] is None and mean["ACC_agnostic_curve"][1] == pytest.approx(0.4)
    drawn = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: drawn.append(fig) or Path(path))
    plots.accuracy_curves({"two-seeds": mean, "one": rows[0]}, tmp_path / "c.png")
    left, right = drawn[0].axes
    assert [list(line.get_ydata()) for line in left.get_lines()] == [pytest.approx([0.8, 0.5]), pytest.approx([0.9, 0.6])]
    assert len(left.collections) == 1 and "without the task id" in right.get_title()  # one band: the seeds' row
    plots.accuracy_curves({"one": {**rows[0], "ACC_agnostic_curve": [None, None]}}, tmp_path / "d.png")
    assert len(drawn[1].axes) == 1
    from continual.studies.compare import report_markdown

    text = report_markdown("s", {"two-seeds": mean, "one": rows[0]})
    assert "| two-seeds | 0.8000 ± 0.1414 | 0.5000 ± 0.1414 |" in text and "| one | 0.9000 | 0.6000 |" in text
    assert "| two-seeds | n/a | 0.4000 ± 0.1414 |" in text  # without the task id: its first point is not there
    assert "without the task id (a router, fitted" in text  # rows that do not say which router
    named = [{**r, "router": "mahalanobis"} for r in rows]
    assert mean_row(named)["router"] == "mahalanobis"
    assert "without the task id (the mahalanobis router, fitted" in report_markdown("s", {"m": mean_row(named)})


def test_a_plus_joined_method_is_the_same_combination_as_repeated_methods(toy_yaml, tiny_backbone_dir, tmp_path):
    """``--method lora+bitfit`` was "unknown delta method 'lora+bitfit'", where combine, compare
    and the run's own folder name spell a combination that way."""
    common = ["--stream", str(toy_yaml), "--backbone", str(tiny_backbone_dir), "--steps", "4", "--eval-every", "4",
              "--max-length", "16", "--no-progress", "--no-mlflow"]
    assert main(["run", "--method", "lora:rank=4+bitfit", "--out", str(tmp_path / "joined"), *common]) == 0
    assert main(["run", "--method", "lora:rank=4", "--method", "bitfit", "--out", str(tmp_path / "repeated"), *common]) == 0
    joined, repeated = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("joined", "repeated"))
    assert joined["identity"]["train"] == repeated["identity"]["train"]
    assert "bitfit" in json.dumps(joined["identity"]) and joined["matrix"]["R"] == repeated["matrix"]["R"]


def test_no_progress_silences_the_backbone_loading_bar(toy_yaml, tiny_backbone_dir, tmp_path, capsys):
    """transformers draws a "Loading weights" bar as it loads the backbone: with --no-progress it went
    to the log all the same. The flag leaves the bars on after the command, as it found them."""
    common = ["run", "--stream", str(toy_yaml), "--backbone", str(tiny_backbone_dir), "--steps", "1", "--eval-every", "1",
              "--max-length", "16", "--no-mlflow"]
    from transformers.utils import logging as hf_logging

    assert hf_logging.is_progress_bar_enabled()
    assert main([*common, "--no-progress", "--out", str(tmp_path / "quiet")]) == 0
    assert "Loading weights" not in capsys.readouterr().err
    assert hf_logging.is_progress_bar_enabled()  # left as found: a later call in this process draws it


@pytest.mark.parametrize("uri", ["http://127.0.0.1:99999", "http://:5000", "https://", "http://127.0.0.1:0"])
def test_a_server_address_no_server_can_have_is_refused_before_the_run(uri, toy_yaml, tiny_backbone_dir, tmp_path, capsys):
    """A port past 65535 trained the whole run unlogged, then pointed at 'continual sync' to the same
    address, which cannot work: refused before anything loads."""
    argv = ["run", "--stream", str(toy_yaml), "--backbone", str(tiny_backbone_dir), "--steps", "1", "--no-progress",
            "--out", str(tmp_path / "run"), "--tracking-uri", uri]
    assert main(argv) == 2
    assert "is not a server address" in capsys.readouterr().err and not (tmp_path / "run").exists()
