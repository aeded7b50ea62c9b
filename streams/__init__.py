"""Tasks and task streams: real labelled text shipped in PyPI packages, and a user's own files.

    stream = load_stream("default", seed=0, max_train=1000, max_eval=300)   # built-in
    stream = load_stream("my_stream.yaml")                                    # CSV/JSONL/parquet/hub
    for task in stream: task.train, task.dev, task.test, task.label_names
    stream = load_stream("generative")          # text-to-text: prompt in `text`, answer in `target`
"""

from .catalog import SOURCES, DataError, Source, load_task_data, stratified_split
from .generative import GENERATIVE_STREAMS, VERBALIZERS, Verbalizer, generative_task, headline_task, verbalize
from .stream import STREAMS, builtin_stream, builtin_task, load_stream, stream_from_yaml
from .task import METRICS, Task, TaskStream, check_task_name

__all__ = [
    "GENERATIVE_STREAMS", "METRICS", "SOURCES", "STREAMS", "VERBALIZERS", "DataError", "Source", "Task", "TaskStream",
    "Verbalizer", "builtin_stream", "builtin_task", "check_task_name", "generative_task", "headline_task",
    "load_stream", "load_task_data", "stratified_split", "stream_from_yaml", "verbalize",
]
