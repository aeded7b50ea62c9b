"""How a stream's tasks get parameters and are trained: our method and the baselines.

    per_task.py      ``per-task`` (ours: one delta + head per task, frozen: BWT is exactly 0) and
                     ``per-task-fusion`` (plus an AdapterFusion per task over all deltas so far)
    shared_delta.py  ``seq-delta`` (one shared delta trained on each task in turn) and ``joint``
                     (one shared delta on all tasks at once: the upper bound, last row only)
    replay.py        ``replay``: the shared delta, plus a task-balanced memory replayed each step
    agem.py          ``agem``: the shared delta; each step's gradient projected so the memory's loss does not rise (A-GEM)
    gem.py           ``gem``: the same, with one constraint per earlier task, solved as a small QP (GEM)
    ogd.py           ``ogd``: the shared delta; each step's gradient orthogonal to earlier tasks' gold-logit gradients (OGD)
    der.py           ``der``: replay whose memory also keeps the logits its examples got, matched while training (DER++)
    i_lora.py        ``i-lora``: replay with a fast shared delta that trains and a slow one, its running
                     interpolation, that answers (I-LoRA)
    ewc.py           ``ewc``: the shared delta, anchored by its Fisher information (online EWC)
    mas.py           ``mas``: the shared delta, anchored by its outputs' sensitivity to each parameter (Memory Aware Synapses)
    si.py            ``si``: the shared delta, anchored by each parameter's part in the loss's drop along the path (Synaptic Intelligence)
    lamol.py         ``lamol``: the shared delta on a decoder that also learns to write its tasks' examples;
                     before each task it writes pseudo-examples of the earlier ones to train on (LAMOL)
    migu.py          ``migu``: the shared delta; after the first task each step updates only the output
                     units of its linear maps that answered the batch most strongly (MIGU)
    lwf.py           ``lwf``: the shared delta, distilled from its previous values (Learning without Forgetting)
    magmax.py        ``magmax``: the shared delta fine-tuned in turn, answering as the merge of each
                     parameter's largest move over the tasks (MagMax)
    progressive.py   ``progressive-prompts``: a new soft prompt per task, in front of the earlier tasks' frozen ones
    o_lora.py        ``o-lora``: a new LoRA per task, orthogonal to the earlier ones; all LoRAs act at once
    inflora.py       ``inflora``: a new LoRA per task designed outside the earlier tasks' input subspace
    summed_lora.py   what those two share (per-task LoRAs summed, no task id picks one)
    prompt_pool.py   ``prompt-pool``: one pool of prompts with learned keys; each input selects its own (L2P)
    coda_prompt.py   ``coda-prompt``: one pool of prompt components, each task adding its own; each input
                     weighs them by learned keys and attention (CODA-Prompt)
    dual_prompt.py   ``dual-prompt``: a prompt every task trains beside an expert prompt per task, chosen
                     per input by its key (DualPrompt)
    query_prompts.py what those three share (one delta chosen per input by a query; a part per task)
    sapt.py          ``sapt``: a LoRA and key per task, each input mixing every task's LoRA by its attention
                     over the keys; a memory of earlier inputs keeps their attention (SAPT)
    finetune.py      ``seq-ft`` (sequential full fine-tuning: the catastrophic-forgetting baseline)
    avalanche/       ``avalanche-naive|ewc|lwf|replay|agem``: Avalanche's strategies on the same
                     backbone and stream (the ``[avalanche]`` extra)
    base.py          the :class:`Strategy` interface the scheduler calls

A new strategy is one subclass and one line in :data:`STRATEGIES`.
"""

from __future__ import annotations

import inspect
from typing import Any, Sequence

from adapters import DEFAULT_METHOD
from adapters.spec import method_configs
from adapters.model import MethodSpec

from .agem import AGEM
from .der import DER
from .gem import GEM
from .ogd import OGD
from .avalanche import AVALANCHE_STRATEGIES
from .base import Strategy, TaskData
from .finetune import SequentialFineTune
from .per_task import ContinualFusion, PerTaskDelta
from .progressive import ProgressivePrompts
from .inflora import InfLoRA
from .o_lora import OLoRA
from .prompt_pool import PromptPool
from .coda_prompt import CodaPrompt
from .dual_prompt import DualPrompt
from .ewc import EWC
from .i_lora import ILoRA
from .lwf import LwF
from .lamol import LAMOL
from .magmax import MagMax
from .migu import MIGU
from .mas import MAS
from .si import SI
from .replay import Replay
from .sapt import Sapt
from .shared_delta import SHARED, Joint, SequentialDelta

STRATEGIES: dict[str, type[Strategy]] = {
    s.name: s for s in (PerTaskDelta, ContinualFusion, SequentialDelta, Replay, AGEM, GEM, OGD, DER, ILoRA, LAMOL, MIGU, EWC, MAS, SI, LwF, MagMax, ProgressivePrompts, OLoRA, InfLoRA, PromptPool, CodaPrompt, DualPrompt, Sapt,
                        SequentialFineTune, Joint, *AVALANCHE_STRATEGIES)
}


def default_methods(name: str) -> tuple[MethodSpec, ...]:
    """What strategy ``name`` trains without methods given: its own default (its constructor's
    ``methods`` default, e.g. lora for o-lora; ``continual list strategies`` shows each), else the
    library's; none for a strategy that fine-tunes the backbone."""
    cls = STRATEGIES[name]
    if cls.trains_backbone:
        return ()
    param = inspect.signature(cls).parameters.get("methods")
    return (DEFAULT_METHOD,) if param is None or param.default is inspect.Parameter.empty else tuple(param.default)


def make_strategy(name: str, methods: Sequence[MethodSpec] | MethodSpec | None = None, **options: Any) -> Strategy:
    """A strategy by name (see ``STRATEGIES``); ``options`` go to its constructor (e.g.
    ``memory_size`` for ``replay``, ``ewc_lambda`` for ``ewc``, ``temperature`` for ``per-task-fusion``).
    ``methods``: a list of method specs (names, ``"lora:rank=4"``, dicts, configs), or one spec
    (``"lora+bitfit"`` is a combination, as on the command line); None: :func:`default_methods`
    (the strategy's own default, else the library's default method, or none for a strategy that
    fine-tunes the whole backbone, which refuses methods)."""
    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}; one of: {', '.join(STRATEGIES)}")
    cls = STRATEGIES[name]
    if cls.trains_backbone and methods is not None and methods != []:  # they were dropped without a word
        raise ValueError(f"{name} fine-tunes the whole backbone and trains no delta, so it takes no method; for one "
                         "delta trained on every task in turn use seq-delta (e.g. --strategy seq-delta --method lora)")
    params = inspect.signature(cls).parameters
    methods = default_methods(name) if methods is None else method_configs(methods)
    any_keyword = any(v.kind is inspect.Parameter.VAR_KEYWORD for v in params.values())
    named = [p for p, v in params.items() if p != "methods" and v.kind is not inspect.Parameter.VAR_KEYWORD]
    unknown = sorted(set(options) - set(named))
    if unknown and not any_keyword:
        # checked by name: a TypeError raised inside a constructor is not an unknown option
        raise ValueError(f"strategy {name!r}: unknown option(s) {unknown}; its options: {', '.join(named) or 'none'}")
    return cls(**options) if cls.trains_backbone else cls(methods, **options)


__all__ = ["AGEM", "CodaPrompt", "DER", "DualPrompt", "EWC", "GEM", "ILoRA", "InfLoRA", "LAMOL", "OGD", "LwF", "MagMax", "MAS", "MIGU", "OLoRA", "PromptPool", "ProgressivePrompts", "Replay", "SHARED", "SI", "STRATEGIES", "ContinualFusion", "Joint", "PerTaskDelta", "SequentialDelta", "SequentialFineTune",
           "Strategy", "TaskData", "default_methods", "make_strategy"]
