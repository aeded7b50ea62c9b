"""Task streams: built-in streams on real data, and user streams from YAML + files, with clear
errors for bad input (naming file, row and column)."""

import json
import os

import pandas as pd
import pytest
import yaml
from datasets import Dataset

from streams import STREAMS, DataError, Task, TaskStream, builtin_stream, load_stream


def write_yaml(tmp_path, tasks, **top):
    path = tmp_path / "stream.yaml"
    path.write_text(yaml.safe_dump({"tasks": tasks, **top}))
    return path


def write_csv(path, rows, columns=("text", "label")):
    pd.DataFrame(rows, columns=list(columns)).to_csv(path, index=False)
    return path.name


def rows(n=40, labels=("neg", "pos")):
    return [(f"example number {i} about {labels[i % len(labels)]}", labels[i % len(labels)]) for i in range(n)]


def test_default_stream_is_the_catalog_order_with_caps():
    s = builtin_stream("default", seed=0, max_train=100, max_eval=40)
    assert s.names == ["movie", "bbc", "trec", "sms", "disaster", "amazon"] == list(STREAMS["default"])
    for t in s:
        assert len(t.train) <= 100 and len(t.dev) <= 40 and len(t.test) <= 40
        assert set(t.train["label"]) == set(range(t.num_labels)), t.name  # stratified: every label kept
        assert t.source["package"] and t.source["split_seed"] == 0
    assert s["bbc"].max_length == 128  # long articles get more tokens
    assert s["trec"].source["file"] == "data/trec.csv"


def test_builtin_splits_are_seeded():
    a, b, c = (load_stream("sentiment-domains", seed=s, max_train=50, max_eval=20) for s in (0, 0, 1))
    assert a.names == ["movie", "amazon", "tweets", "nyt"]
    assert a.fingerprints() == b.fingerprints()
    assert a.fingerprints() != c.fingerprints()


def test_yaml_stream_from_csv_jsonl_parquet(tmp_path):
    write_csv(tmp_path / "a.csv", rows())
    with open(tmp_path / "b.jsonl", "w") as f:
        for text, label in rows(30, ("x", "y", "z")):
            f.write(json.dumps({"sentence": text, "tag": label}) + "\n")
    pd.DataFrame({"premise": ["p"] * 30, "hyp": [f"h {i}" for i in range(30)], "label": [i % 2 for i in range(30)]}) \
        .to_parquet(tmp_path / "c.parquet")
    path = write_yaml(tmp_path, [
        {"name": "a", "train": "a.csv"},
        {"name": "b", "train": "b.jsonl", "text_column": "sentence", "label_column": "tag"},
        {"name": "c", "train": "c.parquet", "text_column": "premise", "text_pair_column": "hyp", "label_names": ["no", "yes"]},
        {"name": "q", "source": "trec", "max_train": 60},
    ], seed=3, max_eval=10)
    s = load_stream(path)
    assert s.name == "stream" and s.names == ["a", "b", "c", "q"]
    assert s["a"].label_names == ["neg", "pos"] and s["b"].label_names == ["x", "y", "z"]
    assert s["c"].label_names == ["no", "yes"] and "text_pair" in s["c"].train.column_names
    assert len(s["q"].train) == 60 and len(s["q"].test) == 10
    assert sum(s["a"].sizes().values()) == 40 and s["a"].source["cut_from_train"] == "dev,test"
    assert isinstance(s["a"].train, Dataset)
    assert load_stream(path).fingerprints() == s.fingerprints()


def test_tokenisation_runs_once_per_split(tmp_path, minilm_tokenizer):
    from continual.scheduler import TokenisedTasks

    task = load_stream(write_yaml(tmp_path, [{"name": "a", "train": write_csv(tmp_path / "a.csv", rows())}]))["a"]
    cache = TokenisedTasks(minilm_tokenizer, 16, 8)
    first = cache(task)
    assert cache(task) is first and "input_ids" in first["test"].column_names
    assert cache.loader(task) is cache.loader(task)


@pytest.mark.parametrize("case, message", [
    ("missing_column", r"a\.csv: no column 'label' \(columns: text, y\)"),
    ("empty_file", r"a\.csv: the file is empty"),
    ("header_only", r"a\.csv: no rows \(empty task\)"),
    ("unseen_test_label", r"test\.csv: row 3, column 'label': label 'maybe' never occurs in the training data"),
    ("duplicate_names", r"task name 'a' appears twice \(tasks 1 and 2\)"),
    ("bad_encoding", r"a\.csv: cannot decode byte \d+ \(line 3\) as utf-8"),
    ("missing_file", r"nothere\.csv: file not found"),
    ("bad_jsonl", r"a\.jsonl: line 2 is not valid JSON"),
    ("mixed_label_kinds", r"a\.jsonl: column 'label' mixes numbers \(row 2: 1\) and words \(row 1: 'pos'\)"),
    # JSON true / false beside "true" / "false" were four classes (True, False, true, false)
    ("mixed_bools", r"a\.jsonl: column 'label' mixes words \(row 2: 'true'\) and booleans \(row 1: True\)"),
    ("empty_text", r"a\.csv: row 2, column 'text': empty text"),
    ("unknown_key", r"unknown key\(s\) txt_column"),
    ("label_not_in_names", r"row 1, column 'label': label 'neg' never occurs in label_names"),
    ("one_label", r"single label"),
    ("named_pipe", r"a\.csv: not a regular file \(a pipe, socket or device\)"),  # it blocked for good
    # AG News' classes are 1-4: they index label_names from 0, and 4 had been "label '1' never occurs"
    ("one_based_labels", r"row 4, column 'label': label 4 is past label_names' last position \(3; .*1-based ones minus 1"),
    ("hub_offline", r"cannot load the hub data set 'no-such-user/no-such-set'.*export the data to a local"),
])
def test_bad_user_streams_fail_clearly(tmp_path, monkeypatch, case, message):
    entry = {"name": "a", "train": "a.csv"}
    tasks = [entry]
    if case == "missing_column":
        write_csv(tmp_path / "a.csv", [("t", 1)], ("text", "y"))
    elif case == "empty_file":
        (tmp_path / "a.csv").write_text("")
    elif case == "header_only":
        (tmp_path / "a.csv").write_text("text,label\n")
    elif case == "unseen_test_label":
        write_csv(tmp_path / "a.csv", rows())
        write_csv(tmp_path / "test.csv", [("x", "neg"), ("y", "pos"), ("z", "maybe")])
        entry["test"] = "test.csv"
    elif case == "duplicate_names":
        write_csv(tmp_path / "a.csv", rows())
        tasks = [entry, dict(entry)]
    elif case == "bad_encoding":
        (tmp_path / "a.csv").write_bytes("text,label\nok,pos\ncaf\xe9,neg\n".encode("latin-1"))
    elif case == "missing_file":
        entry["train"] = "nothere.csv"
    elif case == "bad_jsonl":
        (tmp_path / "a.jsonl").write_text('{"text": "a", "label": 1}\n{"text": oops}\n')
        entry["train"] = "a.jsonl"
    elif case == "mixed_label_kinds":  # one class written two ways (1 and "pos") had become two classes
        (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": f"t{i}", "label": ["pos", 1, "0", 0][i % 4]}) + "\n"
                                                  for i in range(12)))
        entry["train"] = "a.jsonl"
    elif case == "mixed_bools":
        (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": f"t{i}", "label": [True, "true", False, "false"][i % 4]})
                                                  + "\n" for i in range(12)))
        entry["train"] = "a.jsonl"
    elif case == "empty_text":
        (tmp_path / "a.csv").write_text("text,label\nfine,pos\n,neg\n")
    elif case == "unknown_key":
        write_csv(tmp_path / "a.csv", rows())
        entry["txt_column"] = "text"
    elif case == "label_not_in_names":
        write_csv(tmp_path / "a.csv", rows())
        entry["label_names"] = ["negative", "positive"]
    elif case == "named_pipe":
        os.mkfifo(tmp_path / "a.csv")
    elif case == "one_based_labels":
        write_csv(tmp_path / "a.csv", [(f"t{i}", i % 4 + 1) for i in range(12)])
        entry["label_names"] = ["World", "Sports", "Business", "Sci/Tech"]
    elif case == "one_label":
        write_csv(tmp_path / "a.csv", rows(20, ("pos",)))
    elif case == "hub_offline":
        # as on a machine without network: HF_HUB_OFFLINE=1 (read at import, so set on the modules too)
        import datasets
        import huggingface_hub.constants

        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
        monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        tasks = [{"name": "a", "hub": "no-such-user/no-such-set"}]
    with pytest.raises(DataError, match=message):
        load_stream(write_yaml(tmp_path, tasks))


def test_a_hub_set_fails_at_once_where_the_hub_cannot_be_reached(tmp_path, monkeypatch):
    """Offline without HF_HUB_OFFLINE the hub client retried for ~30 s before failing: a closed port
    here stands for the hub; the error names it and why, and the offline flags are as they were."""
    import datasets
    import huggingface_hub.constants

    from conftest import free_port

    for var in ("HF_HUB_OFFLINE", "HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    port = free_port()
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    before = datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE
    with pytest.raises(DataError, match=rf"Hub data needs network access \(the hub cannot be reached: 127\.0\.0\.1:{port}: "):
        load_stream(write_yaml(tmp_path, [{"name": "a", "hub": "no-such-user/no-such-set"}]))
    assert (datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE) == before


def test_unknown_stream_and_malformed_yaml(tmp_path):
    with pytest.raises(DataError, match=r"not a built-in stream \(default, sentiment-domains, generative, standard-5\) and no such file"):
        load_stream("nope")
    bad = tmp_path / "bad.yaml"
    bad.write_text("tasks: [unclosed")
    with pytest.raises(DataError, match="not a readable YAML"):
        load_stream(bad)
    with pytest.raises(DataError, match="non-empty 'tasks:' list"):
        load_stream(write_yaml(tmp_path, []))



@pytest.mark.parametrize("top, match", [
    ({"dev_fraction": 1.5}, "dev_fraction must be a number between 0 and 1"),  # had split with a negative share
    ({"test_fraction": float("nan")}, "test_fraction must be"),
    ({"dev_fraction": 0.5, "test_fraction": 0.5}, "leaves nothing to train on"),
    ({"seed": "x"}, "seed must be a whole number"),  # had failed deep in numpy, naming no file
    ({"seed": 1.5}, "seed must be a whole number"),  # had been accepted
    ({"name": ["a", "b"]}, "name must be a text"),
])
def test_stream_settings_are_checked_before_any_data_is_read(tmp_path, top, match):
    path = write_yaml(tmp_path, [{"name": "a", "train": "missing.csv"}], **top)  # a missing file would be a later error
    with pytest.raises(DataError, match=match) as e:
        load_stream(path)
    assert str(path) in str(e.value)



@pytest.mark.parametrize("entry, match", [
    ({"max_length": "x"}, "max_length must be a whole number"),  # had been a TypeError traceback
    ({"max_length": 0}, "max_length must be a whole number"),  # had silently meant the run's length
    ({"label_names": "pos"}, "label_names must be a non-empty list"),  # had been split into p, o, s
    ({"encoding": 5}, "encoding must be a codec name"),  # had been a TypeError traceback
    ({"label_names": [True, False]}, r"quote the names in label_names, e\.g\. \['yes', 'no'\]"),  # YAML's yes / no
])
def test_task_entry_values_are_checked_with_their_task_named(tmp_path, entry, match):
    write_csv(tmp_path / "a.csv", rows(40, labels=("yes", "no")))
    with pytest.raises(DataError, match=match) as e:
        load_stream(write_yaml(tmp_path, [{"name": "a", "train": "a.csv", **entry}]))
    assert "task 'a'" in str(e.value) or "a.csv" in str(e.value)

def test_stream_file_reads_numbers_with_an_exponent(tmp_path):
    """PyYAML reads 1e-1 as text; the stream file's reader reads it as a number, as YAML 1.2 does."""
    write_csv(tmp_path / "a.csv", rows(40))
    path = tmp_path / "stream.yaml"
    path.write_text("dev_fraction: 2.5e-1\ntasks:\n  - name: a\n    train: a.csv\n")
    stream = load_stream(path)
    assert (len(stream["a"].train), len(stream["a"].dev), len(stream["a"].test)) == (26, 10, 4)

def test_task_and_stream_invariants():
    ds = Dataset.from_dict({"text": ["a", "b"], "label": [0, 1]})
    with pytest.raises(DataError, match="test split is empty"):
        Task("t", ds, ds, ds.select([]), ["x", "y"])
    with pytest.raises(DataError, match=r"label ids \[2\] outside 0..1"):
        Task("t", ds, ds, Dataset.from_dict({"text": ["c"], "label": [2]}), ["x", "y"])
    t = Task("t", ds, ds, ds, ["x", "y"])
    with pytest.raises(DataError, match="appears twice"):
        TaskStream("s", [t, t])
    with pytest.raises(DataError, match="no tasks"):
        TaskStream("s", [])
    with pytest.raises(DataError, match="task 1 is a str, not a streams.Task"):
        TaskStream("s", ["t"])
    # each was taken and went wrong later: a float id was cut to a class, "xy" and a repeated name
    # broke matching labels by name, None text and a missing column failed deep in training
    other = lambda **cols: Dataset.from_dict({"text": ["a", "b"], "label": [0, 1], **cols})  # noqa: E731
    for splits, names, says in [((other(label=[0.0, 1.5]), ds, ds), ["x", "y"], r"integer ids into label_names, found \['float'\]"),
                                ((other(label=["0", "1"]), ds, ds), ["x", "y"], r"found \['str'\]"),
                                ((ds, ds, ds), "xy", "label_names must be a list of strings"),
                                ((ds, ds, ds), ["x", "x"], r"label names \['x'\] are given more than once"),
                                ((ds, other(text=[None, "b"]), ds), ["x", "y"], "dev row 1, column 'text': not text"),
                                ((ds, ds, ds.remove_columns("label")), ["x", "y"], "test split has no 'label' column"),
                                ((ds.rename_column("text", "txt"), ds, ds), ["x", "y"], "train split has no 'text' column")]:
        with pytest.raises(DataError, match=says):
            Task("t", *splits, names)


def test_a_cap_that_keeps_no_example_names_the_cap():
    """A cap below the number of labels can round every label's share to zero: the error names
    the data set, the split and the cap (it was "task 'trec': the dev split is empty")."""
    from streams import builtin_task

    with pytest.raises(DataError, match=r"^trec dev: a cap of 2 keeps none of \d+ examples: each of the 6 labels"):
        builtin_task("trec", 0, 32, 2)
    assert 0 < len(builtin_task("trec", 0, 32, 6).dev) <= 6  # at most the cap (a share can round down)


def test_a_training_cap_that_leaves_one_label_says_to_raise_it():
    """A cap keeps each label's share: --max-train 1 leaves movie one label, and the refusal said
    only that the training split had a single label, which movie's data does not."""
    from streams import builtin_task

    with pytest.raises(DataError, match=r"training split \(1 example\) has a single label; .* raise --max-train"):
        builtin_task("movie", 0, 1, 32)
    assert len(set(builtin_task("movie", 0, 2, 32).train["label"])) == 2
