"""``continual``: run lifelong-learning streams, report on them, list what is available.

    python -m continual run                                  # default stream, bottleneck adapters
    python -m continual run --strategy seq-ft                # the forgetting baseline
    python -m continual run --stream my_stream.yaml --method lora --method bitfit
    python -m continual run ... --resume                     # continue a killed run
    python -m continual report runs/default-per-task-bottleneck-s0
    python -m continual route runs/default-per-task-bottleneck-s0   # task-free inference
    python -m continual transfer runs/default-per-task-bottleneck-s0   # zero-shot transfer matrix
    python -m continual combine --task movie --combo lora+bitfit      # method combinations study
    python -m continual compare --entry per-task:lora --entry seq-ft   # comparison report
    python -m continual list
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from pathlib import Path
from typing import Any

DEFAULTS = dict(stream="default", strategy="per-task", backbone="minilm", max_train=1000, max_eval=300, steps=200,
                batch_size=16, max_length=64, eval_every=50, patience=3, seed=0)


def parse_method(text: str) -> str | dict[str, Any]:
    """``lora`` or ``lora:rank=16,alpha=32`` (values read as YAML scalars)."""
    if ":" not in text:
        return text
    name, _, opts = text.partition(":")
    return {"method": name, **parse_options(opts, text)}


def parse_options(text: str, context: str | None = None) -> dict[str, Any]:
    """``k=v,k=v`` (values read as YAML scalars: numbers, booleans, strings)."""
    import yaml

    out: dict[str, Any] = {}
    for item in filter(None, text.split(",")):
        key, eq, value = item.partition("=")
        if not eq:
            raise argparse.ArgumentTypeError(f"option {item!r} must be key=value (in {context or text!r})")
        out[key.strip()] = yaml.safe_load(value)
    return out


def _method_label(methods: list[Any]) -> str:
    return "+".join(m if isinstance(m, str) else m["method"] for m in methods)


def _training_options(p: argparse.ArgumentParser, steps_help: str | None = None) -> None:
    """Backbone, data caps and training settings shared by the commands that train (combine, compare)."""
    p.add_argument("--backbone", default=DEFAULTS["backbone"])
    p.add_argument("--max-train", type=int, default=DEFAULTS["max_train"])
    p.add_argument("--max-eval", type=int, default=DEFAULTS["max_eval"])
    p.add_argument("--steps", type=int, default=DEFAULTS["steps"], help=steps_help)
    p.add_argument("--batch-size", type=int, default=DEFAULTS["batch_size"])
    p.add_argument("--max-length", type=int, default=DEFAULTS["max_length"])
    p.add_argument("--eval-every", type=int, default=DEFAULTS["eval_every"])
    p.add_argument("--seed", type=int, default=DEFAULTS["seed"])
    p.add_argument("--device", default=None)


def _finished_run(p: argparse.ArgumentParser) -> None:
    """The run directory and backbone of the commands that work on a finished stream (route, transfer)."""
    p.add_argument("run", help="a finished run's output directory (strategy per-task)")
    p.add_argument("--backbone", default=DEFAULTS["backbone"], help="the backbone the run was trained on")


def _train_config(args: argparse.Namespace, progress: bool = True) -> Any:
    """The TrainConfig of :func:`_training_options`' settings."""
    from .train import TrainConfig

    return TrainConfig(max_steps=args.steps, batch_size=args.batch_size, max_length=args.max_length,
                       eval_every=args.eval_every, seed=args.seed, device=args.device, progress=progress)


def build_parser() -> argparse.ArgumentParser:
    from adapters import BACKBONES, available_methods
    from adapters.speed import COMPILE_MODES, PRECISIONS
    from streams import STREAMS

    from .strategies import STRATEGIES
    from .tracking import DEFAULT_EXPERIMENT, DEFAULT_TRACKING_URI

    p = argparse.ArgumentParser(prog="continual", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="run a task stream and log it to MLflow",
                       description="Run a lifelong-learning stream: one new delta per task on the frozen backbone "
                       "(or a baseline), fill the accuracy matrix, print ACC/BWT/FWT/forgetting, log to MLflow. "
                       "State is saved after every task: --resume continues a killed run.",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    r.add_argument("--stream", default=DEFAULTS["stream"], help=f"built-in stream ({', '.join(STREAMS)}) or a YAML file")
    r.add_argument("--method", action="append", type=parse_method, metavar="METHOD[:k=v,...]",
                   help=f"delta method, repeat to combine; one of {', '.join(available_methods())} "
                   "(default: bottleneck)%(default).0s")
    r.add_argument("--strategy", default=DEFAULTS["strategy"], choices=list(STRATEGIES),
                   help="; ".join(f"{k}: {v.description}" for k, v in STRATEGIES.items()))
    r.add_argument("--strategy-option", action="append", default=[], metavar="KEY=VALUE[,KEY=VALUE]",
                   help="strategy options, e.g. ewc_lambda=100 (avalanche-ewc), mem_size=500 (avalanche-replay), "
                   "backbone_lr=3e-5 (seq-ft, avalanche-*); `continual list strategies` shows each one's")
    r.add_argument("--backbone", default=DEFAULTS["backbone"], help=f"{', '.join(BACKBONES)}, a local path or a hub id")
    r.add_argument("--max-train", type=int, default=DEFAULTS["max_train"], help="cap on training examples per task (0: none)")
    r.add_argument("--max-eval", type=int, default=DEFAULTS["max_eval"], help="cap on dev and test examples per task (0: none)")
    r.add_argument("--steps", type=int, default=DEFAULTS["steps"], help="training steps per task")
    r.add_argument("--batch-size", type=int, default=DEFAULTS["batch_size"])
    r.add_argument("--lr", type=float, default=None, help="delta learning rate (default: each method's own)")
    r.add_argument("--head-lr", type=float, default=1e-3, help="learning rate of the task heads")
    r.add_argument("--max-length", type=int, default=DEFAULTS["max_length"], help="tokens per example (BBC uses 128)")
    r.add_argument("--eval-every", type=int, default=DEFAULTS["eval_every"], help="steps between dev evaluations")
    r.add_argument("--patience", type=int, default=DEFAULTS["patience"], help="dev evaluations without gain before stopping (0: never)")
    r.add_argument("--seed", type=int, default=DEFAULTS["seed"], help="seeds splits, initialisation and training")
    r.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    r.add_argument("--precision", default="fp32", choices=PRECISIONS,
                   help="training/eval precision (auto: bf16 on a GPU that has it, else fp32)")
    r.add_argument("--compile", default=None, choices=COMPILE_MODES,
                   help="torch.compile the training forward pass with this mode (pays off on a GPU)")
    r.add_argument("--bucket", action="store_true", help="length-bucketed training batches (less padding)")
    r.add_argument("--fast", action="store_true",
                   help="the fast path: --precision auto --bucket, and --compile default on a GPU")
    r.add_argument("--out", default=None, help="output directory (default: runs/<stream>-<strategy>-<methods>-s<seed>)")
    r.add_argument("--resume", action="store_true", help="continue the run saved in --out after its last finished task")
    r.add_argument("--overwrite", action="store_true", help="replace a run saved in --out")
    r.add_argument("--tracking-uri", default=DEFAULT_TRACKING_URI, help="MLflow store or server (http://127.0.0.1:5000)")
    r.add_argument("--experiment", default=DEFAULT_EXPERIMENT, help="MLflow experiment name")
    r.add_argument("--run-name", default=None, help="MLflow run name (default: the output directory's name)")
    r.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow (results still go to --out)")
    r.add_argument("--no-progress", action="store_true", help="no progress bars")

    rep = sub.add_parser("report", help="print the matrix and metrics of a run and write its heatmap",
                         formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    rep.add_argument("run", help="a run's output directory, or an MLflow run id / run name")
    rep.add_argument("--tracking-uri", default=DEFAULT_TRACKING_URI, help="MLflow store, for a run id / name")
    rep.add_argument("--experiment", default=DEFAULT_EXPERIMENT)
    rep.add_argument("--plot", default=None, help="heatmap PNG path (default: heatmap.png in the run directory, "
                     "or ./<run>-heatmap.png for an MLflow run)")
    rep.add_argument("--f1", action="store_true", help="show macro-F1 instead of accuracy")
    rep.add_argument("--json", action="store_true", help="print the metrics as JSON")

    ro = sub.add_parser("route", help="task-free inference: route a finished run's test examples to tasks",
                        description="Fit routers on a finished per-task run's training data (frozen backbone "
                        "embeddings), route every test example to a task, serve them through one mixed-task model, "
                        "and report routing accuracy and ACC with routed vs true tasks. Writes routing.json, "
                        "routing-<router>.md/.png into the run directory and logs them to the run's MLflow store.",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _finished_run(ro)
    ro.add_argument("--router", action="append", choices=["prototype", "linear"],
                    help="router(s) to evaluate (default: both)%(default).0s")
    ro.add_argument("--fit-max", type=int, default=None, help="cap on training examples per task used to fit routers")
    ro.add_argument("--tracking-uri", default=None, help="MLflow store (default: the one the run was logged to)")

    tr = sub.add_parser("transfer", help="zero-shot transfer matrix of a finished run's task deltas",
                        description="Apply each task's delta and head, untouched, to every task with the same label "
                        "names; print relative performance (accuracy / the target's own accuracy) as a table and a "
                        "heatmap; write transfer.csv/.md/.png into the run directory and log them to its MLflow run.",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _finished_run(tr)

    co = sub.add_parser("combine", help="combine delta methods on one task, simultaneously or sequentially, over a grid",
                        description="For each --combo and --mode, train the methods on one real task from the same "
                        "seed and split: simultaneous (all at once) or sequential (train one, freeze it, train the next "
                        "on top). Prints and writes a Markdown table (test/dev accuracy, trainable parameters, time, "
                        "accuracy after each stage) and logs one MLflow run per cell.",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    co.add_argument("--task", default="movie", help="a built-in data set (continual list data)")
    co.add_argument("--combo", action="append", metavar="M1+M2[+...]",
                    help="methods joined by '+', options as in --method (lora:rank=4+bitfit); repeat for a grid "
                    "(default: lora+bitfit, bottleneck+bitfit, lora+prompt)%(default).0s")
    co.add_argument("--mode", action="append", choices=["simultaneous", "sequential"], help="default: both%(default).0s")
    _training_options(co, "training steps per stage")
    co.add_argument("--out", default=None, help="where the table goes (default: runs/combine-<task>-s<seed>)")
    co.add_argument("--tracking-uri", default=DEFAULT_TRACKING_URI)
    co.add_argument("--no-mlflow", action="store_true")

    cp = sub.add_parser("compare", help="run several methods and baselines on a stream and write a comparison report",
                        description="Run each --entry (strategy or strategy:method+method) on the stream into "
                        "<out>/<entry> (finished entries are reused, killed ones resume) and write report.md, "
                        "report.json and report.png (ACC, BWT, FWT, forgetting, trainable parameters, delta size on "
                        "disk, wall time per entry), logged to MLflow as a 'compare' run.",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    cp.add_argument("--stream", default=DEFAULTS["stream"])
    cp.add_argument("--entry", action="append", metavar="STRATEGY[@K=V,...][:M1+M2]",
                    help="repeat; e.g. per-task:lora, seq-ft, avalanche-ewc@ewc_lambda=100, avalanche-replay "
                    "(Avalanche baselines need the [avalanche] extra); default: per-task:bottleneck, per-task:lora, "
                    "seq-delta:lora, seq-ft%(default).0s")
    _training_options(cp)
    cp.add_argument("--out", default=None, help="default: runs/compare-<stream>-s<seed>")
    cp.add_argument("--tracking-uri", default=DEFAULT_TRACKING_URI)
    cp.add_argument("--no-mlflow", action="store_true")
    cp.add_argument("--no-progress", action="store_true")

    ls = sub.add_parser("list", help="list methods, streams, backbones and strategies")
    ls.add_argument("what", nargs="?", choices=["methods", "streams", "backbones", "strategies", "data"], default=None)
    return p


def cmd_run(args: argparse.Namespace) -> int:
    from adapters import DeltaModel

    from .runner import run_stream
    from .strategies import make_strategy
    from .tracking import MLflowLogger
    from .train import TrainConfig
    from streams import load_stream

    methods = args.method or ["bottleneck"]
    options = {k: v for text in args.strategy_option for k, v in parse_options(text).items()}
    strategy = make_strategy(args.strategy, methods, **options)
    label = "ft" if strategy.trains_backbone else _method_label(methods)
    out = Path(args.out or f"runs/{Path(args.stream).stem}-{args.strategy}-{label}-s{args.seed}")
    cap = lambda v: v or None  # noqa: E731  0 means no cap
    stream = load_stream(args.stream, args.seed, cap(args.max_train), cap(args.max_eval))
    print(f"stream {stream.name}: " + ", ".join(f"{t.name} ({len(t.train)}/{len(t.dev)}/{len(t.test)})" for t in stream))
    import torch

    torch.manual_seed(args.seed)  # weights a checkpoint lacks (an unused pooler) start the same every run
    model = DeltaModel.from_pretrained(args.backbone)
    opts = dict(max_steps=args.steps, batch_size=args.batch_size, lr=args.lr, head_lr=args.head_lr,
                max_length=args.max_length, eval_every=args.eval_every, patience=args.patience or None,
                seed=args.seed, device=args.device, progress=not args.no_progress)
    speed = dict(precision=args.precision, compile=args.compile, bucket=args.bucket)
    if args.fast:
        config = TrainConfig.fast(**opts, **{k: v for k, v in speed.items() if v not in (None, False, "fp32")})
    else:
        config = TrainConfig(**opts, **speed)
    loggers = [] if args.no_mlflow else [MLflowLogger(args.tracking_uri, args.experiment, args.run_name or out.name)]
    result = run_stream(stream, model, strategy, config, out, seed=args.seed, loggers=loggers, resume=args.resume,
                        overwrite=args.overwrite, progress=not args.no_progress,
                        extra_params={"command": " ".join(sys.argv)})
    print(f"\n{stream.name} / {args.strategy} / {label}: accuracy matrix R[i, j] (row: after training task i)")
    print(result.table())
    print(f"\nmacro-F1:\n{result.table(f1=True)}")
    print(f"\nwall time {result.seconds:.0f} s; results, matrix.csv and heatmap.png in {out}/")
    if loggers:
        print(f"MLflow run {result.tracking.get('parent_run_id')} in {args.tracking_uri}; browse with:\n"
              f"  mlflow ui --backend-store-uri {args.tracking_uri}    (then open http://127.0.0.1:5000)")
    return 0


def load_report(run: str, tracking_uri: str, experiment: str) -> tuple[dict[str, Any], Path | None]:
    """A run's results (from its directory, or from MLflow by run id or name) and its directory."""
    path = Path(run)
    if path.is_dir():
        for name in ("results.json", "state.json"):
            if (path / name).exists():
                data = json.loads((path / name).read_text())
                if name == "state.json":  # unfinished run: what is done so far
                    from .metrics import AccuracyMatrix

                    data["metrics"] = AccuracyMatrix.from_dict(data["matrix"]).result()
                    data["unfinished"] = True
                return data, path
        raise FileNotFoundError(f"{path} holds no results.json or state.json: not a stream run directory")
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient(tracking_uri)
    try:
        run_obj = client.get_run(run)
    except MlflowException:
        exp = client.get_experiment_by_name(experiment)
        runs = [] if exp is None else client.search_runs([exp.experiment_id], f"attributes.run_name = '{run}'",
                                                          order_by=["attributes.start_time DESC"], max_results=1)
        if not runs:
            raise FileNotFoundError(f"{run!r} is neither a run directory nor an MLflow run id / name in "
                                    f"{tracking_uri} (experiment {experiment!r})") from None
        run_obj = runs[0]
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        try:
            local = client.download_artifacts(run_obj.info.run_id, "results.json", tmp)
        except Exception:
            raise FileNotFoundError(f"MLflow run {run_obj.info.run_id} has no results.json (unfinished?); report "
                                    "on its output directory instead") from None
        return json.loads(Path(local).read_text()), None


def cmd_report(args: argparse.Namespace) -> int:
    from .metrics import AccuracyMatrix
    from .plots import format_matrix, heatmap

    data, directory = load_report(args.run, args.tracking_uri, args.experiment)
    matrix = AccuracyMatrix.from_dict(data["matrix"])
    metrics = {k: (math.nan if v is None else v) for k, v in data["metrics"].items()}
    if args.json:
        print(json.dumps(data["metrics"], indent=2))
    else:
        tag = " (unfinished)" if data.get("unfinished") else ""
        print(f"{data['identity']['stream']} / {data['identity']['strategy']['strategy']}{tag}")
        print(format_matrix(matrix, metrics, args.f1))
    plot = Path(args.plot) if args.plot else (directory / "heatmap.png" if directory else Path(f"{args.run}-heatmap.png"))
    heatmap(matrix, plot, f1=args.f1)
    print(f"heatmap: {plot}")
    return 0


def cmd_route(args: argparse.Namespace) -> int:
    from .route import format_results, route_run

    results = route_run(args.run, args.backbone, args.router or ["prototype", "linear"], args.fit_max, args.tracking_uri)
    print(format_results(results))
    return 0


def cmd_transfer(args: argparse.Namespace) -> int:
    from .transfer import log_transfer, transfer_matrix

    matrix = transfer_matrix(args.run, args.backbone)
    files = matrix.save(Path(args.run))
    print(matrix.table())
    child = log_transfer(args.run, files, matrix)
    print(f"files: {', '.join(str(f) for f in files)}" + (f"; MLflow run {child}" if child else ""))
    return 0


def cmd_combine(args: argparse.Namespace) -> int:
    import torch

    from adapters import DeltaModel
    from streams import builtin_task

    from .combine import study_table, train_combination
    from .tracking import experiment

    combos = [[parse_method(m) for m in c.split("+")] for c in (args.combo or ["lora+bitfit", "bottleneck+bitfit", "lora+prompt"])]
    modes = args.mode or ["simultaneous", "sequential"]
    task = builtin_task(args.task, args.seed, args.max_train or None, args.max_eval or None)
    torch.manual_seed(args.seed)
    model = DeltaModel.from_pretrained(args.backbone)
    config = _train_config(args)
    out = Path(args.out or f"runs/combine-{args.task}-s{args.seed}")
    out.mkdir(parents=True, exist_ok=True)
    client, exp_id = (None, None) if args.no_mlflow else experiment(args.tracking_uri, "combinations")
    results = []
    for methods in combos:
        for mode in modes:
            r = train_combination(model, "combo", task.splits(), methods, mode, task.label_names, config)
            results.append(r)
            print(f"{'+'.join(r.methods)} {mode}: test accuracy {r.test_accuracy:.3f}", flush=True)
            for name in reversed(list(model.tasks)):
                model.remove_task(name)
            if client is not None:
                run = client.create_run(exp_id, run_name=f"{args.task}-{'+'.join(r.methods)}-{mode}",
                                        tags={"task": args.task, "mode": mode})
                for k, v in {"methods": "+".join(r.methods), "mode": mode, "task": args.task, "steps": args.steps,
                             "seed": args.seed}.items():
                    client.log_param(run.info.run_id, k, v)
                for k in ("test_accuracy", "dev_accuracy", "trainable_params", "seconds"):
                    client.log_metric(run.info.run_id, k, float(getattr(r, k)))
                client.set_terminated(run.info.run_id)
    table = study_table(results)
    print(table)
    (out / "combinations.md").write_text(table + "\n")
    (out / "combinations.json").write_text(json.dumps([dataclasses.asdict(r) for r in results], indent=1))
    print(f"table: {out / 'combinations.md'}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from streams import load_stream

    from .compare import compare, parse_entry, report_markdown, write_report

    entries = [parse_entry(e) for e in (args.entry or ["per-task:bottleneck", "per-task:lora", "seq-delta:lora", "seq-ft"])]
    stream = load_stream(args.stream, args.seed, args.max_train or None, args.max_eval or None)
    config = _train_config(args, not args.no_progress)
    out = Path(args.out or f"runs/compare-{Path(args.stream).stem}-s{args.seed}")
    rows = compare(stream, entries, config, out, args.backbone, args.seed, not args.no_progress,
                   None if args.no_mlflow else args.tracking_uri)
    files = write_report(stream.name, rows, out, None if args.no_mlflow else args.tracking_uri)
    print(report_markdown(stream.name, rows))
    print(f"report: {', '.join(str(f) for f in files)}")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from adapters import BACKBONES, DeltaError, available_methods, make_config
    from streams import SOURCES, STREAMS

    from .strategies import STRATEGIES

    what = args.what
    if what in (None, "methods"):
        print("methods (combine with repeated --method; options as --method lora:rank=16):")
        for m in available_methods():
            try:
                cfg = make_config(m).to_dict()
                print(f"  {m:<12} " + ", ".join(f"{k}={v}" for k, v in cfg.items() if k != "method"))
            except DeltaError as e:  # a method with a required option
                print(f"  {m:<12} ({e})")
    if what in (None, "strategies"):
        print("strategies:")
        for k, v in STRATEGIES.items():
            opts = getattr(v, "defaults", {})
            print(f"  {k:<16} {v.description}" + (f" [options: {', '.join(f'{o}={d}' for o, d in opts.items())}]" if opts else ""))
    if what in (None, "streams"):
        print("streams (or a YAML file, see streams/stream.py):")
        for k, v in STREAMS.items():
            print(f"  {k:<18} {' -> '.join(v)}")
    if what in (None, "data"):
        print(f"built-in data sets (for YAML 'source:'): {', '.join(SOURCES)}")
    if what in (None, "backbones"):
        print(f"backbones: {', '.join(BACKBONES)} (default minilm), a local path, or a hub id (needs network)")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from adapters import DeltaError
    from streams import DataError

    from .runner import RunStateError

    try:
        return {"run": cmd_run, "report": cmd_report, "route": cmd_route, "transfer": cmd_transfer, "combine": cmd_combine, "compare": cmd_compare, "list": cmd_list}[args.command](args)
    except (DataError, DeltaError, RunStateError, FileNotFoundError, ValueError, ImportError, argparse.ArgumentTypeError) as e:
        print(f"continual {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\ncontinual {args.command}: interrupted; finished tasks are saved, continue with --resume",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
