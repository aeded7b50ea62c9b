"""PEFT's checkpoint format, both ways, checked against the real ``peft`` library.

For each method PEFT can hold (LoRA, (IA)^3, prompt tuning; lora+bitfit as LoRA with
bias='all') on a tiny BERT (feature extraction, its classification head beside the adapter), a
tiny Llama (causal LM) and a tiny T5 (seq2seq LM): our outputs equal ``PeftModel.from_pretrained``'s
on the same weights; the export imported back equals the original bit for bit; and the adapter
as PEFT itself saves it (no sidecar: a foreign adapter) imports to the same outputs.
"""

from __future__ import annotations

import json

import pytest
import torch

import adapters
from adapters import CheckpointError, ConfigError
from adapters.peft_export import vllm_problems, vllm_scaling
from conftest import TINY, batch, tiny_backbone

peft = pytest.importorskip("peft")

TOL = 1e-5  # fp32: PEFT and we compute the same sums in another order
SMALL = {"lora": {"rank": 4}, "prompt": {"num_tokens": 3}, "prefix": {"num_tokens": 3, "hidden_dim": 16}}


@pytest.fixture(autouse=True)
def no_hub(monkeypatch):
    """PEFT looks the recorded base model up on the hub while loading; these tests stay offline."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def spec(methods: list[str]) -> list[dict]:
    return [{"method": m, **SMALL.get(m, {})} for m in methods]


def perturb(task: torch.nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in task.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.2)


def hf_model(arch: str) -> torch.nn.Module:
    """A fresh copy of the same random-init weights each call (what PEFT wraps)."""
    from transformers import LlamaConfig, LlamaForCausalLM, T5Config, T5ForConditionalGeneration

    if arch == "bert":
        return tiny_backbone("bert")
    torch.manual_seed(0)
    if arch == "llama":
        return LlamaForCausalLM(LlamaConfig(**TINY, num_key_value_heads=2, max_position_embeddings=256, eos_token_id=3,
                                            pad_token_id=0, tie_word_embeddings=True)).eval()
    return T5ForConditionalGeneration(T5Config(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
                                               vocab_size=120, eos_token_id=3, pad_token_id=0, decoder_start_token_id=0)).eval()


def delta_model(arch: str) -> adapters.DeltaModel:
    return adapters.DeltaModel(hf_model(arch), None, f"tiny-{arch}")


def ours(model: adapters.DeltaModel, task: str, arch: str, b: dict) -> torch.Tensor:
    """What the task computes: BERT's token states (the adapter's output), an LM's logits."""
    with torch.no_grad(), model.using(task):
        if arch == "bert":
            return model.encode(**b)[0]
        if arch == "t5":
            return model(**b)
        return model(**b)


def theirs(pm: torch.nn.Module, arch: str, b: dict, n: int) -> torch.Tensor:
    with torch.no_grad():
        out = pm(**b)
    states = out.last_hidden_state if arch == "bert" else out.logits
    return states if arch == "t5" else states[:, states.shape[1] - n:]  # prompt tuning's virtual tokens dropped


def inputs(arch: str) -> dict:
    b = batch()
    if arch == "t5":
        b["decoder_input_ids"] = torch.tensor([[0, 7, 9, 11]] * 3)
    return b


CASES = ([(a, m) for a in ("bert", "llama", "t5") for m in (["lora"], ["ia3"], ["prompt"])] +
         [("bert", ["lora", "bitfit"]), ("llama", ["prefix"])])


@pytest.mark.parametrize("arch,methods", CASES, ids=[f"{a}-{'+'.join(m)}" for a, m in CASES])
def test_round_trip_through_peft(arch, methods, tmp_path):
    model = delta_model(arch)
    head = {"label_names": ["a", "b", "c"]} if arch == "bert" else {"generative": True}
    model.add_task("t", spec(methods), **head)
    perturb(model.task("t"))
    b = inputs(arch)
    mask = b["attention_mask"].bool()
    expect = ours(model, "t", arch, b)
    n = b["input_ids"].shape[1]

    model.export_peft("t", tmp_path / "ours")
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert config["task_type"] == {"bert": "FEATURE_EXTRACTION", "llama": "CAUSAL_LM", "t5": "SEQ_2_SEQ_LM"}[arch]
    pm = peft.PeftModel.from_pretrained(hf_model(arch), tmp_path / "ours").eval()
    got = theirs(pm, arch, b, n)
    diff = (got - expect)[mask] if arch == "bert" else (got - expect)[mask] if arch == "llama" else got - expect
    assert diff.abs().max() < TOL

    back = delta_model(arch)  # ours -> PEFT -> ours: the same function, head included
    assert back.import_peft(tmp_path / "ours") == "t"
    again = ours(back, "t", arch, b)  # bit for bit, except a prefix: its keys are rotated there and back
    assert torch.equal(again, expect) if methods != ["prefix"] else (again - expect)[mask].abs().max() < TOL
    if arch == "bert":
        with torch.no_grad(), model.using("t"), back.using("t"):
            assert torch.equal(back(**b), model(**b))

    pm.save_pretrained(tmp_path / "peft")  # as PEFT writes it: no record of ours beside it
    foreign = delta_model(arch)
    name = foreign.import_peft(tmp_path / "peft", "f", **({"generative": True} if arch != "bert" else {}))
    assert (ours(foreign, name, arch, b) - expect)[mask if arch != "t5" else ...].abs().max() < TOL


def test_real_peft_prompt_adapter_for_t5_that_prompts_the_decoder_is_refused(tmp_path):
    pm = peft.get_peft_model(hf_model("t5"), peft.PromptTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=2))
    pm.save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="num_transformer_submodules=2"):
        delta_model("t5").import_peft(tmp_path)


@pytest.mark.parametrize("arch,methods,reason", [("llama", ["bottleneck"], "no PEFT type"),
                                                 ("bert", ["prefix"], "absolute positions"),
                                                 ("llama", ["lora", "prompt"], "one PEFT adapter is one of")])
def test_export_refuses_what_peft_cannot_hold(arch, methods, reason, tmp_path):
    model = delta_model(arch)
    model.add_task("t", spec(methods), **({"generative": True} if arch == "llama" else {}))
    with pytest.raises(ConfigError, match=reason):
        model.export_peft("t", tmp_path)
    assert not (tmp_path / "adapter_config.json").exists()


def test_bitfit_on_a_model_without_biases_is_refused(tmp_path):
    model = delta_model("llama")
    model.add_task("t", spec(["lora", "bitfit"]), generative=True)
    with pytest.raises(ConfigError, match="has none"):
        model.export_peft("t", tmp_path)


def test_import_checks_backbone_files_and_kinds(tmp_path):
    model = delta_model("bert")
    model.add_task("t", spec(["lora"]), label_names=["x", "y"])
    model.export_peft("t", tmp_path / "a")
    with pytest.raises(CheckpointError, match="trained on 'tiny-bert'"):  # recorded for another base model
        delta_model("llama").import_peft(tmp_path / "a")
    with pytest.raises(CheckpointError, match="does not have"):  # its modules are not in a Llama
        delta_model("llama").import_peft(tmp_path / "a", strict_base=False)
    from transformers import BertConfig, BertModel

    wide = adapters.DeltaModel(BertModel(BertConfig(**{**TINY, "hidden_size": 48}), add_pooling_layer=False), None, "tiny-bert")
    with pytest.raises(CheckpointError, match="fingerprint|another backbone"):
        wide.import_peft(tmp_path / "a")
    (tmp_path / "a" / "delta_continual.json").unlink()  # a foreign adapter: shapes are what is left to check
    with pytest.raises(CheckpointError, match=r"shape \(4, 32\).*needs \(4, 48\)"):
        wide.import_peft(tmp_path / "a")
    assert "t" not in wide.tasks  # nothing half-added

    model.export_peft("t", tmp_path / "b")
    weights = tmp_path / "b" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8])
    with pytest.raises(CheckpointError, match="checksum"):
        delta_model("bert").import_peft(tmp_path / "b")
    with pytest.raises(CheckpointError, match="neither a directory nor a hub id"):
        delta_model("bert").import_peft(tmp_path / "missing" / "x" / "y")
    model.export_peft("t", tmp_path / "c")  # its record's label names edited: refused, not read as another order
    record = json.loads((tmp_path / "c" / "delta_continual.json").read_text())
    assert record["checksum"]
    (tmp_path / "c" / "delta_continual.json").write_text(json.dumps({**record, "label_names": ["y", "x"]}))
    with pytest.raises(CheckpointError, match="delta_continual.json does not match its checksum"):
        delta_model("bert").import_peft(tmp_path / "c")

    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    for change, match in (({"peft_type": "PREFIX_TUNING"}, "absolute positions"), ({"use_dora": True}, "DoRA"),
                          ({"modules_to_save": ["classifier"]}, "modules_to_save"), ({"peft_type": "LOHA"}, "LOHA")):
        (tmp_path / "a" / "adapter_config.json").write_text(json.dumps({**cfg, **change}))
        with pytest.raises(CheckpointError, match=match):
            delta_model("bert").import_peft(tmp_path / "a")


def test_peft_sequence_classification_lora_imports_with_a_fresh_head(tmp_path):
    """PEFT's SEQ_CLS task type saves the classifier whole (modules_to_save ["classifier", "score"]);
    every PEFT classification LoRA was refused for it. Given label_names (a fresh head), the LoRA
    imports as PEFT trained it (the token states PEFT's model computes) and the saved head stays
    behind; without them, or with other saved modules, it is still refused, nothing added."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    hf = BertForSequenceClassification(BertConfig(**TINY, max_position_embeddings=256, num_labels=3)).eval()
    hf.bert.load_state_dict(tiny_backbone("bert").state_dict(), strict=False)  # our backbone's weights (no pooler)
    pm = peft.get_peft_model(hf, peft.LoraConfig(r=4, target_modules=["query", "value"], task_type="SEQ_CLS"))
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.add_(torch.randn_like(p) * 0.2)
    pm.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["modules_to_save"]
    with pytest.raises(CheckpointError, match="left out only where the task gets a fresh head: give label_names"):
        delta_model("bert").import_peft(tmp_path, "t")
    model = delta_model("bert")
    model.import_peft(tmp_path, "t", label_names=["a", "b", "c"])
    b = batch()
    with torch.no_grad():
        theirs_states = pm.eval().base_model.model.bert(**b).last_hidden_state
    assert (ours(model, "t", "bert", b) - theirs_states).abs().max() < TOL and model.task("t").head.num_labels == 3
    cfg = tmp_path / "adapter_config.json"
    cfg.write_text(json.dumps({**json.loads(cfg.read_text()), "modules_to_save": ["classifier", "embeddings"]}))
    with pytest.raises(CheckpointError, match="change the model beyond a delta"):
        delta_model("bert").import_peft(tmp_path, "t", label_names=["a", "b", "c"])
    # prompt tuning saves the head under base_model. (its PEFT model wraps the HF model directly)
    prompt = peft.get_peft_model(BertForSequenceClassification(BertConfig(**TINY, num_labels=3)),
                                 peft.PromptTuningConfig(num_virtual_tokens=3, task_type="SEQ_CLS"))
    prompt.save_pretrained(tmp_path / "prompt")
    model.import_peft(tmp_path / "prompt", "p", label_names=["a", "b", "c"])
    saved = prompt.get_prompt_embedding_to_save("default")
    assert torch.equal(next(iter(model.task("p").deltas.values())).prompt.detach(), saved)


def test_export_over_an_earlier_export_leaves_no_stale_head(tmp_path):
    bert = delta_model("bert")
    bert.add_task("c", spec(["lora"]), label_names=["x", "y"])
    bert.export_peft("c", tmp_path / "d")
    assert (tmp_path / "d" / "head.safetensors").exists()
    llama = delta_model("llama")
    llama.add_task("g", spec(["lora"]), generative=True)
    llama.export_peft("g", tmp_path / "d")  # the same directory: the classification head must go
    assert not (tmp_path / "d" / "head.safetensors").exists()
    assert delta_model("llama").import_peft(tmp_path / "d") == "g"


def test_hub_id_offline_is_one_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match="cannot fetch the PEFT adapter 'someone/some-adapter'"):
        delta_model("bert").import_peft("someone/some-adapter")


def test_vllm_check_of_an_exported_lora(tmp_path):
    model = delta_model("llama")
    model.add_task("t", {"method": "lora", "rank": 8, "alpha": 32.0, "targets": ["query", "value", "ffn_out"]}, generative=True)
    model.export_peft("t", tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["target_modules"] == ["down_proj", "q_proj", "v_proj"]
    assert vllm_problems(config) == []
    site = next(iter(model.task("t").deltas["lora"].site_modules.values()))
    assert vllm_scaling(config) == site.scaling == 4.0
    assert "--max-lora-rank 32" in vllm_problems({**config, "r": 32})[0]
    assert any("DoRA" in p for p in vllm_problems({**config, "use_dora": True}))
    assert any("modules_to_save" in p for p in vllm_problems({**config, "modules_to_save": ["lm_head"]}))
    assert vllm_problems({**config, "peft_type": "IA3"}) == ["vLLM serves LoRA adapters only; this is IA3"]


def test_layer_subsets_keep_their_layers(tmp_path):
    """A LoRA on some layers only exports full module paths (no suffix selects just those) and
    imports back onto the same layers."""
    model = delta_model("llama")
    model.add_task("t", {"method": "lora", "rank": 2, "layers": [1]}, generative=True)
    perturb(model.task("t"))
    model.export_peft("t", tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["target_modules"] == ["layers.1.self_attn.q_proj", "layers.1.self_attn.v_proj"]
    back = delta_model("llama")
    back.import_peft(tmp_path, "t")
    assert back.task("t").configs[0].layers == (1,)
    b = batch()
    assert torch.equal(ours(back, "t", "llama", b), ours(model, "t", "llama", b))


def peft_trained_import(config, scale: float, directory):
    """(our model with task "t", PEFT's model): the adapter PEFT makes from ``config`` on a tiny
    Llama (random values of size ``scale``), saved by PEFT and imported here."""
    pm = peft.get_peft_model(hf_model("llama"), config)
    with torch.no_grad():
        for p in pm.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * scale)
    pm.save_pretrained(directory)
    model = delta_model("llama")
    model.import_peft(directory, "t")
    return model, pm.eval()


def test_prefix_from_peft_with_projection_imports(tmp_path):
    """A prefix PEFT trained through its MLP (prefix_projection) is saved as the MLP's output: it
    imports as a plain prefix giving PEFT's outputs."""
    model, _ = peft_trained_import(peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, prefix_projection=True,
                                                        encoder_hidden_size=16), 0.5, tmp_path)
    b = batch()
    mask = b["attention_mask"].bool()
    loaded = peft.PeftModel.from_pretrained(hf_model("llama"), tmp_path).eval()
    assert (ours(model, "t", "llama", b) - theirs(loaded, "llama", b, b["input_ids"].shape[1]))[mask].abs().max() < TOL


def test_rslora_and_rank_pattern_from_peft_import(tmp_path):
    """rsLoRA scales by alpha / sqrt(r) and rank_pattern gives some modules their own rank: both
    import to PEFT's outputs (a LoRA per distinct rank and layer set)."""
    config = peft.LoraConfig(r=4, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "v_proj"],
                             rank_pattern={"v_proj": 2}, task_type="CAUSAL_LM")
    model, pm = peft_trained_import(config, 0.2, tmp_path)
    assert sorted(c.rank for c in model.task("t").configs) == [2, 4]
    b = batch()
    mask = b["attention_mask"].bool()
    assert (ours(model, "t", "llama", b) - theirs(pm, "llama", b, 9))[mask].abs().max() < TOL


@pytest.mark.parametrize("rslora", [False, True])
def test_rank_and_alpha_patterns_for_one_layer_import(rslora, tmp_path):
    """rank_pattern and alpha_pattern may name one layer's module ("model.layers.0.self_attn.q_proj")
    or a regular expression: that module has its own rank or alpha there only. It imports as a LoRA
    per (rank, alpha, layer set), giving PEFT's outputs (it was refused: "trained for another
    model", or "alpha_pattern ... not imported")."""
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM", use_rslora=rslora,
                             rank_pattern={"model.layers.0.self_attn.q_proj": 2, "layers.1.self_attn.v_proj": 6},
                             alpha_pattern={"layers.1.self_attn.q_proj": 32, "v_pr.j": 3})
    model, pm = peft_trained_import(config, 0.2, tmp_path)
    root = (lambda r: r ** 0.5) if rslora else (lambda r: 1.0)
    sites = sorted((c.rank, round(c.alpha / root(c.rank), 9), t, c.layers) for c in model.task("t").configs for t in c.targets)
    assert sites == [(2, 8, "self_attn.q_proj", (0,)), (4, 3, "self_attn.v_proj", (0,)), (4, 32, "self_attn.q_proj", (1,)),
                     (6, 3, "self_attn.v_proj", (1,))]
    b = batch()
    mask = b["attention_mask"].bool()
    assert (ours(model, "t", "llama", b) - theirs(pm, "llama", b, 9))[mask].abs().max() < TOL


def test_adalora_imports_as_lora_giving_peft_outputs(tmp_path):
    """An AdaLoRA adapter (ADALORA: B (A * E) x, scaled by lora_alpha / init_r, some modules pruned
    to fewer ranks by the allocator's rank_pattern) was refused as an unknown type; it imports
    exactly as LoRAs (A * E for A), giving PEFT's outputs, and travels on as a PEFT LoRA."""
    pm = peft.get_peft_model(hf_model("llama"), peft.AdaLoraConfig(init_r=6, target_r=4, total_step=10, lora_alpha=16,
                                                                    target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.add_(torch.randn_like(p) * 0.3)
    pruned = "model.layers.0.self_attn.q_proj.lora_E"  # as the allocator records it: a mask of kept ranks
    pm.peft_config["default"].rank_pattern = {pruned: [True, False, True, True, False, True]}
    pm.save_pretrained(tmp_path / "ada")
    theirs_model = peft.PeftModel.from_pretrained(hf_model("llama"), tmp_path / "ada").eval()
    model = delta_model("llama")
    model.import_peft(tmp_path / "ada", "t")
    assert sorted(c.rank for c in model.task("t").configs) == [4, 6, 6]
    b = batch()
    mask = b["attention_mask"].bool()
    assert (ours(model, "t", "llama", b) - theirs(theirs_model, "llama", b, 9))[mask].abs().max() < TOL
    model.export_peft("t", tmp_path / "lora")  # on as a plain PEFT LoRA (rank_pattern for the pruned module)
    again = peft.PeftModel.from_pretrained(hf_model("llama"), tmp_path / "lora").eval()
    assert (theirs(again, "llama", b, 9) - theirs(theirs_model, "llama", b, 9))[mask].abs().max() < TOL


def test_patterned_lora_exports_back_as_one_peft_lora(tmp_path):
    """An adapter PEFT saved with rank_pattern / alpha_pattern imports as several LoRAs (one per
    rank, alpha and layer set); it exports back as one PEFT LoRA whose patterns give PEFT the same
    outputs (it was refused: "PEFT cannot hold lora+lora+lora"). Two LoRAs on one module are
    refused by name, and vLLM's rank check reads rank_pattern's ranks too."""
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM",
                             rank_pattern={"model.layers.0.self_attn.q_proj": 2, "layers.1.self_attn.v_proj": 6},
                             alpha_pattern={"layers.1.self_attn.q_proj": 32})
    model, pm = peft_trained_import(config, 0.2, tmp_path / "theirs")
    assert len(model.task("t").configs) == 4
    model.export_peft("t", tmp_path / "ours")
    saved = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert {saved["r"], *saved["rank_pattern"].values()} == {2, 4, 6} and saved["alpha_pattern"]
    b = batch()
    mask = b["attention_mask"].bool()
    back = peft.PeftModel.from_pretrained(hf_model("llama"), tmp_path / "ours").eval()
    assert (theirs(back, "llama", b, 9) - theirs(pm, "llama", b, 9))[mask].abs().max() < TOL
    assert any("rank 6 is above --max-lora-rank 4" in p for p in vllm_problems(saved, 4))

    from continual.export import Exported, serving_recipe

    recipe = serving_recipe([Exported("t", tmp_path / "ours", saved, vllm_problems(saved, 16))], 4)
    assert "--max-lora-rank 8" in recipe[0] and "(rank_pattern / alpha_pattern set some modules' own)" in recipe[2]

    twice = delta_model("llama")
    twice.add_task("t", [{"method": "lora", "rank": 2}, {"method": "lora", "rank": 4}], generative=True)
    with pytest.raises(ConfigError, match=r"2 LoRAs act on layers\.0\.self_attn\.q_proj: a PEFT adapter holds one LoRA per module"):
        twice.export_peft("t", tmp_path / "twice")


@pytest.mark.parametrize("settings, match", [
    ({"alora_invocation_tokens": [5, 6]}, "alora_invocation_tokens"),  # acts only after the invocation tokens
    ({"lora_bias": True}, "lora_bias"),  # B has a bias of its own
    ({"layer_replication": [[0, 2], [1, 2]]}, "layer_replication"),
    ({"init_lora_weights": "pissa"}, "path_initial_model_for_weight_conversion"),  # relative to a changed base
])
def test_peft_lora_settings_that_change_the_computation_are_refused(settings, match, tmp_path):
    """A LoRA variant saved with the plain lora_A / lora_B tensors would import as a plain LoRA and
    compute something else without an error: each such setting is refused by name, nothing added."""
    pm = peft.get_peft_model(hf_model("llama"), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    pm.save_pretrained(tmp_path)
    path = tmp_path / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **settings}))
    model = delta_model("llama")
    with pytest.raises(CheckpointError, match=match):
        model.import_peft(tmp_path, "t")
    assert "t" not in model.tasks


def test_a_setting_from_a_newer_peft_is_refused_but_defaults_are_not(tmp_path):
    model = delta_model("bert")
    model.add_task("t", spec(["lora"]), label_names=["x", "y"])
    model.export_peft("t", tmp_path)
    (tmp_path / "delta_continual.json").unlink()  # a foreign adapter now: only its config says what it is
    path = tmp_path / "adapter_config.json"
    cfg = json.loads(path.read_text())
    path.write_text(json.dumps({**cfg, "some_future_variant": {"k": 1}, "another_default": None}))
    with pytest.raises(CheckpointError, match=r"some_future_variant=\{'k': 1\}") as e:
        delta_model("bert").import_peft(tmp_path, label_names=["x", "y"])
    assert "another_default" not in str(e.value)  # unset (None) settings say nothing
    path.write_text(json.dumps({**cfg, "qalora_group_size": 16, "megatron_core": "megatron.core"}))  # PEFT's defaults
    assert delta_model("bert").import_peft(tmp_path, label_names=["x", "y"])


def test_pissa_adapter_converted_at_save_imports_as_a_lora_of_the_original_weights(tmp_path):
    """PiSSA rewrites the base weights at init; PEFT's conversion at save makes the adapter a (rank
    2r) LoRA of the original weights, which imports and gives PEFT's outputs on the original base."""
    torch.manual_seed(0)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights="pissa", task_type="CAUSAL_LM")
    pm = peft.get_peft_model(hf_model("llama"), config)
    pm.save_pretrained(tmp_path / "init")  # the initial adapter, before training
    with torch.no_grad():
        for p in pm.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.2)
    pm.save_pretrained(tmp_path / "a", path_initial_model_for_weight_conversion=str(tmp_path / "init"))
    model = delta_model("llama")
    model.import_peft(tmp_path / "a", "t")
    assert sorted(c.rank for c in model.task("t").configs) == [8]
    b = batch()
    mask = b["attention_mask"].bool()
    loaded = peft.PeftModel.from_pretrained(hf_model("llama"), tmp_path / "a").eval()
    assert (ours(model, "t", "llama", b) - theirs(loaded, "llama", b, b["input_ids"].shape[1]))[mask].abs().max() < TOL
