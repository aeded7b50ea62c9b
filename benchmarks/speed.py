"""Training and mixed-task serving speed: ours against HuggingFace PEFT, in one run, on one device.

    python benchmarks/speed.py                      # GPU: BERT-base size, random init, bf16
    python benchmarks/speed.py --device cpu         # CPU: MiniLM (real weights), 2 threads, fp32
    python benchmarks/speed.py --sections train --methods lora,prompt --batch-sizes 32

Both sides get the same model config, batch (random token ids, no padding), precision and
optimizer hyper-parameters. PEFT runs "as a user runs it": fp32 weights under bf16 autocast with
torch.optim.AdamW (eager), and "compiled": the whole step under torch.compile with fused AdamW.
Ours runs the training step every part of this library uses (continual.training.TrainStep inside
frozen_linears_in, and on a CPU fast_dropout and freed memory held for reuse, as `continual run`
trains by default): eager, and compiled as TrainConfig.fast() does on a GPU. Both train in train()
mode: the backbone's dropout on.

On a CPU each training case runs in a fresh process (the C library's memory settings are
process-wide and cannot be undone): ours with ``--malloc`` (default hold, as `continual run`), PEFT
with the C library's defaults, as its users run it, and once more with ours ("PEFT eager, malloc
hold"), so the table shows how much of the gap is that setting. There "peak GB" is the process's
peak resident memory (Python, torch and the weights included), on a GPU the peak allocated.

Printed: samples/s and peak memory per method and mode, ratios ours/PEFT, model FLOP
utilisation (4 * backbone params * tokens per frozen-backbone training step, against the GPU's
dense bf16 peak), and mixed-task inference throughput with 1, 8 and 64 task deltas (LoRA; our
bottleneck adapters too) relative to one delta. Absolute numbers move between machines: compare
within one run. Needs ``pip install --no-deps peft`` for the PEFT columns (skipped without it).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch
from torch import nn

import adapters
from continual.training.dropout import DROPOUT_MASKS, fast_dropout
from adapters.precision import autocast, frozen_linears_in
from continual.training import MALLOC, TrainStep, make_optimizer, malloc, mfu

# dense bf16 peaks (no sparsity), FLOP/s
PEAKS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12}

# method -> (our config, PEFT config factory or None)
OURS = {
    "lora": {"method": "lora", "rank": 8, "targets": ["query", "value"]},
    "bottleneck": {"method": "bottleneck", "bottleneck_dim": 64},
    "parallel": {"method": "parallel", "bottleneck_dim": 64},
    "compacter": {"method": "compacter"},
    "prefix": {"method": "prefix", "num_tokens": 20},
    "prompt": {"method": "prompt", "num_tokens": 20, "init": "random"},
    "bitfit": {"method": "bitfit"},
}


def peft_config(method: str) -> Any:
    import peft

    if method == "lora":
        return peft.LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"], lora_dropout=0.0, task_type="SEQ_CLS")
    if method == "prompt":
        return peft.PromptTuningConfig(num_virtual_tokens=20, task_type="SEQ_CLS")
    if method == "prefix":
        return peft.PrefixTuningConfig(num_virtual_tokens=20, task_type="SEQ_CLS")
    return None


# -- models -----------------------------------------------------------------------------------------
def bert_config(size: str):
    from transformers import BertConfig

    if size == "base":
        return BertConfig(attn_implementation="sdpa")  # BERT-base: 12 layers, 768 wide, 110M params
    if size == "minilm":
        from adapters.backbones import _minilm

        return BertConfig.from_pretrained(str(_minilm()), attn_implementation="sdpa")
    raise ValueError(size)


def backbone(size: str, device: torch.device) -> nn.Module:
    from transformers import BertModel

    torch.manual_seed(0)
    if size == "minilm":  # real pre-trained weights on CPU
        from adapters.backbones import _minilm

        return BertModel.from_pretrained(str(_minilm()), attn_implementation="sdpa").to(device)
    return BertModel(bert_config(size), add_pooling_layer=False).to(device)


def ours_model(size: str, device: torch.device, method: str) -> adapters.DeltaModel:
    model = adapters.DeltaModel(backbone(size, device))
    model.add_task("t", [OURS[method]], num_labels=2)
    model.activate("t")
    return model.to(device).train()


def classifier(size: str, device: torch.device) -> nn.Module:
    """BertForSequenceClassification, as PEFT and full fine-tuning users start from: real weights
    for minilm, random init for base."""
    from transformers import BertForSequenceClassification

    torch.manual_seed(0)
    cfg = bert_config(size)
    cfg.num_labels = 2
    if size == "minilm":
        from adapters.backbones import _minilm

        return BertForSequenceClassification.from_pretrained(str(_minilm()), config=cfg).to(device).train()
    return BertForSequenceClassification(cfg).to(device).train()


def peft_model(size: str, device: torch.device, method: str) -> nn.Module:
    import peft

    return peft.get_peft_model(classifier(size, device), peft_config(method)).to(device).train()


# -- timing -----------------------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(step: Callable[[], Any], device: torch.device, batch: int, warmup: int, iters: int) -> dict[str, float]:
    """samples/s over ``iters`` steps after ``warmup`` (compilation happens there); peak memory of
    warm-up and timed steps together (weights included)."""
    sync(device)
    if device.type == "cuda":  # before the warm-up: CUDA graphs take their memory pool while recording
        torch.cuda.reset_peak_memory_stats()
    for _ in range(warmup):
        step()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        step()
    sync(device)
    dt = time.perf_counter() - t0
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**30
    else:  # the case's own process (see in_child): its peak resident memory, Python and weights included
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return {"samples_per_s": batch * iters / dt, "peak_gb": peak}


def inputs(size: str, batch: int, seq: int, device: torch.device, seed: int = 0) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    vocab = bert_config(size).vocab_size
    ids = torch.randint(1000, vocab, (batch, seq), generator=g).to(device)
    labels = torch.randint(0, 2, (batch,), generator=g).to(device)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, labels


def free(device: torch.device) -> None:
    import gc

    gc.collect()
    torch._dynamo.reset()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# -- training ---------------------------------------------------------------------------------------
def train_ours(args, device, method: str, batch: int, compile_mode: str | None) -> dict[str, float]:
    malloc.apply(args.malloc, device.type)  # as the training loop does
    model = ours_model(args.size, device, method)
    optimizer = make_optimizer(model.task("t").param_groups(lr=1e-4, head_lr=1e-4), device)
    step = TrainStep(model, optimizer, args.precision, compile_mode, grad_clip=1.0)
    x, y = inputs(args.size, batch, args.seq, device)
    with frozen_linears_in(model.backbone, step.precision), fast_dropout(model.backbone, args.dropout_masks):
        out = measure(lambda: step(x, y), device, batch, args.warmup, args.iters)
    out["trainable"] = sum(p.numel() for p in step.params)
    return out


def train_reference(args, device, method: str | None, batch: int, compiled: bool, hold: bool = False) -> dict[str, float]:
    """PEFT (method given) or full fine-tuning (None), the way their users write the loop
    (``hold``: with our CPU memory setting, see continual.training.malloc)."""
    if hold:
        malloc.hold_freed_memory()
    model = classifier(args.size, device) if method is None else peft_model(args.size, device, method)
    params = [p for p in model.parameters() if p.requires_grad]
    fused = compiled and device.type == "cuda"
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=True if fused else None)
    x, y = inputs(args.size, batch, args.seq, device)

    def step() -> torch.Tensor:
        with autocast(args.precision, device):
            logits = model(**x).logits
        loss = nn.functional.cross_entropy(logits.float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        return loss.detach()

    fn = torch.compile(step) if compiled else step
    out = measure(fn, device, batch, args.warmup, args.iters)
    out["trainable"] = sum(p.numel() for p in params)
    return out


def run_train(args, device, have_peft: bool, rows: list[dict[str, Any]]) -> None:
    modes = args.compile_modes if device.type == "cuda" else []
    isolate = device.type == "cpu"  # each case in a fresh process: see the module docstring
    n_params = args.backbone_params
    for batch in args.batch_sizes:
        tokens = args.seq
        cases: list[tuple[str, str, Callable[[], dict]]] = []
        if args.full_ft and batch == args.batch_sizes[0]:
            cases.append(("full fine-tune", "reference", lambda b=batch: train_reference(args, device, None, b, False)))
        for method in args.methods:
            cases.append((method, "ours eager", lambda m=method, b=batch: train_ours(args, device, m, b, None)))
            for mode in modes:
                cases.append((method, f"ours compiled {mode}", lambda m=method, b=batch, c=mode: train_ours(args, device, m, b, c)))
            if have_peft and peft_config(method) is not None:
                cases.append((method, "PEFT eager", lambda m=method, b=batch: train_reference(args, device, m, b, False)))
                if isolate and args.malloc == "hold":
                    cases.append((method, "PEFT eager, malloc hold",
                                  lambda m=method, b=batch: train_reference(args, device, m, b, False, hold=True)))
                if device.type == "cuda" and (method in args.peft_compile):
                    cases.append((method, "PEFT compiled", lambda m=method, b=batch: train_reference(args, device, m, b, True)))
        if args.child_case is not None:  # this process is one case of a parent run
            if args.child_case[0] == batch:
                print(CHILD + json.dumps(cases[args.child_case[1]][2]()), flush=True)
            continue
        # --repeats: the cases round-robin, so a slow spell of the machine hits ours and PEFT alike;
        # the row keeps the median rate and every run's
        runs: list[list[dict[str, Any]]] = [[] for _ in cases]
        for _ in range(args.repeats):
            for i, (method, mode, fn) in enumerate(cases):
                try:
                    r = in_child(args, batch, i) if isolate else fn()
                except Exception as e:  # one failing case must not hide the others
                    r = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"}
                if not isolate:  # (a case in its own process took its memory with it)
                    free(device)
                r.update(section="train", method=method, mode=mode, batch=batch, seq=tokens)
                print(json.dumps(r), flush=True)
                runs[i].append(r)
        for (method, mode, _), done in zip(cases, runs):
            ok = sorted((r for r in done if "samples_per_s" in r), key=lambda r: r["samples_per_s"])
            r = dict(ok[len(ok) // 2], runs=[x["samples_per_s"] for x in done if "samples_per_s" in x]) if ok else done[0]
            if "samples_per_s" in r and args.peak:
                r["mfu"] = mfu(r["samples_per_s"], tokens, n_params, args.peak, 6 if mode == "reference" else 4)
            rows.append(r)


CHILD = "speed-case: "


def in_child(args, batch: int, index: int) -> dict[str, Any]:
    """Run training case ``index`` of ``batch`` in a fresh Python process (same options)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), *args.argv, "--child-case", f"{batch},{index}"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith(CHILD):
            return json.loads(line[len(CHILD):])
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    raise RuntimeError(f"the case's process exited with {proc.returncode}: {tail[:160]}")


# -- mixed-task inference -----------------------------------------------------------------------------
def mixed_ours(args, device, method: str, n_tasks: int, compiled: bool) -> dict[str, float]:
    model = adapters.DeltaModel(backbone(args.size, device))
    g = torch.Generator().manual_seed(1)
    for i in range(max(n_tasks, 1)):
        t = model.add_task(f"t{i}", [OURS[method]], num_labels=2)
        with torch.no_grad():
            for p in t.parameters():
                p.add_(0.01 * torch.randn(p.shape, generator=g).to(p.device))
    model.to(device).eval()
    x, _ = inputs(args.size, args.infer_batch, args.seq, device)
    precision = "bf16" if args.precision == "bf16" else "fp32"
    with frozen_linears_in(model.backbone, precision), torch.inference_mode():
        if n_tasks == 1:
            model.activate("t0")
            fn = torch.compile(model, mode=args.compile_modes[0]) if compiled else model
            call = lambda: fn(**x)  # noqa: E731
        else:
            mixed = model.mixed(dtype=torch.bfloat16 if precision == "bf16" else None)
            ids = torch.arange(args.infer_batch, device=device) % n_tasks
            fn = torch.compile(mixed, mode=args.compile_modes[0]) if compiled else mixed
            call = lambda: fn(**x, task_ids=ids)  # noqa: E731
        with autocast(precision, device):
            return measure(call, device, args.infer_batch, args.warmup, args.iters)


def mixed_peft(args, device, n_tasks: int) -> dict[str, float]:
    import peft

    base = backbone(args.size, torch.device("cpu"))
    cfg = peft.LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"], lora_dropout=0.0, init_lora_weights=False)
    model = peft.get_peft_model(base, cfg, adapter_name="t0")
    for i in range(1, n_tasks):
        model.add_adapter(f"t{i}", copy.deepcopy(cfg))
    model.to(device).eval()
    x, _ = inputs(args.size, args.infer_batch, args.seq, device)
    names = [f"t{i % n_tasks}" for i in range(args.infer_batch)]
    with torch.inference_mode(), autocast(args.precision, device):
        if n_tasks == 1:
            call = lambda: model(**x)  # noqa: E731
        else:
            call = lambda: model(**x, adapter_names=names)  # noqa: E731
        return measure(call, device, args.infer_batch, args.warmup, args.iters)


def run_mixed(args, device, have_peft: bool, rows: list[dict[str, Any]]) -> None:
    cases = []
    for n in args.tasks:
        for method in args.mixed_methods:
            cases.append((method, "ours eager", n, lambda m=method, k=n: mixed_ours(args, device, m, k, False)))
            if device.type == "cuda" and args.mixed_compile:
                cases.append((method, "ours compiled", n, lambda m=method, k=n: mixed_ours(args, device, m, k, True)))
        if have_peft:
            cases.append(("lora", "PEFT eager", n, lambda k=n: mixed_peft(args, device, k)))
    for method, mode, n, fn in cases:
        try:
            r = fn()
        except Exception as e:
            r = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"}
        free(device)
        r.update(section="mixed", method=method, mode=mode, tasks=n, batch=args.infer_batch, seq=args.seq)
        rows.append(r)
        print(json.dumps(r), flush=True)


# -- report -----------------------------------------------------------------------------------------
def table(rows: list[dict[str, Any]]) -> str:
    out = []
    train = [r for r in rows if r["section"] == "train"]
    if train:
        peft_modes = [m for m in ("PEFT eager", "PEFT eager, malloc hold", "PEFT compiled") if any(r["mode"] == m for r in train)]
        out += ["## Training (samples/s, peak GB; ratio = ours / PEFT in that mode)", "",
                "| method | batch | mode | samples/s | peak GB | MFU | " + " | ".join(f"ours/{m}" for m in peft_modes) + " |",
                "|---|---|---|---|---|---|" + "---|" * len(peft_modes)]
        ref = {(r["method"], r["batch"], r["mode"]): r.get("samples_per_s") for r in train}
        for r in train:
            if "error" in r:
                out.append(f"| {r['method']} | {r['batch']} | {r['mode']} | failed: {r['error']} | | |" + " |" * len(peft_modes))
                continue
            ratio = lambda mode: (  # noqa: E731
                f"{r['samples_per_s'] / ref[(r['method'], r['batch'], mode)]:.2f}x"
                if r["mode"].startswith("ours") and ref.get((r["method"], r["batch"], mode)) else "")
            mf = f"{100 * r['mfu']:.1f}%" if "mfu" in r else ""
            rate = f"{r['samples_per_s']:.0f}"
            if len(r.get("runs", [])) > 1:  # median (slowest-fastest)
                rate += f" ({min(r['runs']):.0f}-{max(r['runs']):.0f})"
            out.append(f"| {r['method']} | {r['batch']} | {r['mode']} | {rate} | {r['peak_gb']:.2f} | {mf} | "
                       + " | ".join(ratio(m) for m in peft_modes) + " |")
    mixed = [r for r in rows if r["section"] == "mixed"]
    if mixed:
        out += ["", "## Mixed-task inference (samples/s; relative = vs. one delta, same method and mode)", "",
                "| method | mode | task deltas | samples/s | relative to 1 delta |", "|---|---|---|---|---|"]
        one = {(r["method"], r["mode"]): r.get("samples_per_s") for r in mixed if r["tasks"] == 1}
        for r in mixed:
            if "error" in r:
                out.append(f"| {r['method']} | {r['mode']} | {r['tasks']} | failed: {r['error']} | |")
                continue
            base = one.get((r["method"], r["mode"]))
            rel = f"{r['samples_per_s'] / base:.2f}x" if base else ""
            out.append(f"| {r['method']} | {r['mode']} | {r['tasks']} | {r['samples_per_s']:.0f} | {rel} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if cuda else "cpu")
    p.add_argument("--size", default=None, help="base (BERT-base config, random init) or minilm (real weights); default: base on GPU, minilm on CPU")
    p.add_argument("--sections", default="train,mixed", help="train, mixed or both")
    p.add_argument("--methods", default=None, help=f"training methods (of {', '.join(OURS)}); default: all on GPU, lora,prompt on CPU")
    p.add_argument("--peft-compile", default="lora", help="methods whose PEFT step is also measured compiled (GPU)")
    p.add_argument("--batch-sizes", default=None, help="training batch sizes (default: 32,256 on GPU, 8 on CPU)")
    p.add_argument("--seq", type=int, default=None, help="tokens per example (default: 128 on GPU, 64 on CPU)")
    p.add_argument("--infer-batch", type=int, default=None, help="mixed-task inference batch (default: 64 on GPU, 16 on CPU)")
    p.add_argument("--tasks", default="1,8,64", help="numbers of task deltas for mixed-task inference")
    p.add_argument("--mixed-methods", default="lora,bottleneck")
    p.add_argument("--precision", default=None, help="bf16 (GPU default) or fp32 (CPU default)")
    p.add_argument("--dropout-masks", default="fast", choices=DROPOUT_MASKS,
                   help="our rows: the backbone's dropout masks as `continual run` draws them by default (fast, "
                   "continual.training.dropout) or torch's bernoulli_ (torch); PEFT always uses torch's")
    p.add_argument("--malloc", default="hold", choices=MALLOC,
                   help="our rows on a CPU: freed memory held for reuse as `continual run` does by default (hold, "
                   "continual.training.malloc) or the C library's defaults; PEFT rows get the defaults, and "
                   "with hold one more PEFT row gets hold too")
    p.add_argument("--child-case", default=None, help=argparse.SUPPRESS)  # BATCH,INDEX: run one case (internal)
    p.add_argument("--compile-modes", default="default,reduce-overhead", help="torch.compile modes of our compiled training rows (GPU)")
    p.add_argument("--mixed-compile", action="store_true", help="also time mixed-task inference compiled (first of --compile-modes)")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--iters", type=int, default=None)
    p.add_argument("--threads", type=int, default=2, help="CPU threads")
    p.add_argument("--repeats", type=int, default=1,
                   help="measure every training case this many times, round-robin; rows give the median (and range)")
    p.add_argument("--no-full-ft", dest="full_ft", action="store_false", help="skip the full fine-tuning reference row")
    p.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak for MFU (default: from the GPU name)")
    p.add_argument("--json", default=None, help="also write all rows to this JSON file")
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    args.child_case = tuple(int(x) for x in args.child_case.split(",")) if args.child_case else None

    device = torch.device(args.device)
    gpu = device.type == "cuda"
    if not gpu:
        torch.set_num_threads(args.threads)
    args.size = args.size or ("base" if gpu else "minilm")
    args.methods = (args.methods or (",".join(OURS) if gpu else "lora,prompt")).split(",")
    args.peft_compile = args.peft_compile.split(",")
    args.compile_modes = args.compile_modes.split(",")
    args.batch_sizes = [int(b) for b in (args.batch_sizes or ("32,256" if gpu else "8")).split(",")]
    args.seq = args.seq or (128 if gpu else 64)
    args.infer_batch = args.infer_batch or (64 if gpu else 16)
    args.tasks = [int(n) for n in args.tasks.split(",")]
    args.mixed_methods = args.mixed_methods.split(",")
    args.precision = args.precision or ("bf16" if gpu else "fp32")
    args.warmup = args.warmup or (8 if gpu else 2)
    args.iters = args.iters or (30 if gpu else 5)
    unknown = [m for m in args.methods if m not in OURS]
    if unknown:
        p.error(f"unknown methods {unknown}; known: {list(OURS)}")
    name = torch.cuda.get_device_name(device) if gpu else f"CPU ({args.threads} threads)"
    args.peak = args.peak_tflops * 1e12 if args.peak_tflops else next((v for k, v in PEAKS.items() if k in name), None) if gpu else None
    # (not in a case's own process: loading and dropping a model first would change the C library's
    # memory state that the case is measured in)
    args.backbone_params = 0 if args.child_case else sum(p.numel() for p in backbone(args.size, torch.device("cpu")).parameters())
    have_peft = importlib.util.find_spec("peft") is not None
    import transformers

    versions = f"torch {torch.__version__}, transformers {transformers.__version__}"
    if have_peft:
        import peft

        versions += f", peft {peft.__version__}"
    if args.child_case is not None:
        run_train(args, device, have_peft, [])
        return
    print(f"device: {name}; {versions}; model: {args.size}; precision {args.precision}; seq {args.seq}", flush=True)
    if not have_peft:
        print("peft is not installed: PEFT rows skipped (pip install --no-deps peft)", flush=True)
    rows: list[dict[str, Any]] = []
    sections = args.sections.split(",")
    if "train" in sections:
        run_train(args, device, have_peft, rows)
    if "mixed" in sections:
        run_mixed(args, device, have_peft, rows)
    print()
    print(f"device: {name}; {versions}; model: {args.size}; precision {args.precision}; seq {args.seq}")
    if args.peak:
        print(f"MFU: 4 x {args.backbone_params / 1e6:.1f}M backbone params x tokens "
              f"per frozen-backbone step (6x for full fine-tuning), against {args.peak / 1e12:.0f} TFLOP/s dense bf16")
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
