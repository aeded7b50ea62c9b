"""``dual-prompt``: a prompt every task trains, beside an expert prompt per task chosen by its key (DualPrompt).

DualPrompt (Wang et al., ECCV 2022; the method is :mod:`adapters.methods.dual_prompt`): task t
trains the shared G-prompt and its own E-prompt and key, each step's loss plus
``pull_lambda · (1 − cos(query, k_t))``, which moves the key toward the task's inputs; the earlier
tasks' expert prompts and keys are held fixed. At test time each input's query chooses the expert
prompt of the most similar key, so nothing tells the model the task. Defaults: ``pull_lambda=1.0``
(the paper's λ); the sizes are the method's (``--method dual_prompt:g_length=5,e_length=5,tasks=10``,
the paper's); ``tasks`` must cover the stream.

How we depart from the paper: each task keeps its own classifier head (the paper's is one head
over all classes, other tasks' logits masked in training); without a task id the run's router picks
the head, as for L2P (``prompt-pool``). See the method's docstring for the rest.
"""

from __future__ import annotations

from typing import Sequence

from adapters.model import MethodSpec

from .query_prompts import TaskSlots


class DualPrompt(TaskSlots):
    name = "dual-prompt"
    description = ("a prompt shared by all tasks and an expert prompt per task, chosen per input by its key "
                   "(DualPrompt; --method dual_prompt)")
    method, example = "dual_prompt", "e_length=5"
    always = frozenset({"general"})  # the G-prompt: every task trains it
    defaults = {"pull_lambda": 1.0}

    def __init__(self, methods: Sequence[MethodSpec] = ("dual_prompt",), pull_lambda: float = 1.0) -> None:
        super().__init__(methods, pull_lambda)

    def too_long(self, n: int) -> str:
        tasks = self.methods[0].tasks
        return (f"dual-prompt gives each task an expert prompt, but it has {tasks} of them (tasks={tasks}) and the "
                f"stream has {n} tasks; give --method dual_prompt:tasks={n}")
