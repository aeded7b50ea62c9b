"""Greedy decoding speed: ours against HF ``generate`` + PEFT, one LoRA and mixed batches of 8 and 64.

    python3 benchmarks/decode_speed.py                               # SmolLM2, batch 8, 16 tokens, fp32 and bf16
    python3 benchmarks/decode_speed.py --precisions bf16 --adapters 8

Both sides decode the same real prompts (the built-in generative stream's test prompts, left
padded), the same number of new tokens for every example (no early stop: the same work on both
sides), with the same LoRA values: each of our tasks is written with ``export_peft`` and read by
PEFT's own ``PeftModel.from_pretrained`` / ``load_adapter``, so the two models compute the same
function; the answers are compared token by token, up to our first end-of-sequence token (HF's
``min_new_tokens`` suppresses that token, so after it the two decode different text by design).
In bf16 the two sides round differently (HF's weights and residual stream are bf16, ours fp32
under autocast), so there answers may part.

Precision, "as users run it": fp32 is everything in fp32. In bf16 HF's model is cast to bf16
(``.to(torch.bfloat16)``; PEFT keeps its LoRA weights in fp32 and casts the inputs to them), and
ours runs under bf16 autocast with fp32 master weights, as ``continual`` scores in bf16. Ours
decodes inside :func:`adapters.precision.inference_linears`, as every scoring pass of ``continual``
does; entering it (a copy of the frozen weights, prepacked on a CPU) costs once per scoring pass,
not per batch, and is printed on its own line.

Printed per precision: tokens/s and ratios for one LoRA (ours / HF + PEFT), our mixed batch over
8 and 64 LoRAs (example i on LoRA i mod K) against our one LoRA, and PEFT's mixed
``adapter_names`` batch against PEFT's one LoRA. Beside them, the weight-bandwidth limit: every
decoding step reads every Linear weight once, so the machine's memory read rate (measured here, a
sum over a 512 MB tensor) divided by the bytes of those weights bounds the steps per second.
A second table splits one LoRA's time (both sides) into the prompt's pass with the first token
(timed as a run of one new token) and each further token, beside the time reading the weights
once takes: the part the weight-bandwidth limit speaks about.
The modes are timed in turns (a warm-up round, then each mode once per round, see
:func:`interleaved`): on a shared 2-core machine the speed drifts by 10-20% over minutes, and
in turns that drift falls on every mode alike. Absolute numbers move between machines and
with load: compare within one run.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch
from torch import nn

import adapters
from adapters.generation import generate
from adapters.precision import autocast, inference_linears


def read_bandwidth(device: torch.device, mb: int = 512) -> float:
    """Bytes per second the device reads a large tensor at (the best of a few sums)."""
    x = torch.ones(mb * 2**20 // 4, device=device)
    best = float("inf")
    for _ in range(5):
        sync(device)
        start = time.perf_counter()
        x.sum()
        sync(device)
        best = min(best, time.perf_counter() - start)
    return x.numel() * 4 / best


def describe(device: torch.device) -> str:
    """The processor the figures were measured on: CPU results differ between hosts (bf16 matrix
    products run on AVX512-BF16 or AMX units where present), so a results file names it."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    probes = {"AVX512-BF16": "_is_avx512_bf16_supported", "AMX": "_is_amx_tile_supported"}
    units = [k for k, fn in probes.items() if bool(getattr(torch.cpu, fn, lambda: False)())]
    return f"{name}; bf16 matrix units: {', '.join(units) or 'none (bf16 is emulated)'}"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def linear_bytes(model: nn.Module, bytes_per_weight: int) -> int:
    """Bytes of the Linear weights one decoding step reads (the LM head included, once)."""
    mods = {id(m): m for m in model.modules() if isinstance(m, nn.Linear)}
    return sum(m.weight.numel() for m in mods.values()) * bytes_per_weight


def timed(fn: Callable[[], Any], repeats: int, device: torch.device) -> tuple[float, Any]:
    """Mean seconds per call of ``fn`` after a warm-up call, and its last output (one mode of
    :func:`interleaved`)."""
    return interleaved({"fn": fn}, repeats, device)["fn"]


def prompts(tokenizer: Any, n: int, device: torch.device, path: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` prompts, left padded: the built-in generative stream's test prompts, or those of a JSON
    list in ``path`` (for a machine without the data packages)."""
    if path:
        import json

        texts = json.loads(Path(path).read_text())
        if not isinstance(texts, list) or not texts or not all(isinstance(t, str) and t for t in texts):
            raise SystemExit(f"--prompts {path}: expected a JSON list of non-empty strings")
    else:
        from streams import load_stream

        # a cap of at least 8 examples: a smaller one can leave a task's split empty, which the stream refuses
        stream = load_stream("generative", max_train=8, max_eval=max(n, 8))
        texts = [t for task in stream for t in task.test["text"]]
    texts = (texts * (n // len(texts) + 1))[:n]
    tokenizer.padding_side = "left"
    enc = tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=96)
    return enc["input_ids"].to(device), enc["attention_mask"].to(device)


def random_backbone(backbone: str, out: Path, seed: int = 0) -> str:
    """A copy of ``backbone``'s config and tokenizer with random weights, saved under ``out``: the
    same shapes, so the same speed, for a machine that has the config but not the weights (a GPU
    machine without the weights packages). Greedy answers are then not meaningful text, but both
    sides still decode the same tokens from the same weights."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    from adapters.backbones import BACKBONES
    from adapters.targets import is_decoder_config

    path = str(BACKBONES[backbone]()) if backbone in BACKBONES else backbone
    config = AutoConfig.from_pretrained(path)
    torch.manual_seed(seed)
    loader = AutoModelForCausalLM if is_decoder_config(config) else AutoModel
    loader.from_config(config, dtype=torch.float32).save_pretrained(out)
    AutoTokenizer.from_pretrained(path).save_pretrained(out)
    return str(out)


def build_ours(backbone: str, k: int, device: torch.device, out: Path) -> adapters.DeltaModel:
    """Our model with K LoRA tasks (random non-zero B, so every LoRA acts), each exported for PEFT."""
    model = adapters.DeltaModel.from_pretrained(backbone, dtype=torch.float32).to(device)
    torch.manual_seed(0)
    for i in range(k):
        task = model.add_task(f"t{i}", {"method": "lora", "rank": 8}, generative=True)
        with torch.no_grad():
            for n, p in task.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.02)
        model.freeze(f"t{i}")
        model.export_peft(f"t{i}", out / f"t{i}")
    return model.eval()


def build_peft(backbone: str, k: int, device: torch.device, dtype: torch.dtype, out: Path) -> Any:
    import peft
    from transformers import AutoModelForCausalLM

    from adapters.backbones import BACKBONES

    path = str(BACKBONES[backbone]()) if backbone in BACKBONES else backbone
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device=device, dtype=dtype)
    pm = peft.PeftModel.from_pretrained(hf, str(out / "t0"), adapter_name="t0")
    for i in range(1, k):
        pm.load_adapter(str(out / f"t{i}"), adapter_name=f"t{i}")
    pm.set_adapter("t0")
    return pm.eval()


def same_answers(ours: list[list[int]], theirs: list[list[int]], eos: int) -> int:
    """Rows whose answers agree: ours up to its first end-of-sequence token against as many of
    PEFT's (``min_new_tokens`` keeps HF from ending early by suppressing that token, so after it
    the two sides decode different text by design)."""
    def answer(row: list[int]) -> list[int]:
        return row[: row.index(eos)] if eos in row else row
    return sum(answer(a) == b[: len(answer(a))] for a, b in zip(ours, theirs))


def interleaved(modes: dict[str, Callable[[], Any]], repeats: int, device: torch.device) -> dict[str, tuple[float, Any]]:
    """Mean seconds per call and the last output of each mode, the modes taken in turn: a warm-up
    round, then ``repeats`` rounds of every mode once (in rotated order). A shared 2-core machine's
    speed drifts by 10-20% over minutes; in turns the drift falls on every mode alike, where timing
    one mode after the other puts it into the ratios."""
    names = list(modes)
    total = dict.fromkeys(names, 0.0)
    outs: dict[str, Any] = {}
    for r in range(repeats + 1):
        for name in names[r % len(names):] + names[: r % len(names)]:
            sync(device)
            start = time.perf_counter()
            outs[name] = modes[name]()
            sync(device)
            if r:  # round 0 is the warm-up
                total[name] += time.perf_counter() - start
    return {name: (total[name] / repeats, outs[name]) for name in names}


def run_precision(args: argparse.Namespace, ours: adapters.DeltaModel, pm: Any, ids: torch.Tensor,
                  mask: torch.Tensor, precision: str, device: torch.device) -> list[tuple[str, float, str]]:
    """(mode, seconds per batch, note) for every mode of one precision, timed in turns."""
    b, n = ids.shape[0], args.new_tokens
    hf_kw = dict(max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=ours.tokenizer.pad_token_id or 0)
    gen = dict(max_new_tokens=n, eos_token_id=-1)  # a fixed length: no early stop

    def hf(names: list[str] | None) -> Callable[[], Any]:
        extra = {} if names is None else {"adapter_names": names}
        # HF's model runs as users run it, outside our autocast
        return lambda: _off(device, lambda: pm.generate(input_ids=ids, attention_mask=mask, **hf_kw, **extra))

    mixed = {k: ours.mixed([f"t{i}" for i in range(k)]) for k in args.adapters}
    modes: dict[str, Callable[[], Any]] = {"HF generate + PEFT, one LoRA": hf(None)}
    for k in args.adapters:
        modes[f"HF generate + PEFT, mixed {k} LoRAs"] = hf([f"t{i % k}" for i in range(b)])
    modes["ours, one LoRA"] = lambda: generate(ours, ids, mask, **gen)
    # the prompt's pass and the first token alone: with the full runs above, the time of each
    # further token (which reads every weight once) apart from the prompt's (compute-bound)
    modes[FIRST_HF] = lambda: _off(device, lambda: pm.generate(input_ids=ids, attention_mask=mask, **{
        **hf_kw, "max_new_tokens": 1, "min_new_tokens": 1}))
    modes[FIRST_OURS] = lambda: generate(ours, ids, mask, **{**gen, "max_new_tokens": 1})
    for k in args.adapters:
        slots = torch.arange(b, device=device) % k
        modes[f"ours, mixed {k} LoRAs"] = lambda k=k, slots=slots: generate(ours, ids, mask, mixed=mixed[k], task_ids=slots, **gen)
    with torch.no_grad(), autocast(precision, device):
        start = time.perf_counter()
        with inference_linears(ours):
            enter = time.perf_counter() - start
            ours.activate("t0")
            res = interleaved(modes, args.repeats, device)
    for m in mixed.values():
        m.detach()
    s_hf, hf_out = res["HF generate + PEFT, one LoRA"]
    s_one, out = res["ours, one LoRA"]
    same = same_answers(out, hf_out[:, ids.shape[1]:].tolist(), ours.tokenizer.eos_token_id)
    notes = {"HF generate + PEFT, one LoRA": "", "ours, one LoRA": f"{s_hf / s_one:.2f}x HF + PEFT; answers equal to PEFT's: {same}/{b}"}
    for k in args.adapters:
        notes[f"HF generate + PEFT, mixed {k} LoRAs"] = f"{s_hf / res[f'HF generate + PEFT, mixed {k} LoRAs'][0]:.2f}x of PEFT's one LoRA"
        s = res[f"ours, mixed {k} LoRAs"][0]
        notes[f"ours, mixed {k} LoRAs"] = f"{s_one / s:.2f}x of our one LoRA; {s_hf / s:.2f}x HF + PEFT one LoRA"
    rows = [(name, res[name][0], notes[name]) for name in modes if name not in (FIRST_HF, FIRST_OURS)]
    if n > 1:
        for name, first in (("HF generate + PEFT, one LoRA", FIRST_HF), ("ours, one LoRA", FIRST_OURS)):
            rows.append((f"{name}: {PHASES}", res[first][0], f"{(res[name][0] - res[first][0]) / (n - 1) * 1e3:.1f}"))
    rows.append(("ours, entering inference_linears (once per scoring pass)", enter, ""))
    return rows


FIRST_HF, FIRST_OURS = "HF generate + PEFT, one LoRA, first token", "ours, one LoRA, first token"
PHASES = "prompt + first token (s) | each further token (ms)"


def _off(device: torch.device, fn: Callable[[], Any]) -> Any:
    """``fn()`` with autocast off (HF's model in its own dtype, as its users run it)."""
    with torch.autocast(device.type, enabled=False):
        return fn()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", default="smollm2")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--adapters", default="8,64", help="sizes of the mixed sets, comma-separated")
    ap.add_argument("--precisions", default="fp32,bf16")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default=None)
    ap.add_argument("--prompts", default=None, help="a JSON list of prompt strings (default: the generative stream's test prompts)")
    ap.add_argument("--random-init", action="store_true",
                    help="the backbone's config and tokenizer with random weights (same shapes and speed; for a "
                         "machine without the weights package, given the backbone's directory)")
    args = ap.parse_args()
    args.adapters = [int(k) for k in args.adapters.split(",") if k]
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    bandwidth = read_bandwidth(device)
    with tempfile.TemporaryDirectory() as tmp:
        if args.random_init:
            args.backbone = random_backbone(args.backbone, Path(tmp) / "backbone")
        ours = build_ours(args.backbone, max(args.adapters + [1]), device, Path(tmp))
        ids, mask = prompts(ours.tokenizer, args.batch, device, args.prompts)
        print(f"backbone {args.backbone}{' (random weights)' if args.random_init else ''}, device {device} ({torch.get_num_threads()} threads), batch {args.batch}, "
              f"prompts padded to {ids.shape[1]} tokens, {args.new_tokens} new tokens each, LoRA r=8 on q and v")
        print(f"processor: {describe(device)}")
        print(f"memory read rate {bandwidth / 1e9:.1f} GB/s")
        for precision in args.precisions.split(","):
            dtype = torch.float32 if precision == "fp32" else torch.bfloat16
            pm = build_peft(args.backbone, max(args.adapters + [1]), device, dtype, Path(tmp))
            limit = bandwidth / linear_bytes(pm, 4 if precision == "fp32" else 2) * args.batch
            step_ms = args.batch / limit * 1e3  # one step reads every weight once
            rows = run_precision(args, ours, pm, ids, mask, precision, device)
            del pm
            print(f"\n## {precision} (weight-bandwidth limit: {limit:.0f} tokens/s at batch {args.batch})\n")
            print("| mode | s per batch | tokens/s | of the limit | |")
            print("|---|---|---|---|---|")
            phases = [(name.split(": ")[0], s, note) for name, s, note in rows if name.endswith(PHASES)]
            rows = [r for r in rows if not r[0].endswith(PHASES)]
            for name, s, note in rows:
                if name.startswith("ours, entering"):
                    print(f"| {name} | {s:.3f} | | | |")
                else:
                    rate = args.batch * args.new_tokens / s
                    print(f"| {name} | {s:.3f} | {rate:.1f} | {rate / limit:.0%} | {note} |")
            if phases:  # where the time goes: the prompt's pass, then one weight-bound step per token
                print(f"\n| one LoRA | {PHASES} | the weights' read time per token (ms) |\n|---|---|---|---|")
                for name, s, ms in phases:
                    print(f"| {name} | {s:.3f} | {ms} | {step_ms:.1f} |")


if __name__ == "__main__":
    main()
