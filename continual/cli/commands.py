"""What each ``continual`` sub-command does: turn the parsed options into typed objects (method
specs into delta configs, settings into a TrainConfig), call the libraries, print, draw, log."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from adapters import BACKBONES, DEFAULT_METHOD, DeltaError, DeltaModel, available_methods, get_method, make_config
from adapters.spec import methods_label, parse_combo, parse_options
from streams import GENERATIVE_STREAMS, SOURCES, STREAMS, builtin_task, load_stream

from ..metrics import AccuracyMatrix, score_label
from ..plots import check_image_path, format_matrix, heatmap
from ..rundir import check_out, not_a_run, run_info
from ..scheduler import run_stream
from ..strategies import STRATEGIES, default_methods, make_strategy
from ..guard import check_resume_store
from ..tracking import (COMBINATIONS_EXPERIMENT, DEFAULT_EXPERIMENT, MLflowLogger, check_experiment, check_tracking_uri,
                        fetch_results, log_combination)
from ..training import TrainConfig, distributed
from ..training.config import MAX_RUN_SEED, check_seed


def train_config(args: argparse.Namespace) -> TrainConfig:
    """The one TrainConfig (a Recipe and its Runtime) of every command that trains (run, combine,
    compare), from the options they all share (parser.training_options); validated once, here."""
    config = TrainConfig(
        max_steps=args.steps, batch_size=args.batch_size, max_length=args.max_length, eval_every=args.eval_every,
        patience=args.patience or None,  # --patience 0: never stop early
        lr=args.lr, head_lr=args.head_lr, seed=args.seed, dropout=not args.no_dropout, router=getattr(args, "router", TrainConfig.router),
        device=args.device,
        progress=not getattr(args, "no_progress", False), precision=args.precision, bucket=args.bucket,
        # --fast adds what the fast path has beyond the defaults (compile on a GPU); an explicit --compile wins
        compile=args.compile or (TrainConfig.fast(device=args.device).compile if args.fast else None),
        dropout_masks=args.dropout_masks, malloc=args.malloc, shard_backbone=getattr(args, "shard_backbone", False))
    if args.fast and config.compile is None:  # asked for and silently nothing, on a CPU
        print("--fast: on a CPU the fast path's settings are the defaults already; it adds nothing here", file=sys.stderr)
    return config  # validated when made: everything below trusts it


def _cap(v: int) -> int | None:
    return v or None  # 0 means no cap


def cmd_run(args: argparse.Namespace) -> int:
    # "--method lora+bitfit" is "--method lora --method bitfit", as combine's and compare's specs read it
    methods = [c for m in args.method or [] for c in parse_combo(m)] or None  # None: the default, or none for seq-ft
    options: dict = {}
    for text in args.strategy_option:  # repeated --strategy-option flags add up; a key twice is an error
        options.update(parse_options(text, "--strategy-option", options))
    strategy = make_strategy(args.strategy, methods, **options)
    config = train_config(args)
    device = config.torch_device()  # an unusable --device is an error before anything is loaded or deleted
    if not args.no_mlflow:
        check_tracking_uri(args.tracking_uri)
        check_experiment(args.tracking_uri, args.experiment)  # a deleted one: refused before the run, not after
    started = distributed.init_from_env(device)  # under torchrun / accelerate launch: join the group
    try:
        return _run(args, strategy, config)
    finally:
        if started:
            distributed.shutdown()


def _run(args: argparse.Namespace, strategy: Any, config: TrainConfig) -> int:
    main = distributed.is_main()  # with several processes, rank 0 alone prints and logs
    say = print if main else (lambda *a, **k: None)
    label = "ft" if strategy.trains_backbone else methods_label(strategy.methods)
    out = Path(args.out or f"runs/{Path(args.stream).stem}-{args.strategy}-{label}-s{args.seed}")
    check_out(out)  # a file, a path under a file or a read-only mount: refused before anything loads
    if args.resume and not args.no_mlflow:
        check_resume_store(out, args.tracking_uri)
    stream = load_stream(args.stream, args.seed, _cap(args.max_train), _cap(args.max_eval))
    say(f"stream {stream.name}: " + ", ".join(f"{t.name} ({len(t.train)}/{len(t.dev)}/{len(t.test)})" for t in stream))
    if distributed.active():
        say(f"{distributed.world_size()} processes ({'nccl' if config.torch_device().type == 'cuda' else 'gloo'}), "
            f"global batch {config.batch_size}: each trains on its slice and scores its shard; rank 0 writes {out}/")
    torch.manual_seed(args.seed)  # whatever draws before the first task's own seed draws from this run's
    model = DeltaModel.from_pretrained(args.backbone)
    loggers = [MLflowLogger(args.tracking_uri, args.experiment, args.run_name or out.name)] if main and not args.no_mlflow else []
    result = run_stream(stream, model, strategy, config, out, loggers=loggers, resume=args.resume,
                        overwrite=args.overwrite, extra_params={"command": " ".join(sys.argv)},
                        rescore_all=args.rescore_all)
    if not main:
        return 0
    print(f"\n{stream.name} / {args.strategy} / {label}: {score_label(result.matrix)} matrix R[i, j] (row: after training task i; "
          "mean seen: the mean over the tasks trained so far)")
    print(result.table())
    print(f"\nmacro-F1:\n{result.table(f1=True)}")
    print(f"\nwithout the task id ({config.router} router fitted on the tasks seen so far; A[i, j], the mean seen and "
          f"the routing accuracy per row):\n{result.table(agnostic=True)}")
    print(f"\nwall time {result.seconds:.0f} s; results, matrix.csv, matrix_agnostic.csv and the heatmaps in {out}/")
    if loggers and result.tracking.get("sync_needed"):
        print(f"MLflow logging stopped during the run ({result.tracking['sync_needed']}); everything is in {out}/. "
              f"Upload it with:\n  continual sync {out} --tracking-uri {args.tracking_uri}")
    elif loggers:
        print(f"MLflow run {result.tracking.get('parent_run_id')} in {args.tracking_uri}; browse with:\n"
              f"  mlflow ui --backend-store-uri {args.tracking_uri}    (then open http://127.0.0.1:5000)")
    return 0


def cmd_sync(args: argparse.Namespace) -> int:
    from ..sync import logged_already, sync_run

    check_tracking_uri(args.tracking_uri)  # quick HTTP timeouts: a silent server is an error within seconds, not a hang
    check_experiment(args.tracking_uri, args.experiment)
    existing = None if args.again else logged_already(run_info(Path(args.run)), args.tracking_uri, args.experiment)
    if existing:
        print(f"{args.run} is already in {args.tracking_uri} as MLflow run {existing} (experiment "
              f"{args.experiment!r}); nothing logged (--again logs another copy)")
        return 0
    run_id = sync_run(args.run, args.tracking_uri, args.experiment, args.run_name, again=True)
    print(f"{args.run} logged to {args.tracking_uri} as MLflow run {run_id} (experiment {args.experiment!r})")
    return 0


def load_report(run: str, tracking_uri: str, experiment: str) -> tuple[dict[str, Any], Path | None]:
    """A run's results (from its directory, or from MLflow by run id or name) and its directory."""
    path = Path(run)
    if not path.is_dir():
        return fetch_results(run, check_tracking_uri(tracking_uri), experiment), None
    data = run_info(path)
    if not data:
        raise FileNotFoundError(not_a_run(path, "holds no results.json or state.json: not a stream run directory"))
    if "metrics" not in data:  # state.json of an unfinished run: what is done so far
        data["metrics"] = AccuracyMatrix.from_dict(data["matrix"]).result()
        data["unfinished"] = True
    return data, path


def cmd_report(args: argparse.Namespace) -> int:
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one small file: a bar is noise
    data, directory = load_report(args.run, args.tracking_uri, args.experiment)
    plot = Path(args.plot) if args.plot else (directory / "heatmap.png" if directory else Path(f"{args.run}-heatmap.png"))
    if plot.is_dir():  # (an error by name before the tables, not an OSError traceback after them)
        raise ValueError(f"--plot {plot} is a directory; give a file name")
    check_out(plot.parent, "the heatmap", "--plot")
    check_image_path(plot, "--plot")
    matrix = AccuracyMatrix.from_dict(data["matrix"])
    metrics = {k: (math.nan if v is None else v) for k, v in data["metrics"].items()}
    # with --json, stdout is the JSON alone (a pipe into jq or json.load); the rest goes to stderr
    note = (lambda *a: print(*a, file=sys.stderr)) if args.json else print
    if args.json:  # strict JSON: a metric not defined (yet) is null, never the NaN token
        print(json.dumps({k: v if v is None or math.isfinite(v) else None for k, v in data["metrics"].items()},
                         indent=2, allow_nan=False))
        if data.get("unfinished"):
            note(f"{args.run} is unfinished: metrics that need rows it has not reached are null")
    else:
        tag = " (unfinished)" if data.get("unfinished") else ""
        print(f"{data['identity']['stream']} / {data['identity']['strategy']['strategy']}{tag}")
        print(format_matrix(matrix, metrics, args.f1))
        if not np.isnan(matrix.A).all():  # (runs saved before task-agnostic scoring have none)
            router = data["identity"].get("train", {}).get("router")  # (older runs' identities lack it)
            print(f"\nwithout the task id{f' ({router} router)' if router else ''}:\n{format_matrix(matrix, metrics, agnostic=True)}")
    heatmap(matrix, plot, f1=args.f1)
    note(f"heatmap: {plot}")
    if not np.isnan(matrix.A).all():
        other = plot.with_name(plot.stem + "_agnostic" + plot.suffix)
        heatmap(matrix, other, agnostic=True)
        note(f"heatmap without the task id: {other}")
    return 0


def cmd_route(args: argparse.Namespace) -> int:
    from ..studies.route import format_results, log_routing, route_run

    if args.tracking_uri:
        check_tracking_uri(args.tracking_uri)
    # --fit-max 0: no cap, as every cap of the commands (it used to fit on no example and fail in torch.cat)
    results = route_run(args.run, args.backbone, args.router, _cap(args.fit_max),
                        args.tracking_uri, progress=not args.no_progress)
    print(format_results(results))
    files, child = log_routing(args.run, results, args.tracking_uri)  # after the tables it logs
    print(f"files: {', '.join(str(f) for f in files)}" + (f"; MLflow run {child} (nested under the stream's run)" if child else ""))
    return 0


def cmd_transfer(args: argparse.Namespace) -> int:
    from ..studies.transfer import log_transfer, transfer_matrix

    matrix = transfer_matrix(args.run, args.backbone, progress=not args.no_progress)
    files = matrix.save(Path(args.run))
    print(matrix.table())
    child = log_transfer(args.run, files, matrix)
    print(f"files: {', '.join(str(f) for f in files)}" + (f"; MLflow run {child}" if child else ""))
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from ..studies.merge import log_merge, merge_run

    result = merge_run(args.run, args.how, args.density, args.seed, args.backbone, progress=not args.no_progress)
    files = result.save(Path(args.run))
    print(result.table())
    child = log_merge(args.run, files, result)
    print(f"files: {', '.join(str(f) for f in files)}" + (f"; MLflow run {child}" if child else ""))
    return 0


def cmd_combine(args: argparse.Namespace) -> int:
    from ..studies.combine import check_grid, run_study, study_table

    combos = [parse_combo(c) for c in (args.combo or ["lora+bitfit", "bottleneck+bitfit", "lora+prompt"])]
    check_grid(combos, args.mode or [])
    config = train_config(args)
    out = Path(args.out or f"runs/combine-{args.task}-s{args.seed}")
    check_out(out)  # a file, a path under a file or a read-only mount: refused before anything loads
    if not args.no_mlflow:
        check_tracking_uri(args.tracking_uri)
        check_experiment(args.tracking_uri, COMBINATIONS_EXPERIMENT)
    task = builtin_task(args.task, args.seed, _cap(args.max_train), _cap(args.max_eval))
    torch.manual_seed(args.seed)
    model = DeltaModel.from_pretrained(args.backbone)
    out.mkdir(parents=True, exist_ok=True)

    def report(r: Any) -> None:
        print(f"{'+'.join(r.methods)} {r.mode}: test accuracy {r.test_accuracy:.3f}", flush=True)
        if not args.no_mlflow:
            log_combination(args.tracking_uri, args.task, r, args.steps, args.seed)

    results = run_study(model, task, combos, args.mode or ["simultaneous", "sequential"], config, report)
    table = study_table(results)
    print(table)
    (out / "combinations.md").write_text(table + "\n")
    (out / "combinations.json").write_text(json.dumps([dataclasses.asdict(r) for r in results], indent=1))
    print(f"table: {out / 'combinations.md'}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from ..studies.compare import check_entries, compare, parse_entry, report_markdown, write_report
    from ..studies.pool import check_ray

    entries = [parse_entry(e) for e in (args.entry or ["per-task:bottleneck", "per-task:lora", "seq-delta:lora", "seq-ft"])]
    check_entries(entries)
    if args.seeds and args.seed is not None:
        raise ValueError(f"give --seed or --seeds, not both: --seeds {args.seeds} sets every run's seed")
    args.seed = TrainConfig.command_line().seed if args.seed is None else args.seed
    config = train_config(args)
    seeds = _seeds(args.seeds) if args.seeds is not None else [args.seed]  # an empty --seeds (an unset $SEEDS) is refused
    if args.workers < 1:
        raise ValueError(f"--workers must be >= 1, got {args.workers}")
    if args.ray_address:
        check_ray()
    uri = None if args.no_mlflow else args.tracking_uri
    if uri:
        check_tracking_uri(uri)
        check_experiment(uri, DEFAULT_EXPERIMENT)
    tag = f"s{seeds[0]}" if len(seeds) == 1 else "s" + "-".join(map(str, seeds))
    out = Path(args.out or f"runs/compare-{Path(args.stream).stem}-{tag}")
    check_out(out)  # a file, a path under a file or a read-only mount: refused before anything loads
    streams = {s: load_stream(args.stream, s, _cap(args.max_train), _cap(args.max_eval)) for s in seeds}
    name = next(iter(streams.values())).name
    pool = f"{args.workers} local processes" if args.workers > 1 else "this process"
    print(f"compare: {len(entries)} entries x {len(seeds)} seed(s) on {f'Ray at {args.ray_address}' if args.ray_address else pool}")
    rows = compare(streams if len(seeds) > 1 else streams[seeds[0]], entries,
                   dataclasses.replace(config, seed=seeds[0]), out, args.backbone, uri, workers=args.workers,
                   ray_address=args.ray_address, done=lambda label, row: print(f"  done: {label} (ACC {row['ACC']:.4f})", flush=True))
    files = write_report(name, rows, out, uri)
    print(report_markdown(name, rows))
    print(f"report: {', '.join(str(f) for f in files)}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from ..export import by_reason, export_run, serving_recipe

    done, left_out = export_run(args.run, args.out, args.backbone, args.task, args.base_model, args.max_lora_rank)
    for e in done:
        c = e.config
        what = f"{c['peft_type']} r={c['r']}" if c["peft_type"] == "LORA" else c["peft_type"]
        print(f"{e.task}: {what}, {c['task_type']} -> {e.directory}")
        if c["task_type"] != "FEATURE_EXTRACTION" and e.vllm:
            print("  vLLM would refuse it: " + "; ".join(e.vllm))
    for tasks, why in by_reason(left_out):
        print(f"{', '.join(tasks)}: not exported: {why}")
    recipe = serving_recipe(done, args.max_lora_rank)
    if recipe:
        print("\nserve them (docs/peft.md):\n  " + "\n  ".join(recipe))
    return 0


def _seeds(text: str) -> list[int]:
    try:
        seeds = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--seeds takes integers separated by commas, e.g. 0,1,2; got {text!r}") from None
    if not seeds:
        raise ValueError(f"--seeds needs at least one integer, e.g. 0,1,2; got {text!r}")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds needs distinct integers, got {text!r}")
    for seed in seeds:  # here, before any stream is drawn with it
        check_seed("each of --seeds", seed, MAX_RUN_SEED)
    return seeds


def cmd_list(args: argparse.Namespace) -> int:
    what = args.what
    if what in (None, "methods"):
        print("methods (combine with repeated --method; options as --method lora:rank=16):")
        for m in available_methods():
            try:
                cfg = make_config(m).to_dict()
                where = "" if get_method(m).capabilities.decoders else "   (encoders and T5 only)"
                print(f"  {m:<12} " + ", ".join(f"{k}={v}" for k, v in cfg.items() if k != "method") + where)
            except DeltaError as e:  # a method with a required option
                print(f"  {m:<12} ({e})")
    if what in (None, "strategies"):
        print("strategies:")
        for k, v in STRATEGIES.items():
            opts = getattr(v, "defaults", {})
            own = default_methods(k)
            own = f" [default --method {'+'.join(map(str, own))}]" if own and own != (DEFAULT_METHOD,) else ""
            print(f"  {k:<16} {v.description}{own}" + (f" [options: {', '.join(f'{o}={d}' for o, d in opts.items())}]" if opts else ""))
    if what in (None, "streams"):
        print("streams (or a YAML file, see streams/stream.py; or a published benchmark's folder: cl-benchmark:PATH:order=1..6, trace:PATH, see docs/streams.md):")
        for k, v in STREAMS.items():
            print(f"  {k:<18} {' -> '.join(v)}")
        for k, v in GENERATIVE_STREAMS.items():
            print(f"  {k:<18} {' -> '.join(v)}   (text-to-text: needs a decoder, e.g. --backbone smollm2)")
    if what in (None, "data"):
        print(f"built-in data sets (for YAML 'source:'): {', '.join(SOURCES)}")
    if what in (None, "routers"):
        from fusion.routing import ROUTERS

        print("routers (--router; who answers an input that comes without its task id):")
        for k, v in ROUTERS.items():
            print(f"  {k:<12} {v.summary}" + ("   (default)" if k == TrainConfig.router else ""))
    if what in (None, "backbones"):
        print(f"backbones: {', '.join(BACKBONES)} (default minilm), a local path, or a hub id (needs network)")
    return 0


COMMANDS = {"run": cmd_run, "report": cmd_report, "route": cmd_route, "transfer": cmd_transfer, "merge": cmd_merge, "combine": cmd_combine,
            "compare": cmd_compare, "export": cmd_export, "sync": cmd_sync, "list": cmd_list}
