"""Shared fixtures: tiny random-init backbones of each supported family (fast, offline)."""

from __future__ import annotations

import pytest
import torch

import adapters  # noqa: F401  first: it makes a CPU-only torchvision importable before transformers imports it
from transformers import BertConfig, BertModel, LlamaConfig, LlamaModel, MPNetConfig, MPNetModel

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=120)


# Modules that run whole commands or start other processes (the CLI end to end, torchrun, a run
# killed mid-task, an mlflow server, the examples) or train real backbones on real data: the
# "integration" tier (with the tests marked so one by one). The rest, the unit tier,
# runs in a few minutes: python3 -m pytest -m "not slow and not integration".
INTEGRATION_MODULES = {"test_cli", "test_distributed", "test_mlflow_server", "test_examples", "test_integration",
                       "test_stream_integration", "test_peft_real", "test_faults", "test_avalanche"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.module.__name__ in INTEGRATION_MODULES:
            item.add_marker(pytest.mark.integration)


def tiny_backbone(arch: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if arch == "bert":
        model = BertModel(BertConfig(**TINY, max_position_embeddings=256), add_pooling_layer=False)
    elif arch == "mpnet":
        model = MPNetModel(MPNetConfig(**TINY, max_position_embeddings=256))
    elif arch == "llama":
        model = LlamaModel(LlamaConfig(**TINY, num_key_value_heads=2, max_position_embeddings=256))
    else:
        raise ValueError(arch)
    return model.eval()


ARCHS = ["bert", "mpnet", "llama"]


def method_config(method: str) -> dict:
    """A small config of each registered method that every test can use."""
    small = {
        "prompt": {"num_tokens": 4},
        "prefix": {"num_tokens": 3, "hidden_dim": 16},
        "selective": {"patterns": ["attn|attention"]},
        "bottleneck": {"bottleneck_dim": 8},
        "parallel": {"bottleneck_dim": 8},
        "compacter": {"bottleneck_dim": 8},
        "lora": {"rank": 4},
        "coda_prompt": {"pool_size": 8, "prompt_length": 2, "tasks": 2},
        "dual_prompt": {"g_length": 2, "e_length": 2, "tasks": 2},  # the keys start orthogonal: <= hidden size
    }
    return {"method": method, **small.get(method, {})}


def supports(method: str, arch: str) -> bool:
    """Combinations the library refuses by design (with a clear error, tested separately)."""
    spec = adapters.ARCHITECTURES[arch]
    decoders = adapters.get_method(method).capabilities.decoders
    return not ((method == "prefix" and spec.attention is None) or (not decoders and spec.kind == "decoder"))


def lora_model(arch: str = "bert", methods=("lora", "bottleneck")) -> adapters.DeltaModel:
    """A tiny model with one active task "t" whose deltas are non-zero (so they act), in eval mode."""
    model = adapters.DeltaModel(tiny_backbone(arch))
    task = model.add_task("t", [method_config(m) for m in methods], num_labels=3)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in task.parameters():
            p.add_(0.1 * torch.randn_like(p))
    model.activate("t")
    return model.eval()


def batch(vocab: int = 120, b: int = 3, t: int = 9, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (b, t), generator=g)
    mask = torch.ones(b, t, dtype=torch.long)
    mask[1, 6:] = 0  # one padded row, so masks are exercised
    return {"input_ids": ids, "attention_mask": mask}


@pytest.fixture(params=ARCHS)
def arch(request) -> str:
    return request.param


@pytest.fixture
def tiny_model(arch) -> adapters.DeltaModel:
    return adapters.DeltaModel(tiny_backbone(arch))


# -- streams: toy keyword tasks on a tiny BERT with the real MiniLM tokenizer ------------------------
WORDS = "apple river green music table window cloud stone paper light dream voice fire ocean".split()


def toy_rows(keyword: str, seed: int, n: int = 120) -> list[tuple[str, int]]:
    """Six random words; label 1 iff ``keyword`` is among them (balanced, seeded)."""
    import random

    rng = random.Random(seed)
    rows = []
    for i in range(n):
        words = [w for w in rng.choices(WORDS, k=6) if w != keyword]
        if i % 2:
            words[rng.randrange(len(words))] = keyword
        rows.append((" ".join(words), i % 2))
    return rows


def toy_task(name: str, keyword: str, seed: int):
    from datasets import Dataset

    from streams import Task

    rows = toy_rows(keyword, seed)
    ds = lambda rs: Dataset.from_dict({"text": [r[0] for r in rs], "label": [r[1] for r in rs]})  # noqa: E731
    return Task(name, ds(rows[:80]), ds(rows[80:100]), ds(rows[100:]), ["no", "yes"], {"origin": "toy"})


def toy_stream():
    from streams import TaskStream

    return TaskStream("toy", [toy_task("a", "apple", 1), toy_task("b", "river", 2), toy_task("c", "music", 3)])


@pytest.fixture(scope="session")
def minilm_tokenizer():
    from transformers import AutoTokenizer

    from adapters.backbones import _minilm

    return AutoTokenizer.from_pretrained(str(_minilm()))


def tiny_text_backbone(vocab_size: int) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = BertConfig(**{**TINY, "vocab_size": vocab_size}, max_position_embeddings=64)
    return BertModel(cfg, add_pooling_layer=False).eval()


@pytest.fixture
def text_model(minilm_tokenizer):
    """A factory of fresh tiny BERTs (same weights each time) that tokenise real text."""
    return lambda: adapters.DeltaModel(tiny_text_backbone(minilm_tokenizer.vocab_size), minilm_tokenizer, "tiny-bert")


@pytest.fixture(scope="session")
def tiny_backbone_dir(tmp_path_factory, minilm_tokenizer):
    """The tiny BERT saved with the MiniLM tokenizer: a local path the CLI can load."""
    path = tmp_path_factory.mktemp("tiny-bert")
    tiny_text_backbone(minilm_tokenizer.vocab_size).save_pretrained(path)
    minilm_tokenizer.save_pretrained(path)
    return path


FAST = dict(max_steps=60, batch_size=16, eval_every=20, max_length=16, lr=1e-2, head_lr=1e-2, progress=False)


# -- a real `mlflow server` on 127.0.0.1 (one worker), stopped by its pid ------------------------------
def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_mlflow_server(directory, name: str = "server"):
    """(process, url) of a server with a SQLite store ``<name>.db`` in ``directory``, once healthy."""
    import os
    import subprocess
    import sys
    import time
    import urllib.request
    from pathlib import Path

    mlflow_bin = Path(sys.executable).with_name("mlflow")
    if not mlflow_bin.exists():
        import shutil

        mlflow_bin = Path(shutil.which("mlflow"))
    port = free_port()
    cmd = [str(mlflow_bin), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1", "--backend-store-uri",
           f"sqlite:///{directory}/{name}.db", "--artifacts-destination", str(Path(directory) / f"{name}-artifacts")]
    log_path = Path(directory) / f"{name}.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=dict(os.environ))
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 90
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    return proc, url
        except OSError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            stop_mlflow_server(proc)
            raise RuntimeError(f"mlflow server did not start:\n{log_path.read_text()[-3000:]}")
        time.sleep(0.5)


def stop_mlflow_server(proc) -> None:
    """SIGTERM to the parent (it stops its worker); SIGKILL to the group if it does not stop."""
    import os
    import signal
    import subprocess

    if proc.poll() is not None:
        return
    os.kill(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()



# -- generative toy tasks on a tiny random-init Llama causal LM ---------------------------------------
# A word-level tokenizer over the toy tasks' words: with a 30k-token vocabulary a random 2-layer
# model's output is nearly uniform and a delta needs hundreds of steps to move it; with ~30 words
# the toy tasks are learned in the few steps a unit test can afford.
GEN_TEMPLATE = "Words: {text}\nIs the keyword there?\nAnswer:"


def toy_generative_stream():
    from streams import TaskStream, Verbalizer, verbalize

    asks = Verbalizer(GEN_TEMPLATE, {"no": "no", "yes": "yes"})
    tasks = [verbalize(toy_task(n, k, s), asks) for n, k, s in (("a", "apple", 1), ("b", "river", 2), ("c", "music", 3))]
    return TaskStream("toy-gen", tasks)


@pytest.fixture(scope="session")
def word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["[PAD]", "[UNK]", "[EOS]", *WORDS, "Words", ":", "Is", "the", "keyword", "there", "?", "Answer", "yes", "no"]
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="[PAD]", eos_token="[EOS]", unk_token="[UNK]")


def tiny_lm_backbone(vocab_size: int, eos: int, pad: int) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    # initializer_range 0.3, not 0.02: with tied embeddings of norm ~0.1 the logits could not leave
    # uniform (|logit| < 1), so no delta could make a confident answer
    cfg = LlamaConfig(**{**TINY, "vocab_size": vocab_size}, num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.3,
                      eos_token_id=eos, pad_token_id=pad, tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture
def lm_model(word_tokenizer):
    """A factory of fresh tiny Llama causal LMs (same weights each time) with a word tokenizer."""
    tok = word_tokenizer
    return lambda: adapters.DeltaModel(tiny_lm_backbone(len(tok), tok.eos_token_id, tok.pad_token_id), tok, "tiny-llama")


def tiny_t5(tok) -> adapters.DeltaModel:
    """A tiny random-init T5 (encoder-decoder) on ``tok``'s vocabulary, seeded."""
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    t5 = T5ForConditionalGeneration(T5Config(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
                                             vocab_size=len(tok), eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                                             decoder_start_token_id=tok.pad_token_id)).eval()
    return adapters.DeltaModel(t5, tok, "tiny-t5")


@pytest.fixture(scope="session")
def tiny_lm_dir(tmp_path_factory, word_tokenizer):
    """The tiny Llama LM saved with the word tokenizer: a local path the CLI can load."""
    path = tmp_path_factory.mktemp("tiny-llama")
    tok = word_tokenizer
    tiny_lm_backbone(len(tok), tok.eos_token_id, tok.pad_token_id).save_pretrained(path)
    tok.save_pretrained(path)
    return path



from continual import StreamLogger  # noqa: E402  (after adapters: see the first import)


def killed_and_resumed(go):
    """``go(directory, **run_stream_kwargs)`` run whole, then killed in row 2 and resumed: the two
    results (uninterrupted, resumed) for the caller to compare."""
    import pytest

    full = go("full")
    with pytest.raises(KeyboardInterrupt):
        go("k", loggers=[KillAt(2)])
    return full, go("k", resume=True)


def assert_same_matrices(a, b):
    """R, the task-agnostic A and the routing accuracy equal, bit for bit."""
    import numpy as np

    np.testing.assert_array_equal(a.matrix.R, b.matrix.R)
    np.testing.assert_array_equal(a.matrix.A, b.matrix.A)
    np.testing.assert_array_equal(a.matrix.routing, b.matrix.routing)


class KillAt(StreamLogger):
    """A stream logger that raises KeyboardInterrupt (a kill) mid-training in row ``row``."""

    def __init__(self, row):
        self.row, self.now = row, None

    def start_step(self, row, tasks, params):
        self.now = row

    def log_step(self, record):
        if self.now == self.row and record["step"] >= 10:
            raise KeyboardInterrupt("killed")
