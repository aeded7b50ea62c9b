"""``prompt-pool``: one pool of prompts shared by every task; each input selects its own (L2P).

Learning to Prompt (Wang et al., CVPR 2022; the method is :mod:`adapters.methods.prompt_pool`): the
pool's prompts and keys are trained on each task in turn, each step's loss plus
``pull_lambda · Σ (1 − cos(query, selected key))``, which moves the selected keys toward the inputs
that select them, so different inputs come to pick different prompts and a new task need not
overwrite the prompts an earlier one relies on. Nothing tells the model the task at test time.
Defaults: ``pull_lambda=0.1``; the pool's own (``--method prompt_pool``, e.g.
``prompt_pool:pool_size=10,prompt_length=5,top_k=5``, the paper's sizes).

How we depart from the paper: each task keeps its own classifier head (the paper's is one head
over all classes, with other tasks' logits masked in training); without a task id the run's
router picks the head (a generative task answers through the model's LM head, as in the paper's
setting). See the method's docstring for the rest.
"""

from __future__ import annotations

from typing import Sequence

from adapters.model import MethodSpec

from .query_prompts import QueryPrompts


class PromptPool(QueryPrompts):
    name = "prompt-pool"
    description = "one pool of prompts with learned keys, shared by all tasks; each input selects its prompts (L2P; --method prompt_pool)"
    method, example = "prompt_pool", "pool_size=10"
    defaults = {"pull_lambda": 0.1}

    def __init__(self, methods: Sequence[MethodSpec] = ("prompt_pool",), pull_lambda: float = 0.1) -> None:
        super().__init__(methods, pull_lambda)
