"""A run's ``stream.yaml`` (its record of the stream it ran) is itself a stream: it loads the same
tasks and data, from wherever it is read, and refuses data that changed since the run."""

import pytest
import yaml

from continual.cli import main
from continual.rundir import write_stream_spec
from streams import DataError, load_stream
from test_benchmark_layouts import write_cl_benchmark
from test_streams import rows, write_csv


def test_a_runs_stream_record_runs_again_from_anywhere(tmp_path, tiny_backbone_dir, monkeypatch, capsys):
    data = tmp_path / "data"
    data.mkdir()
    write_csv(data / "a.csv", rows(40))
    write_csv(data / "b.csv", rows(40, ("x", "y")))
    (data / "s.yaml").write_text(yaml.safe_dump({"name": "mine", "seed": 5, "tasks": [
        {"name": "a", "train": "a.csv"}, {"name": "b", "train": "b.csv"}]}))
    common = ["--backbone", str(tiny_backbone_dir), "--steps", "2", "--no-mlflow", "--no-progress"]
    monkeypatch.chdir(data)
    assert main(["run", "--stream", "s.yaml", "--out", str(tmp_path / "first"), *common]) == 0
    record = tmp_path / "first" / "stream.yaml"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # the record's relative data paths start where the stream file was
    again = load_stream(record)
    original = load_stream(data / "s.yaml", max_train=1000, max_eval=300)
    assert (again.name, again.names, again.fingerprints()) == (original.name, original.names, original.fingerprints())
    # the same stream by the run's own measure: the finished run resumes from it with nothing to do
    assert main(["run", "--stream", str(record), "--out", str(tmp_path / "first"), "--resume", *common]) == 0
    assert main(["run", "--stream", str(record), "--out", str(tmp_path / "second"), *common]) == 0
    first, second = (yaml.safe_load((tmp_path / d / "stream.yaml").read_text()) for d in ("first", "second"))
    assert first["tasks_resolved"] == second["tasks_resolved"] and first["file"] == second["file"]
    write_csv(data / "b.csv", rows(41, ("x", "y")))  # the data changed since the run
    with pytest.raises(DataError, match="task 'b': its data differ from those of the run this file records"):
        load_stream(record)
    capsys.readouterr()


@pytest.mark.parametrize("spec", ["sentiment-domains", "generative", "cl-benchmark:{root}:order=1:generative"])
def test_records_of_builtin_and_benchmark_streams_load_the_same_stream(tmp_path, spec):
    if "{root}" in spec:
        spec = spec.format(root=write_cl_benchmark(tmp_path / "CL", names=("dbpedia", "amazon", "yahoo", "agnews")))
    stream = load_stream(spec, seed=3, max_train=12, max_eval=6)
    write_stream_spec(tmp_path, stream, stream.fingerprints())
    again = load_stream(tmp_path / "stream.yaml", seed=0, max_train=1000)  # the record's seed and caps win
    assert (again.name, again.names, again.fingerprints()) == (stream.name, stream.names, stream.fingerprints())
    record = yaml.safe_load((tmp_path / "stream.yaml").read_text())
    record["tasks_resolved"][-1]["fingerprint"] = "0" * 64
    (tmp_path / "edited.yaml").write_text(yaml.safe_dump(record))
    with pytest.raises(DataError, match=f"task {stream.names[-1]!r}: its data differ"):
        load_stream(tmp_path / "edited.yaml")
