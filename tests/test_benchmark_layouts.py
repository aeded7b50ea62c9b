"""The published benchmark layouts as streams (O-LoRA / SAPT's CL_Benchmark, TRACE), on small folders
written here in those layouts: the published orders, classification and generative forms, TRACE's
splits and metrics, clear errors, and one short run."""

import json

import pytest

from conftest import FAST
from continual import TrainConfig, make_strategy, run_stream
from streams import load_stream
from streams.benchmarks import CL_ORDERS, parse
from streams.catalog import DataError

CATEGORIES = {"dbpedia": "TC", "amazon": "SC", "yahoo": "TC", "agnews": "TC", "MNLI": "NLI", "CB": "NLI", "WiC": "WiC",
              "COPA": "COPA", "QQP": "QQP", "BoolQA": "BoolQA", "RTE": "NLI", "IMDB": "SC", "yelp": "SC", "SST-2": "SC",
              "MultiRC": "MultiRC"}
WORDS = ["apple", "river", "music", "stone", "cloud", "tree"]


def write_cl_benchmark(root, names=tuple(CATEGORIES), rows=30, dev=True):
    for k, name in enumerate(names):
        folder = root / CATEGORIES[name] / name
        folder.mkdir(parents=True)
        labels = [f"{name}-no", f"{name}-yes"]
        (folder / "labels.json").write_text(json.dumps(labels))
        data = [{"sentence": f"{WORDS[(i + k) % 6]} {WORDS[i % 5]} {'apple' if i % 2 else 'cloud'}", "label": labels[i % 2]}
                for i in range(rows)]
        (folder / "train.json").write_text(json.dumps(data))
        (folder / "test.json").write_text(json.dumps(data[:8]))
        if dev:
            (folder / "dev.json").write_text(json.dumps(data[8:16]))
    return root


def test_orders_are_the_published_ones_and_every_task_loads(tmp_path):
    root = write_cl_benchmark(tmp_path / "CL_Benchmark")
    assert [len(CL_ORDERS[n]) for n in range(1, 7)] == [4, 4, 4, 15, 15, 15]
    assert all(set(CL_ORDERS[n]) == set(CL_ORDERS[4]) for n in (5, 6))
    for n in range(1, 7):
        stream = load_stream(f"cl-benchmark:{root}:order={n}")
        assert stream.names == list(CL_ORDERS[n]) and stream.name == f"cl-benchmark-order{n}"
    stream = load_stream(f"cl-benchmark:{root}:order=1", max_train=10, max_eval=4)
    dbpedia = stream.tasks[0]
    assert dbpedia.label_names == ["dbpedia-no", "dbpedia-yes"] and not dbpedia.generative
    assert len(dbpedia.train) == 10 and len(dbpedia.test) == 4 and len(dbpedia.dev) == 4
    assert set(dbpedia.train["label"]) == {0, 1}


def test_generative_form_prompts_with_the_options_and_answers_the_label_name(tmp_path):
    root = write_cl_benchmark(tmp_path / "CL", names=("yahoo", "amazon", "agnews", "dbpedia"), dev=False)
    stream = load_stream(f"cl-benchmark:{root}:order=3:generative")
    yahoo = stream.tasks[0]
    assert yahoo.generative and yahoo.metric == "exact" and stream.names[0] == "yahoo"
    row = yahoo.train[0]
    assert row["text"].startswith("Give the topic of the text. Options: yahoo-no, yahoo-yes.\n")
    assert row["text"].endswith("\nAnswer:") and row["target"] in ("yahoo-no", "yahoo-yes")
    assert len(yahoo.dev) > 0  # no dev.json: cut from train
    custom = load_stream(f"cl-benchmark:{root}:tasks=amazon,dbpedia")
    assert custom.names == ["amazon", "dbpedia"] and custom.name == "cl-benchmark-custom"


def test_trace_layout_reads_prompt_answer_splits_with_each_data_sets_metric(tmp_path):
    root = tmp_path / "TRACE"
    for name in ("C-STANCE", "MeetingBank", "Py150", "20Minuten"):
        (root / name).mkdir(parents=True)
        rows = [{"prompt": f"{name} question {i}", "answer": f"answer {i % 3}"} for i in range(20)]
        for split in ("train", "eval", "test"):
            (root / name / f"{split}.json").write_text(json.dumps(rows))
    stream = load_stream(f"trace:{root}:tasks=C-STANCE,MeetingBank,Py150,20Minuten", max_eval=5)
    assert stream.names == ["C-STANCE", "MeetingBank", "Py150", "20Minuten"]
    assert [t.metric for t in stream] == ["exact", "rouge_l", "edit_sim", "sari"]  # each TRACE's own
    assert all(t.generative and len(t.dev) == 5 for t in stream)
    assert stream.tasks[0].train[0] == {"text": "C-STANCE question 0", "target": "answer 0"}


@pytest.mark.parametrize("spec, message", [
    ("cl-benchmark:{root}:order=7", "order must be one of 1, 2, 3, 4, 5, 6"),
    ("cl-benchmark:{root}:order=1:tasks=amazon", "not both"),
    ("cl-benchmark:{root}/nowhere:order=1", "is not a folder"),
    ("cl-benchmark:{root}:tasks=amazon,amazon", "distinct"),
    ("cl-benchmark:{root}:tasks=amazon,CB", "'CB' not found"),
    ("cl-benchmark:{root}:tasks=yelp", "labels.json"),
    ("trace:{root}:generative", "always generative"),
    ("trace:{root}", "no .*C-STANCE/train.json"),
    ("trace:", r"give the folder, e\.g\. trace:/data/TRACE$"),  # it showed a CL_Benchmark path with an order
    ("cl-benchmark::order=2", r"give the folder, e\.g\. cl-benchmark:/data/CL_Benchmark:order=1"),
])
def test_bad_specs_and_folders_get_clear_errors(tmp_path, spec, message):
    root = write_cl_benchmark(tmp_path / "CL", names=("dbpedia", "amazon", "yahoo", "agnews", "yelp"))
    (root / "SC" / "yelp" / "labels.json").write_text('["only-one"]')
    with pytest.raises(DataError, match=message):
        load_stream(spec.format(root=root))


def test_options_are_peeled_from_the_right_so_a_path_may_hold_colons():
    assert parse("cl-benchmark:/data/a:b:order=2:generative") == ("cl-benchmark", __import__("pathlib").Path("/data/a:b"),
                                                                    {"generative": True, "order": "2"})


def test_a_cl_benchmark_stream_runs(text_model, tmp_path):
    root = write_cl_benchmark(tmp_path / "CL", names=("dbpedia", "amazon"), rows=60)
    stream = load_stream(f"cl-benchmark:{root}:tasks=dbpedia,amazon")
    config = TrainConfig(**{**FAST, "max_steps": 10, "eval_every": 5})
    result = run_stream(stream, text_model(), make_strategy("per-task", ["lora"]), config, tmp_path / "run")
    assert result.matrix.R.shape == (2, 2) and 0 <= result.metrics["ACC"] <= 1
