"""Mixed-task generation: tokens/s when the examples of one batch belong to 1 or to 8 task deltas.

What serving many users' LoRAs needs: each example of a batch through its own task's delta, in
one pass per decoding step (adapters.generation + adapters.mixed). Builds K LoRA tasks on the
backbone (random non-zero B, so every delta really acts), generates ``--new-tokens`` greedy
tokens for a batch of real prompts (the generative stream's), and prints tokens/s for:

  single     the batch through one task, the ordinary path (model.activate)
  mixed-1    the same batch through a mixed set, every example on task 0
  mixed-K    the batch spread over K tasks (example i on task i mod K)

and checks that mixed-K gives, example by example, what each task gives alone.

    python benchmarks/generation_mixed.py --backbone smollm2 --tasks 8 --batch 8 --new-tokens 16
"""

from __future__ import annotations

import argparse

import torch

import adapters
from adapters.generation import generate
from adapters.precision import autocast, resolve_precision
from decode_speed import prompts, timed  # the same prompts and timing as the decode benchmark


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", default="smollm2")
    ap.add_argument("--tasks", type=int, default=8)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--device", default=None)
    args = ap.parse_args()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = adapters.DeltaModel.from_pretrained(args.backbone).to(device)
    torch.manual_seed(0)
    names = [f"t{k}" for k in range(args.tasks)]
    for name in names:
        task = model.add_task(name, {"method": "lora", "rank": 8}, generative=True)
        with torch.no_grad():
            for n, p in task.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.02)
        model.freeze(name)
    ids, mask = prompts(model.tokenizer, args.batch, device)
    precision = resolve_precision(args.precision, device)
    # a fixed number of new tokens for every example: no early stop, the same work in each mode
    gen = dict(max_new_tokens=args.new_tokens, eos_token_id=-1)
    tokens = args.batch * args.new_tokens
    rows = []
    with autocast(precision, device):
        model.activate(names[0])
        s_single, _ = timed(lambda: generate(model, ids, mask, **gen), args.repeats, device)
        mixed = model.mixed(names)
        one = torch.zeros(args.batch, dtype=torch.long)
        s_mixed1, _ = timed(lambda: generate(model, ids, mask, mixed=mixed, task_ids=one, **gen), args.repeats, device)
        spread = torch.arange(args.batch) % args.tasks
        s_mixedk, out = timed(lambda: generate(model, ids, mask, mixed=mixed, task_ids=spread, **gen), args.repeats, device)
        alone = []
        for i in range(args.batch):
            model.activate(names[int(spread[i])])
            alone.append(generate(model, ids[i:i + 1], mask[i:i + 1], **gen)[0])
    same = sum(a == b for a, b in zip(out, alone))
    rows = [("single task (activate)", s_single), ("mixed, 1 task", s_mixed1), (f"mixed, {args.tasks} tasks", s_mixedk)]
    print(f"backbone {args.backbone}, device {device}, precision {precision}, batch {args.batch}, "
          f"{args.new_tokens} new tokens per example, {args.tasks} LoRA r=8 tasks")
    print("| mode | s per batch | tokens/s | vs single |")
    print("|---|---|---|---|")
    for name, s in rows:
        print(f"| {name} | {s:.3f} | {tokens / s:.1f} | {s_single / s:.2f}x |")
    print(f"mixed-{args.tasks} answers equal to each task alone: {same}/{args.batch} examples")


if __name__ == "__main__":
    main()
