"""Avalanche's strategies as baselines (the ``[avalanche]`` extra).

    strategy.py  ``avalanche-naive|ewc|lwf|replay|agem``: the runner's interface over Avalanche's own
                 ``Naive`` / ``EWC`` / ``LwF`` / ``Replay`` / ``AGEM``
    model.py     our backbone and heads as an Avalanche multi-task module; the plugin that drives
                 our training protocol inside Avalanche's loop
    memory.py    each plugin's memory between tasks as tensors (resume)
    export.py    a stream as an Avalanche benchmark (``avalanche_benchmark``)

Importing this package does not import avalanche: the strategies are listed without the extra
and say how to install it when used.
"""

from .export import avalanche_benchmark, require_avalanche
from .strategy import AVALANCHE_STRATEGIES, AvalancheStrategy

__all__ = ["AVALANCHE_STRATEGIES", "AvalancheStrategy", "avalanche_benchmark", "require_avalanche"]
