"""Pack what the GPU checks need onto a GPU machine that has torch, transformers and peft but not
``datasets``, the weights packages or the data packages (the lent device machine's image).

    python3 benchmarks/gpu_pack.py            # writes .gpu/ (git-ignored), about 48 MB
    bash benchmarks/gpu_check.sh              # there: with .gpu/ beside the checkout

What goes in ``.gpu/`` and why:

- ``wheels/``: datasets, dill and multiprocess (the versions installed here), for the training loop;
- ``minilm/``: the real MiniLM backbone, its weights stored in fp16 to halve the bytes carried
  (the checks load it in fp32: every mode compared trains the same rounded weights);
- ``smollm2/``: SmolLM2's config and tokenizer only (its 540 MB of weights do not travel): the
  checks build it with random weights, the same shapes and so the same speed;
- ``streams/``: two tasks of the ``default`` stream and two of the ``generative`` stream, written
  as JSONL files and a stream YAML each (``streams/default/default.yaml``,
  ``streams/generative/generative.yaml``: the real data, at the caps given);
- ``prompts.json``: the generative stream's test prompts, for ``decode_speed.py --prompts``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

WHEELS = ("datasets", "dill", "multiprocess")
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")


def wheels(out: Path) -> None:
    """The installed versions of :data:`WHEELS`, as wheels for the GPU machine's Python (3.12)."""
    pins = [f"{name}=={metadata.version(name)}" for name in WHEELS]
    plat = [a for p in PLATFORMS for a in ("--platform", p)]
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                    "--python-version", "3.12", "--implementation", "cp", *plat, "-d", str(out), *pins], check=True)


def minilm(out: Path) -> None:
    from safetensors.torch import load_file, save_file

    from adapters.backbones import BACKBONES

    src = BACKBONES["minilm"]()
    out.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and f.suffix in (".json", ".txt") and f.name != "data_config.json":
            shutil.copy(f, out / f.name)
    weights = {k: v.half() if v.is_floating_point() else v for k, v in load_file(src / "model.safetensors").items()}
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})


def smollm2(out: Path) -> None:
    from adapters.backbones import BACKBONES

    src = BACKBONES["smollm2"]()
    out.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and f.name != "model.safetensors":
            shutil.copy(f, out / f.name)


def stream(name: str, tasks: int, max_train: int, max_eval: int, out: Path) -> None:
    """The first ``tasks`` tasks of built-in stream ``name`` as files and a YAML stream over them."""
    from streams import load_stream

    out.mkdir(parents=True, exist_ok=True)
    entries = []
    for task in list(load_stream(name, max_train=max_train, max_eval=max_eval))[:tasks]:
        entry: dict = {"name": task.name}
        for split in ("train", "dev", "test"):
            path = out / f"{task.name}-{split}.jsonl"
            with path.open("w") as f:
                for row in getattr(task, split):
                    f.write(json.dumps(row) + "\n")
            entry[split] = path.name
        if task.generative:
            entry.update(target_column="target", metric=task.metric)
        else:
            entry["label_names"] = list(task.label_names)
        if task.max_length:
            entry["max_length"] = task.max_length
        entries.append(entry)
    spec = {"name": f"{name}-{tasks}", "tasks": entries}
    (out / f"{name}.yaml").write_text(json.dumps(spec, indent=1) + "\n")  # JSON is YAML


def prompts(out: Path, n: int = 64) -> None:
    from streams import load_stream

    texts = [t for task in load_stream("generative", max_train=8, max_eval=n) for t in task.test["text"]]
    out.write_text(json.dumps(texts) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=".gpu")
    ap.add_argument("--max-train", type=int, default=256)
    ap.add_argument("--max-eval", type=int, default=40)
    args = ap.parse_args()
    out = Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    wheels(out / "wheels")
    minilm(out / "minilm")
    smollm2(out / "smollm2")
    stream("default", 2, args.max_train, args.max_eval, out / "streams" / "default")
    stream("generative", 2, args.max_train, args.max_eval, out / "streams" / "generative")
    prompts(out / "prompts.json")
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"{out}: {size / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
