"""SAPT on a tiny BERT: each input mixes every begun task's LoRA by the paper's attention (checked
against plain LoRAs scaled by hand), padding and slots not begun change nothing; the strategy holds
earlier tasks' LoRAs and keys, records each task's attention when it ends, and adds the
reflection's KL (and our own-slot term) as computed by hand; refusals before anything runs."""

import math

import numpy as np
import pytest
import torch

from conftest import FAST, toy_stream
from continual import TrainConfig, make_strategy, run_stream
from continual.scoring import TokenisedTasks
from continual.strategies import SHARED
from continual.training import collate_rows
from adapters import ConfigError

CONFIG = TrainConfig(**{**FAST, "max_steps": 30, "eval_every": 15, "lr": 3e-2})
SAPT = [{"method": "sapt_lora", "rank": 2, "tasks": 3}]
TEXTS = ["apple river music", "stone apple cloud", "music tree", "cloud cloud river stone"]


def delta_of(model):
    return model.task(SHARED).deltas["sapt_lora"]


def hand_alpha(model, ids, mask):
    """The paper's weights, from the module's parameters: softmax_i(k_i · LN(SiLU(W2 W1 max_t e_t)) / √d)
    over the slots with a non-zero key (0 elsewhere)."""
    d = delta_of(model)
    e = model.backbone.get_input_embeddings()(ids).float()
    pooled = torch.stack([e[b, mask[b].bool()].max(0).values for b in range(len(ids))])
    lin1, lin2, _, norm = d.query
    x = torch.nn.functional.silu(pooled @ lin1.weight.t() @ lin2.weight.t())
    q = torch.nn.functional.layer_norm(x, (x.shape[-1],), norm.weight, norm.bias, norm.eps)
    used = [i for i, k in enumerate(d.keys) if k.abs().sum() > 0]
    logits = torch.stack([q @ d.keys[i] for i in used], dim=1) / math.sqrt(q.shape[-1])
    alpha = torch.zeros(len(ids), len(d.keys))
    alpha[:, used] = torch.softmax(logits, dim=1)
    return alpha


def test_each_input_mixes_the_begun_tasks_loras_by_its_attention(text_model):
    model = text_model()
    model.add_task(SHARED, SAPT)
    d = delta_of(model)
    d.begin_task(1)
    with torch.no_grad():
        for name, p in d.named_parameters():
            if ".lora_B." in name:  # every slot's LoRA acts, slot 2's too: its key is still zero
                p.normal_(0, 0.3)
    batch = model.tokenizer(TEXTS, padding=True, return_tensors="pt")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    model.eval()
    with torch.no_grad(), model.acting(SHARED):
        got, _ = model.encode(ids, mask)
    alpha = hand_alpha(model, ids, mask)
    torch.testing.assert_close(d.alpha, alpha)
    assert alpha[:, 2].eq(0).all() and not torch.allclose(alpha[0], alpha[2])  # the weights follow the input
    # by hand: per input, plain LoRAs with slot i's A and α_i · B_i, acting together
    plain = text_model()
    for i in range(2):
        plain.add_task(f"l{i}", [{"method": "lora", "rank": 2}])
    for b in range(len(TEXTS)):
        with torch.no_grad():
            for i in range(2):
                for key, site in plain.task(f"l{i}").deltas["lora"].site_modules.items():
                    site.lora_A.copy_(d.site_modules[key].lora_A[i])
                    site.lora_B.copy_(alpha[b, i] * d.site_modules[key].lora_B[i])
            with plain.acting("l0", "l1"):
                want, _ = plain.encode(ids[b:b + 1], mask[b:b + 1])
        n = int(mask[b].sum())
        torch.testing.assert_close(got[b, :n], want[0, :n], atol=1e-5, rtol=1e-4)


def test_padding_changes_no_weight(text_model):
    model = text_model()
    model.add_task(SHARED, SAPT)
    delta_of(model).begin_task(1)
    batch = model.tokenizer(TEXTS, padding=True, return_tensors="pt")
    alone = model.tokenizer(TEXTS[2:3], return_tensors="pt")
    with torch.no_grad():
        e = model.backbone.get_input_embeddings()
        padded, _ = delta_of(model).scores(e(batch["input_ids"]), batch["attention_mask"])
        single, _ = delta_of(model).scores(e(alone["input_ids"]), alone["attention_mask"])
    assert batch["attention_mask"][2].sum() < batch["attention_mask"].shape[1]  # "music tree" is padded
    torch.testing.assert_close(padded[2], single[0])


def test_earlier_tasks_loras_and_keys_are_held_and_their_attention_recorded(text_model, tmp_path):
    model = text_model()
    strategy = make_strategy("sapt", SAPT, memory_size=12)
    first = {}
    real_finish = strategy.finish

    def finish(m, task):
        real_finish(m, task)
        if task.name == "a":
            first.update({n: p.detach().clone() for n, p in delta_of(m).named_parameters()})
    strategy.finish = finish
    res = run_stream(toy_stream(), model, strategy, CONFIG, tmp_path / "r")
    assert not np.isnan(res.matrix.R[-1]).any()
    now = dict(delta_of(model).named_parameters())
    slot0 = delta_of(model).task_names(0)
    assert all(torch.equal(now[n], first[n]) for n in slot0)  # task a's LoRA and key, held since
    assert any(not torch.equal(now[n], first[n]) for n in delta_of(model).task_names(1))
    assert all(now[f"keys.{i}"].abs().sum() > 0 for i in range(3))
    # a_t: the mean attention over its memory as it ended; task a had one slot, so all of it
    torch.testing.assert_close(strategy.targets["a"], torch.tensor([1.0, 0.0, 0.0]))
    b = strategy.targets["b"]
    assert b[2] == 0 and b[:2].sum().item() == pytest.approx(1.0, abs=1e-5)
    table = (tmp_path / "r" / "reports" / "c" / "attention.csv").read_text().splitlines()
    assert table[0] == "inputs of,a,b,c" and len(table) == 4
    assert sum(float(v) for v in table[3].split(",")[1:]) == pytest.approx(1.0, abs=1e-3)
    assert (tmp_path / "r" / "reports" / "c" / "attention.png").stat().st_size > 1000


def test_the_reflection_and_own_terms_equal_the_hand_computed_ones(text_model, tmp_path):
    model = text_model()
    strategy = make_strategy("sapt", SAPT, memory_size=12, kl_lambda=0.5, own_lambda=0.7, replay_batch=5)
    stream = toy_stream()
    run_stream(stream, model, strategy, CONFIG, tmp_path / "r")
    data = TokenisedTasks(model.tokenizer, CONFIG.max_length, 32)
    task = stream[2]
    batch = collate_rows(data(task)["train"], list(range(6)), model.tokenizer)
    with torch.no_grad():
        term = strategy.loss_term(model, task, CONFIG, data)(batch, None, None).item()
        gen = torch.Generator().manual_seed(CONFIG.seed)
        want = 0.0
        for old in stream.tasks[:2]:
            memory = strategy.memory[old.name]
            rows = collate_rows(data(old)["train"], memory[torch.randint(len(memory), (5,), generator=gen)].tolist(),
                                model.tokenizer)
            alpha = hand_alpha(model, rows["input_ids"], rows["attention_mask"])
            target = strategy.targets[old.name]
            kl = sum(float(p * math.log(p / a)) for row in alpha for p, a in zip(target, row) if p > 0) / len(alpha)
            want += 0.5 * kl
        own = hand_alpha(model, batch["input_ids"], batch["attention_mask"])[:, 2]
        want += -0.7 * own.log().mean().item()
    assert term == pytest.approx(want, rel=1e-4)


def test_refusals_come_before_anything_runs(text_model, tmp_path):
    for key, bad in (("kl_lambda", -1), ("kl_lambda", float("nan")), ("own_lambda", float("inf")),
                     ("memory_size", 0), ("replay_batch", 0)):
        with pytest.raises(ValueError, match=f"sapt: {key} must be"):
            make_strategy("sapt", SAPT, **{key: bad})
    with pytest.raises(ValueError, match=r"give --method sapt_lora:tasks=3"):
        run_stream(toy_stream(), text_model(), make_strategy("sapt", [{**SAPT[0], "tasks": 2}]), CONFIG, tmp_path / "s")
    with pytest.raises(ValueError, match="memory_size=1 cannot keep one input of each earlier task"):
        run_stream(toy_stream(), text_model(), make_strategy("sapt", SAPT, memory_size=1), CONFIG, tmp_path / "m")
    assert not (tmp_path / "s").exists() and not (tmp_path / "m").exists()
    with pytest.raises(ValueError, match="its method must be sapt_lora alone"):
        make_strategy("sapt", ["lora"])
    described = make_strategy("sapt", SAPT).describe()
    assert (described["kl_lambda"], described["memory_size"], described["own_lambda"]) == (0.5, 200, 0.0)


def test_a_slot_past_the_last_is_refused(text_model):
    model = text_model()
    model.add_task(SHARED, SAPT)
    with pytest.raises(ConfigError, match="give sapt_lora:tasks=N"):
        delta_of(model).begin_task(3)
