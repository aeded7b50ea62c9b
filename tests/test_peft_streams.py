"""Adapters trained elsewhere, used here: a LoRA trained by PEFT's own code (a few real steps in
the test) serves in a mixed-task generation batch beside our deltas, and starts a task of a
stream (``delta:`` in the stream file) that a per-task-fusion run then fuses with our deltas."""

from __future__ import annotations

import pytest
import torch
import yaml

import adapters
from adapters.generation import generate
from conftest import FAST, TINY, toy_rows, tiny_text_backbone

peft = pytest.importorskip("peft")
EOS = 3


@pytest.fixture(autouse=True)
def no_hub(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def llama() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**TINY, num_key_value_heads=2, max_position_embeddings=256, eos_token_id=EOS,
                                        pad_token_id=0, bos_token_id=1, initializer_range=0.3)).eval()


def peft_trained(base: torch.nn.Module, config, steps: int, loss_of) -> torch.nn.Module:
    """``base`` with a PEFT adapter trained by PEFT's model for a few AdamW steps."""
    pm = peft.get_peft_model(base, config)
    pm.train()
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=5e-2)
    g = torch.Generator().manual_seed(3)
    for _ in range(steps):
        ids = torch.randint(5, 120, (4, 8), generator=g)
        loss = loss_of(pm, ids)
        loss.backward()
        opt.step()
        opt.zero_grad()
    return pm.eval()


def test_peft_trained_lora_serves_in_a_mixed_batch(tmp_path):
    pm = peft_trained(llama(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                               task_type="CAUSAL_LM"), 5, lambda m, ids: m(input_ids=ids, labels=ids).loss)
    pm.save_pretrained(tmp_path)
    model = adapters.DeltaModel(llama(), None, "tiny-llama")
    model.add_task("ours", {"method": "lora", "rank": 2}, generative=True)
    with torch.no_grad():
        for p in model.task("ours").parameters():
            p.add_(0.3)
    assert model.import_peft(tmp_path, "theirs") == "theirs"
    assert model.task("theirs").delta_parameters() == sum(p.numel() for n, p in pm.named_parameters() if "lora_" in n)

    ids = torch.randint(5, 120, (4, 7), generator=torch.Generator().manual_seed(9))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding, as batched decoding lays prompts out
    with torch.no_grad(), model.using("theirs"):
        logits = model(input_ids=ids, attention_mask=mask)
        assert (logits - pm(input_ids=ids, attention_mask=mask).logits)[mask.bool()].abs().max() < 1e-5

    # served alone: our decoder answers what PEFT's model generates
    with model.using("theirs"):
        alone = generate(model, ids, mask, max_new_tokens=5, eos_token_id=EOS)
    ref = pm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False, eos_token_id=EOS, pad_token_id=0)
    assert alone == [_answer(row, ids.shape[1]) for row in ref]

    # served in one mixed batch with our own task: each example as its task alone
    task_ids = ["theirs", "ours", "theirs", "ours"]
    mixed = generate(model, ids, mask, max_new_tokens=5, eos_token_id=EOS, mixed=model.mixed(), task_ids=task_ids)
    for r, t in enumerate(task_ids):
        with model.using(t):
            assert mixed[r] == generate(model, ids[r:r + 1], mask[r:r + 1], max_new_tokens=5, eos_token_id=EOS)[0]


def _answer(row: torch.Tensor, prompt_len: int) -> list[int]:
    """HF generate's new tokens before the first EOS (the form our decoder returns)."""
    out = []
    for t in row[prompt_len:].tolist():
        if t == EOS:
            break
        out.append(t)
    return out


def stream_file(tmp_path, adapter=None, train: bool = True):
    for name, word, seed in (("a", "apple", 1), ("b", "river", 2)):
        rows = toy_rows(word, seed)
        (tmp_path / f"{name}.csv").write_text("text,label\n" + "".join(f"{t},{y}\n" for t, y in rows))
    tasks = [{"name": "a", "train": "a.csv"}, {"name": "b", "train": "b.csv"}]
    if adapter is not None:
        tasks[0]["delta"] = {"path": str(adapter), "train": train}
    path = tmp_path / "stream.yaml"
    path.write_text(yaml.safe_dump({"name": "toy", "tasks": tasks}))
    return path


def test_stream_task_starts_from_a_peft_lora_and_fusion_uses_it(tmp_path, minilm_tokenizer):
    from continual.scheduler import run_stream
    from continual.strategies import make_strategy
    from continual.training import TrainConfig
    from streams import load_stream

    pm = peft_trained(tiny_text_backbone(minilm_tokenizer.vocab_size), peft.LoraConfig(r=4, target_modules=["query", "value"]),
                      3, lambda m, ids: m(input_ids=ids).last_hidden_state.pow(2).mean())
    pm.save_pretrained(tmp_path / "adapter")
    trained = {k: v.clone() for k, v in pm.state_dict().items() if "lora_" in k}
    path = stream_file(tmp_path, tmp_path / "adapter", train=False)
    stream = load_stream(path)
    assert stream["a"].delta["train"] is False and "adapter_model.safetensors" in stream["a"].delta["sha256"]

    def model():
        return adapters.DeltaModel(tiny_text_backbone(minilm_tokenizer.vocab_size), minilm_tokenizer, "tiny-bert")

    with pytest.raises(ValueError, match="start from a saved delta.*seq-delta"):  # refused before anything is written
        run_stream(stream, model(), make_strategy("seq-delta", ["lora"]), TrainConfig(**FAST), tmp_path / "no")
    assert not (tmp_path / "no").exists()

    config = TrainConfig(**{**FAST, "max_steps": 20})
    m = model()
    res = run_stream(stream, m, make_strategy("per-task-fusion", [{"method": "lora", "rank": 4}]), config, tmp_path / "run")
    assert res.matrix.R.shape == (2, 2) and torch.isfinite(torch.tensor(res.matrix.R)).all()
    lora = m.task("a").deltas["lora"]
    for site in lora.sites:  # used frozen: the values PEFT trained, untouched by the run
        key = f"base_model.model.{site.output}"
        assert torch.equal(lora.site_modules[site.key].lora_A, trained[f"{key}.lora_A.default.weight"])
    assert m.task("b_fusion").deltas["fusion"].sources() == ("a", "b")
    assert res.steps[0]["trainable_params"]["a"] > 0  # its fusion and head trained

    # the adapter's bytes are part of the task's identity: a changed adapter is another run
    before = stream.fingerprints()["a"]
    weights = tmp_path / "adapter" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes().replace(b"lora", b"LORA", 1))
    assert load_stream(path).fingerprints()["a"] != before

    # a setting the import cannot honour: refused before training, naming the task and the folder
    import json

    cfg = tmp_path / "adapter" / "adapter_config.json"
    cfg.write_text(json.dumps({**json.loads(cfg.read_text()), "lora_bias": True}))
    with pytest.raises(adapters.CheckpointError, match=r"task 'a' \(its 'delta:' in the stream file\): .*adapter: .*lora_bias"):
        run_stream(load_stream(path), model(), make_strategy("per-task", ["lora"]), config, tmp_path / "bad")


def test_frozen_delta_on_a_generative_task_is_scored_not_trained(tmp_path, lm_model):
    """A generative task whose delta is used frozen has nothing to train (its head is the model's
    own): the step only scores it, and the next task trains as usual."""
    from conftest import toy_generative_stream
    from continual.scheduler import run_stream
    from continual.strategies import make_strategy
    from continual.training import TrainConfig
    from streams.stream import start_delta

    source = lm_model()
    source.add_task("x", {"method": "lora", "rank": 2}, generative=True)
    source.export_peft("x", tmp_path / "x")
    stream = toy_generative_stream()
    stream.tasks[0].delta = start_delta({"path": "x", "train": False}, tmp_path, "test")
    res = run_stream(stream, lm_model(), make_strategy("per-task", [{"method": "lora", "rank": 2}]),
                     TrainConfig(**{**FAST, "max_steps": 10}), tmp_path / "run")
    assert res.steps[0]["steps"] == 0 and res.steps[0]["trainable_params"]["a"] == 0
    assert res.steps[1]["steps"] > 0


@pytest.mark.integration  # end to end: a whole stream, resumed, logged or served
def test_export_command(tmp_path, tiny_backbone_dir, capsys):
    """`continual export` writes each exportable task of a run as a PEFT adapter that PEFT loads
    onto the backbone and that gives the run's own outputs; what cannot be exported says why."""
    from continual.cli import main
    from continual.loadrun import load_run_model

    path = stream_file(tmp_path)
    common = ["--stream", str(path), "--backbone", str(tiny_backbone_dir), "--steps", "10", "--max-length", "16",
              "--no-progress", "--no-mlflow"]
    assert main(["run", *common, "--method", "lora:rank=4", "--out", str(tmp_path / "run")]) == 0
    assert main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "peft")]) == 0
    out = capsys.readouterr().out
    assert "a: LORA r=4, FEATURE_EXTRACTION" in out and "b: LORA r=4" in out
    model, _ = load_run_model(tmp_path / "run", str(tiny_backbone_dir))
    from transformers import AutoModel

    pm = peft.PeftModel.from_pretrained(AutoModel.from_pretrained(tiny_backbone_dir).eval(), tmp_path / "peft" / "b").eval()
    enc = model.tokenizer(["apple river green", "music table"], return_tensors="pt", padding=True)
    with torch.no_grad(), model.using("b"):
        assert (model.encode(**enc)[0] - pm(**enc).last_hidden_state).abs().max() < 1e-5

    assert main(["run", *common, "--method", "bottleneck", "--out", str(tmp_path / "bn")]) == 0
    assert main(["export", str(tmp_path / "bn"), "--out", str(tmp_path / "peft-bn")]) == 2
    err = capsys.readouterr().err  # one reason for the tasks that share it, said once over their names
    assert "no task of" in err and "a, b: PEFT cannot hold bottleneck" in err and err.count("no PEFT type") == 1
    assert not (tmp_path / "peft-bn").exists()

    # refused by name before the backbone loads, where each was a traceback (exit 1) or a message
    # about the model, not the option
    capsys.readouterr()
    (tmp_path / "a-file").write_text("x")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "a").write_text("not an adapter")
    bad = {("--out", str(tmp_path / "a-file")): f"{tmp_path / 'a-file'} is a file, not a directory; give another --out",
           ("--out", str(tmp_path / "taken")): "holds files where the adapters' folders would go",
           ("--out", str(tmp_path / "p2"), "--task", "a", "--task", "a"): "tasks ['a'] are named more than once",
           ("--out", str(tmp_path / "p3"), "--task", "nope"): "has no checkpoints for ['nope']",
           ("--out", str(tmp_path / "run" / "checkpoints" / "a")): "is inside the run's checkpoints"}
    for extra, message in bad.items():
        assert main(["export", str(tmp_path / "run"), *extra]) == 2, extra
        captured = capsys.readouterr()
        assert message in captured.err and "Loading weights" not in captured.err, extra
    assert (tmp_path / "taken" / "a").read_text() == "not an adapter"


def test_imported_task_in_route_and_transfer(tmp_path, tiny_backbone_dir, capsys):
    """A run whose first task started from a PEFT LoRA saves it like any task: the routing and
    transfer commands load and use it with the others."""
    from transformers import AutoModel

    from continual.cli import main

    base = AutoModel.from_pretrained(tiny_backbone_dir)
    pm = peft_trained(base, peft.LoraConfig(r=4, target_modules=["query", "value"]), 3,
                      lambda m, ids: m(input_ids=ids).last_hidden_state.pow(2).mean())
    pm.save_pretrained(tmp_path / "adapter")
    path = stream_file(tmp_path, tmp_path / "adapter", train=True)
    run = tmp_path / "run"
    assert main(["run", "--stream", str(path), "--backbone", str(tiny_backbone_dir), "--method", "lora:rank=4", "--steps",
                 "10", "--max-length", "16", "--no-progress", "--no-mlflow", "--out", str(run)]) == 0
    assert main(["transfer", str(run), "--backbone", str(tiny_backbone_dir)]) == 0
    assert main(["route", str(run), "--backbone", str(tiny_backbone_dir), "--router", "prototype"]) == 0
    out = capsys.readouterr().out
    assert "prototype" in out and (run / "transfer.csv").exists() and (run / "routing.json").exists()
    import json

    routed = json.loads((run / "routing.json").read_text())
    assert routed["prototype"]["tasks"] == ["a", "b"] and sum(map(sum, routed["prototype"]["confusion"])) > 0


def test_export_of_a_shared_delta_run_gives_each_state_as_a_causal_lm_adapter(tmp_path, tiny_lm_dir):
    """seq-delta saves its one shared delta after every task: export refused the run (two
    checkpoints of one name clashed on loading). Each state is now ``<task>-shared_delta``, an
    adapter of the LM (the tasks it serves are generative) that PEFT loads onto the decoder with
    our hidden states; the head-only tasks say why they are left out."""
    from transformers import AutoModelForCausalLM

    from conftest import toy_generative_stream
    from continual import TrainConfig, make_strategy, run_stream
    from continual.export import by_reason, export_run
    from continual.loadrun import load_run_model

    run_stream(toy_generative_stream(), adapters.DeltaModel.from_pretrained(str(tiny_lm_dir)),
               make_strategy("seq-delta", [{"method": "lora", "rank": 2}]), TrainConfig(**{**FAST, "max_steps": 10}),
               tmp_path / "run")
    done, left = export_run(tmp_path / "run", tmp_path / "peft")
    assert [e.task for e in done] == ["a-shared_delta", "b-shared_delta", "c-shared_delta"]
    assert {e.config["task_type"] for e in done} == {"CAUSAL_LM"} and not any(e.vllm for e in done)
    assert sorted(left) == ["a", "b", "c"] and all("no delta of its own" in why for why in left.values())
    assert by_reason(left) == [(["a", "b", "c"], left["a"])]  # the CLI says it once over the names
    # one task chosen: its state of the shared delta, named as in the whole run (its head is listed, not an error)
    done, left = export_run(tmp_path / "run", tmp_path / "peft-b", tasks=["b"])
    assert [e.task for e in done] == ["b-shared_delta"] and list(left) == ["b"]
    model, _ = load_run_model(tmp_path / "run")  # the backbone its checkpoints name
    enc = model.tokenizer(["apple river green", "music table"], return_tensors="pt", padding=True)
    states = {}
    for name in ("a-shared_delta", "c-shared_delta"):
        pm = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_lm_dir).eval(),
                                            tmp_path / "peft" / name).eval()
        with torch.no_grad(), model.using(name):
            states[name] = model.encode(**enc)[0]
            assert (states[name] - pm(**enc, output_hidden_states=True).hidden_states[-1]).abs().max() < 1e-5
    assert not torch.allclose(states["a-shared_delta"], states["c-shared_delta"])  # the delta after a, after c


def test_stream_delta_of_another_base_model_names_the_stream_files_remedy(tmp_path, minilm_tokenizer):
    """An adapter recorded for another base model was refused with "pass strict_base=False", a
    Python argument a stream file cannot give: the refusal now names the file's own key, which works."""
    import json

    from continual.scheduler import run_stream
    from continual.strategies import make_strategy
    from continual.training import TrainConfig
    from streams import load_stream

    pm = peft_trained(tiny_text_backbone(minilm_tokenizer.vocab_size), peft.LoraConfig(r=4, target_modules=["query", "value"]),
                      3, lambda m, ids: m(input_ids=ids).last_hidden_state.pow(2).mean())
    pm.save_pretrained(tmp_path / "adapter")
    cfg = tmp_path / "adapter" / "adapter_config.json"
    cfg.write_text(json.dumps({**json.loads(cfg.read_text()), "base_model_name_or_path": "someone/bert-renamed"}))

    def run(path, out):
        model = adapters.DeltaModel(tiny_text_backbone(minilm_tokenizer.vocab_size), minilm_tokenizer, "tiny-bert")
        return run_stream(load_stream(path), model, make_strategy("per-task", ["lora"]), TrainConfig(**FAST), tmp_path / out)

    path = stream_file(tmp_path, tmp_path / "adapter")
    with pytest.raises(adapters.CheckpointError, match=r"task 'a' .*'someone/bert-renamed'.*check_base: false") as e:
        run(path, "refused")
    assert "strict_base" not in str(e.value)
    spec = yaml.safe_load(path.read_text())
    spec["tasks"][0]["delta"]["check_base"] = False
    path.write_text(yaml.safe_dump(spec))
    assert run(path, "ran").matrix.R.shape == (2, 2)
