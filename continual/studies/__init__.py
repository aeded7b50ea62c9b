"""Studies over finished or new stream runs (each has a ``continual`` sub-command).

    compare.py   several strategies / methods on one stream, side by side (report.md/.json/.png)
    combine.py   combinations of delta methods on one task, simultaneous vs sequential
    route.py     task-free inference: route each test example to a task, routed vs oracle ACC
    transfer.py  zero-shot transfer matrix between tasks with the same label names
"""
