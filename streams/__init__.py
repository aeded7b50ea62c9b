"""Tasks and data: the real labelled text shipped in PyPI packages (catalog).

Task streams (Task, TaskStream, user streams from files) build on this module.
"""

from .catalog import SOURCES, DataError, Source, load_task_data, stratified_split

__all__ = ["SOURCES", "DataError", "Source", "load_task_data", "stratified_split"]
