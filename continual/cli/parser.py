"""The ``continual`` argument parser: one function per sub-command, shared option groups.

Only argparse lives here; :mod:`.commands` builds the objects and calls the libraries.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from adapters import BACKBONES, available_methods
from adapters.precision import PRECISIONS
from streams import GENERATIVE_STREAMS, STREAMS

from ..strategies import STRATEGIES
from ..tracking import DEFAULT_EXPERIMENT, DEFAULT_TRACKING_URI, MAX_EXPERIMENT_NAME
from ..training import COMPILE_MODES, DROPOUT_MASKS, MALLOC, TrainConfig
from ..training.config import MAX_RUN_SEED, ROUTERS, check_seed

DESCRIPTION = """run lifelong-learning streams, report on them, list what is available.

    python -m continual run                                  # default stream, bottleneck adapters
    python -m continual run --strategy seq-ft                # the forgetting baseline
    python -m continual run --stream my_stream.yaml --method lora --method bitfit
    python -m continual run ... --resume                     # continue a killed run
    python -m continual report runs/default-per-task-bottleneck-s0
    python -m continual route runs/default-per-task-bottleneck-s0   # task-free inference
    python -m continual transfer runs/default-per-task-bottleneck-s0   # zero-shot transfer matrix
    python -m continual merge runs/default-per-task-lora-s0 --how ties   # one delta merged from all
    python -m continual combine --task movie --combo lora+bitfit      # method combinations study
    python -m continual compare --entry per-task:lora --entry seq-ft   # comparison report
    python -m continual export runs/default-per-task-lora-s0 --out peft/   # PEFT adapters
    python -m continual sync runs/default-per-task-bottleneck-s0 --tracking-uri http://127.0.0.1:5000
    python -m continual list
"""
Formatter = argparse.ArgumentDefaultsHelpFormatter

# what is not a training setting (those are TrainConfig.command_line()'s)
DEFAULTS = dict(stream="default", strategy="per-task", backbone="minilm", max_train=1000, max_eval=300)


def _whole(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None


def count(text: str) -> int:
    """An argparse type: a whole number >= 0 (a negative cap would silently mean "no cap")."""
    value = _whole(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is negative; use 0 for none")
    return value


def positive(text: str) -> int:
    """An argparse type: a whole number >= 1 (a negative one is told the same: "use 0 for none"
    is a remedy only a cap has)."""
    value = _whole(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def mlflow_name(text: str) -> str:
    """An argparse type: an MLflow experiment or run name, not blank (MLflow refuses an empty
    experiment name only once the run has trained, and logging then stops)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return text


def experiment_name(text: str) -> str:
    """An argparse type: an MLflow experiment name (:func:`mlflow_name`, at most MLflow's 500
    characters: a longer one was refused by MLflow once the run had trained)."""
    if len(mlflow_name(text)) > MAX_EXPERIMENT_NAME:
        raise argparse.ArgumentTypeError(f"MLflow takes at most {MAX_EXPERIMENT_NAME} characters, got {len(text)}")
    return text


def seed(text: str) -> int:
    """An argparse type: a run's seed, a whole number in [0, MAX_RUN_SEED] (checked here, at the
    edge: numpy's own refusal of a negative seed names nothing)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    try:
        check_seed("the seed", value, MAX_RUN_SEED)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="continual", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    for add in (_run, _report, _route, _transfer, _merge, _combine, _compare, _export, _sync, _list):
        add(sub)
    return p


def training_options(p: argparse.ArgumentParser, steps_help: str | None = None, *, routed: bool = True,
                     **defaults: Any) -> None:
    """Backbone, data caps and every training setting, the same for each command that trains (run,
    combine, compare) and for the examples; their defaults are TrainConfig.command_line()'s, so an
    entry of ``compare`` trains exactly as ``run`` does. ``defaults``: a script's own starting values
    (TrainConfig field names, or backbone / max_train / max_eval); ``continual.cli.train_config``
    turns the parsed options into the TrainConfig. ``routed``: False for a command that trains one
    task (nothing is routed there, so it offers no --router that would do nothing)."""
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    d = dataclasses.replace(TrainConfig.command_line(), **{k: v for k, v in defaults.items() if k in fields})
    other = {**DEFAULTS, **{k: v for k, v in defaults.items() if k not in fields}}
    p.add_argument("--backbone", default=other["backbone"], help=f"{', '.join(BACKBONES)}, a local path or a hub id")
    p.add_argument("--max-train", type=count, default=other["max_train"], help="cap on training examples per task (0: none)")
    p.add_argument("--max-eval", type=count, default=other["max_eval"], help="cap on dev and test examples per task (0: none)")
    p.add_argument("--steps", type=int, default=d.max_steps, help=steps_help or "training steps per task")
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--max-length", type=int, default=d.max_length, help="tokens per example (BBC uses 128)")
    p.add_argument("--eval-every", type=int, default=d.eval_every, help="steps between dev evaluations")
    p.add_argument("--patience", type=count, default=d.patience, help="dev evaluations without gain before stopping (0: never)")
    p.add_argument("--lr", type=float, default=d.lr, help="delta learning rate (default: each method's own)%(default).0s")
    p.add_argument("--head-lr", type=float, default=d.head_lr, help="learning rate of the task heads")
    p.add_argument("--seed", type=seed, default=d.seed, help="seeds splits, initialisation and training (0 to 4294967295)")
    if routed:
        p.add_argument("--router", default=d.router, choices=ROUTERS,
                       help="how test examples find their task when no task id is given (the task-agnostic matrix): "
                       "the nearest task mean under a pooled, shrunk covariance (mahalanobis, ABSCL's selector), the nearest "
                       "(task, label) prototype, a linear classifier refitted on every task so far, or the task whose "
                       "deltas find the input least surprising (perplexity, AdapterCL's selection: its prompt's perplexity, "
                       "a head's entropy; one pass per task so far for each input)")
    p.add_argument("--no-dropout", action="store_true",
                   help="train with dropout off (a deterministic forward pass: a run on N processes under torchrun "
                   "then gives the 1-process numbers, up to float rounding)")
    p.add_argument("--device", default=d.device, help="cpu, cuda, cuda:1, ... (default: cuda when available)%(default).0s")
    p.add_argument("--precision", default=d.precision, choices=PRECISIONS,
                   help="training/eval precision (auto: bf16 on a GPU that has it and on a CPU with bf16 matrix "
                   "instructions, e.g. AVX512-BF16 or AMX; else fp32)")
    p.add_argument("--compile", default=d.compile, choices=COMPILE_MODES,
                   help="torch.compile the training forward pass with this mode (pays off on a GPU)")
    p.add_argument("--fast", action="store_true", help="--compile reduce-overhead (CUDA graphs) on a GPU; pays only on long "
                   "tasks: compiling costs tens of seconds per task (the other fast settings are the defaults, so on a CPU "
                   "it adds nothing)")
    p.add_argument("--bucket", action=argparse.BooleanOptionalAction, default=d.bucket,
                   help="length-bucketed training batches (less padding; seeded, every example once per pass)")
    p.add_argument("--dropout-masks", default=d.dropout_masks, choices=DROPOUT_MASKS,
                   help="on a CPU, draw the frozen backbone's dropout masks from 16 random bits per element (fast: "
                   "p rounded to 1/65536, about a quarter of a training step less) or with torch's bernoulli_ "
                   "(torch); no effect on a GPU")
    p.add_argument("--malloc", default=d.malloc, choices=MALLOC,
                   help="on a CPU, hold: glibc keeps freed memory for reuse for the rest of the process, so a "
                   "training step's temporaries do not page-fault (a sixth to a quarter of a MiniLM step); default: the C "
                   "library's own behaviour. No effect on a GPU or without glibc")


def _tracking_options(p: argparse.ArgumentParser, progress: bool = True) -> None:
    p.add_argument("--tracking-uri", default=DEFAULT_TRACKING_URI, help="MLflow store or server (http://127.0.0.1:5000)")
    p.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow (results still go to --out)")
    if progress:
        p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _finished_run(p: argparse.ArgumentParser) -> None:
    """The run directory and backbone of the commands that work on a finished stream (route, transfer)."""
    p.add_argument("run", help="a finished run's output directory (strategy per-task)")
    p.add_argument("--backbone", default=None,
                   help="the backbone the run was trained on (default: the one its checkpoints name)%(default).0s")


def _run(sub: argparse._SubParsersAction) -> None:
    r = sub.add_parser("run", help="run a task stream and log it to MLflow", formatter_class=Formatter,
                       description="Run a lifelong-learning stream: one new delta per task on the frozen backbone "
                       "(or a baseline), fill the accuracy matrix, print ACC/BWT/FWT/forgetting, log to MLflow. "
                       "State is saved after every task: --resume continues a killed run.")
    r.add_argument("--stream", default=DEFAULTS["stream"], help=f"built-in stream ({', '.join([*STREAMS, *GENERATIVE_STREAMS])}), a YAML file, or a published benchmark's folder: cl-benchmark:PATH:order=1..6[:generative] (O-LoRA's CL_Benchmark), trace:PATH (TRACE); generative streams (text answers) need a decoder backbone, e.g. --stream generative --backbone smollm2")
    r.add_argument("--method", action="append", metavar="METHOD[:k=v,...]",
                   help=f"delta method, repeat (or join with +, lora+bitfit) to combine; one of {', '.join(available_methods())} "
                   "(default: bottleneck)%(default).0s")
    r.add_argument("--strategy", default=DEFAULTS["strategy"], choices=list(STRATEGIES),
                   help="; ".join(f"{k}: {v.description}" for k, v in STRATEGIES.items()))
    r.add_argument("--strategy-option", action="append", default=[], metavar="KEY=VALUE[,KEY=VALUE]",
                   help="strategy options, e.g. ewc_lambda=100 (avalanche-ewc), mem_size=500 (avalanche-replay), "
                   "backbone_lr=3e-5 (seq-ft, avalanche-*); `continual list strategies` shows each one's")
    training_options(r)
    r.add_argument("--shard-backbone", action="store_true",
                   help="under torchrun: shard the frozen backbone's blocks across the processes (FSDP2) instead "
                   "of a full copy in each; the deltas stay replicated (docs/distributed.md)")
    r.add_argument("--out", default=None, help="output directory (default: runs/<stream>-<strategy>-<methods>-s<seed>)%(default).0s")
    again = r.add_mutually_exclusive_group()  # both: --resume won, and a mismatch was told to use --overwrite
    again.add_argument("--resume", action="store_true", help="continue the run saved in --out after its last finished task")
    again.add_argument("--overwrite", action="store_true", help="replace a run saved in --out")
    r.add_argument("--rescore-all", action="store_true",
                   help="score every old task again after each task (default: only those whose delta, head or "
                   "backbone weights changed; the others' scores are carried over: same numbers, less time)%(default).0s")
    _tracking_options(r)
    r.add_argument("--experiment", type=experiment_name, default=DEFAULT_EXPERIMENT, help="MLflow experiment name")
    r.add_argument("--run-name", type=mlflow_name, default=None, help="MLflow run name (default: the output directory's name)%(default).0s")


def _report(sub: argparse._SubParsersAction) -> None:
    rep = sub.add_parser("report", help="print the matrix and metrics of a run and write its heatmap", formatter_class=Formatter)
    rep.add_argument("run", help="a run's output directory, or an MLflow run id / run name")
    rep.add_argument("--tracking-uri", default=DEFAULT_TRACKING_URI, help="MLflow store, for a run id / name")
    rep.add_argument("--experiment", type=experiment_name, default=DEFAULT_EXPERIMENT)
    rep.add_argument("--plot", default=None, help="heatmap PNG path (default: heatmap.png in the run directory, "
                     "or ./<run>-heatmap.png for an MLflow run)%(default).0s")
    rep.add_argument("--f1", action="store_true", help="show macro-F1 instead of accuracy")
    rep.add_argument("--json", action="store_true",
                     help="print the metrics as strict JSON on stdout (undefined ones null), other lines on stderr")


def _route(sub: argparse._SubParsersAction) -> None:
    ro = sub.add_parser("route", help="task-free inference: route a finished run's test examples to tasks",
                        description="Fit routers on a finished per-task run's training data (frozen backbone "
                        "embeddings; the perplexity router asks each task's delta instead), route every test example to a task, serve them through one mixed-task model, "
                        "and report routing accuracy and ACC with routed vs true tasks. Writes routing.json, "
                        "routing-<router>.md/.png into the run directory and logs them to the run's MLflow store.",
                        formatter_class=Formatter)
    _finished_run(ro)
    ro.add_argument("--router", action="append", choices=ROUTERS,
                    help="router(s) to evaluate, repeatable (default: every one that can route the run: not "
                    "perplexity on a T5 generative run)%(default).0s")
    ro.add_argument("--fit-max", type=count, default=None, help="cap on training examples per task used to fit routers (0: no cap)")
    ro.add_argument("--tracking-uri", default=None, help="MLflow store (default: the one the run was logged to)%(default).0s")
    ro.add_argument("--no-progress", action="store_true", help="no progress bar")


def _transfer(sub: argparse._SubParsersAction) -> None:
    tr = sub.add_parser("transfer", help="zero-shot transfer matrix of a finished run's task deltas",
                        description="Apply each task's delta and head, untouched, to every task with the same label "
                        "names; print relative performance (accuracy / the target's own accuracy) as a table and a "
                        "heatmap; write transfer.csv/.md/.png into the run directory and log them to its MLflow run.",
                        formatter_class=Formatter)
    _finished_run(tr)
    tr.add_argument("--no-progress", action="store_true", help="no progress bar")


def _merge(sub: argparse._SubParsersAction) -> None:
    me = sub.add_parser("merge", help="merge a finished run's task deltas into one and score every task with it",
                        description="Merge every task's delta of a finished per-task run into one (linear: the "
                        "average; ties: TIES-Merging; dare: DARE drop-and-rescale, then the average; magmax: each parameter "
                        "from the task that moved it most, times 0.5 (MagMax); cat: LoRAs' exact "
                        "average update, their ranks concatenated) and score each "
                        "task's test set with it beside the task's own delta. A classifier keeps its own head; a "
                        "generative stream's merged delta answers every task with no task id. Writes merge.csv/.md/"
                        ".png into the run directory and logs them to its MLflow run.",
                        formatter_class=Formatter)
    _finished_run(me)
    me.add_argument("--how", action="append", choices=["linear", "ties", "dare", "magmax", "cat"],
                    help="merge rule(s) to score (default: linear, ties, dare, and cat for LoRAs; magmax when "
                    "asked)%(default).0s")
    me.add_argument("--density", type=float, default=None,
                    help="fraction of each task vector ties keeps / dare keeps in expectation, in (0, 1] "
                    "(default: 0.2 for ties, the TIES paper's; 0.5 for dare)%(default).0s")
    me.add_argument("--seed", type=int, default=0, help="dare's random draw")
    me.add_argument("--no-progress", action="store_true", help="no progress bar")


def _combine(sub: argparse._SubParsersAction) -> None:
    co = sub.add_parser("combine", help="combine delta methods on one task, simultaneously or sequentially, over a grid",
                        description="For each --combo and --mode, train the methods on one real task from the same "
                        "seed and split: simultaneous (all at once) or sequential (train one, freeze it, train the next "
                        "on top). Prints and writes a Markdown table (test/dev accuracy, trainable parameters, time, "
                        "accuracy after each stage) and logs one MLflow run per cell.",
                        formatter_class=Formatter)
    co.add_argument("--task", default="movie", help="a built-in data set (continual list data)")
    co.add_argument("--combo", action="append", metavar="M1+M2[+...]",
                    help="methods joined by '+', options as in --method (lora:rank=4+bitfit); repeat for a grid "
                    "(default: lora+bitfit, bottleneck+bitfit, lora+prompt)%(default).0s")
    co.add_argument("--mode", action="append", choices=["simultaneous", "sequential"], help="default: both%(default).0s")
    training_options(co, "training steps per stage", routed=False)
    co.add_argument("--out", default=None, help="where the table goes (default: runs/combine-<task>-s<seed>)%(default).0s")
    _tracking_options(co)


def _compare(sub: argparse._SubParsersAction) -> None:
    cp = sub.add_parser("compare", help="run several methods and baselines on a stream and write a comparison report",
                        description="Run each --entry (strategy or strategy:method+method) on the stream into "
                        "<out>/<entry> (finished entries are reused, killed ones resume) and write report.md, "
                        "report.json and report.png (ACC, BWT, FWT, forgetting, the same without the task id with the "
                        "routing accuracy, trainable parameters, delta size on disk, wall time per entry) and curves.png "
                        "(each entry's mean score over the tasks seen so far after each task), logged to MLflow as a "
                        "'compare' run.",
                        formatter_class=Formatter)
    cp.add_argument("--stream", default=DEFAULTS["stream"], help="as for run --stream")
    cp.add_argument("--entry", action="append", metavar="STRATEGY[@K=V,...][:M1+M2]",
                    help="repeat; e.g. per-task:lora, seq-ft, avalanche-ewc@ewc_lambda=100, avalanche-replay "
                    "(Avalanche baselines need the [avalanche] extra); default: per-task:bottleneck, per-task:lora, "
                    "seq-delta:lora, seq-ft%(default).0s")
    training_options(cp)
    cp.set_defaults(seed=None)  # so that a --seed beside --seeds is seen (and refused), not silently dropped
    next(a for a in cp._actions if a.dest == "seed").help += f" (default: {TrainConfig.command_line().seed})%(default).0s"
    cp.add_argument("--seeds", default=None, metavar="S1,S2,...",
                    help="run every entry once per seed (the stream drawn with that seed) into <out>/<entry>/s<seed>; "
                    "the report gives mean ± std (default: --seed alone); not with --seed%(default).0s")
    cp.add_argument("--workers", type=positive, default=1,
                    help="run the entries x seeds on this many local processes at once (each gets cpu_count / "
                    "workers torch threads); the numbers do not change, the wall time does")
    cp.add_argument("--ray-address", default=None,
                    help="run the entries x seeds as tasks on this Ray cluster (e.g. auto, or ray://host:10001); "
                    "needs `pip install ray`")
    cp.add_argument("--out", default=None, help="default: runs/compare-<stream>-s<seed>; entries already run there with the same "
                    "settings are reused, others are refused%(default).0s")
    _tracking_options(cp)


def _export(sub: argparse._SubParsersAction) -> None:
    ex = sub.add_parser("export", help="write a run's task deltas as HuggingFace PEFT adapters (for PEFT, vLLM, TGI)",
                        description="Write each task's delta of a finished run as a PEFT adapter (adapter_config.json + "
                        "adapter_model.safetensors) in <out>/<task>: LoRA, (IA)^3, prompt tuning, and lora+bitfit as LoRA "
                        "with bias='all'. Tasks whose delta PEFT cannot hold (bottleneck, parallel, compacter, prefix, "
                        "fusion) are listed with the reason. A classification task's head is saved beside its adapter "
                        "(head.safetensors). For generative LoRAs, prints what vLLM would refuse, or the commands that "
                        "serve them (docs/peft.md).", formatter_class=Formatter)
    ex.add_argument("run", help="a run's output directory")
    ex.add_argument("--format", default="peft", choices=["peft"], help="checkpoint format to write")
    ex.add_argument("--out", required=True, help="directory to write <task>/ adapters into")
    ex.add_argument("--task", action="append", help="export only this task (repeat); default: every task PEFT can hold%(default).0s")
    ex.add_argument("--backbone", default=None, help="the backbone the run was trained on (default: the one its checkpoints name)%(default).0s")
    ex.add_argument("--base-model", default=None, help="base_model_name_or_path to record (default: the backbone's hub id)%(default).0s")
    ex.add_argument("--max-lora-rank", type=positive, default=16, help="the --max-lora-rank the vLLM server runs with")


def _sync(sub: argparse._SubParsersAction) -> None:
    sy = sub.add_parser("sync", help="upload a run directory to an MLflow store (e.g. after the server was down)",
                        description="Log everything a run directory holds (parameters, each step's training curve, "
                        "scores and checkpoints, the accuracy matrix, the final metrics and files) to an MLflow store "
                        "as a new run, and record that run in the directory (a run the store already holds is not logged "
                        "twice). For runs whose tracking server was "
                        "unreachable (they go on and keep everything locally) or that ran with --no-mlflow.",
                        formatter_class=Formatter)
    sy.add_argument("run", help="a run's output directory (finished or not)")
    sy.add_argument("--tracking-uri", default=DEFAULT_TRACKING_URI, help="MLflow store or server")
    sy.add_argument("--experiment", type=experiment_name, default=DEFAULT_EXPERIMENT, help="MLflow experiment name")
    sy.add_argument("--run-name", type=mlflow_name, default=None, help="MLflow run name (default: the directory's name)%(default).0s")
    sy.add_argument("--again", action="store_true",
                    help="log a copy even when the store already holds this run (by default a second sync logs nothing)")


def _list(sub: argparse._SubParsersAction) -> None:
    ls = sub.add_parser("list", help="list methods, strategies, routers, streams, data and backbones")
    ls.add_argument("what", nargs="?", choices=["methods", "strategies", "routers", "streams", "data", "backbones"], default=None)
