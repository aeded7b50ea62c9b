"""magmax (MagMax on a shared delta) and the magmax merge rule: the rule by hand, the strategy's
chain and merge against the paper's equation over a real toy stream, λ chosen on the dev sets
(scale="dev") against dev accuracies computed by hand, and its refusals."""

import numpy as np
import pytest
import torch

from conftest import FAST, toy_stream
from continual import TrainConfig, make_strategy, run_stream
from continual.scoring import TokenisedTasks
from continual.strategies import SHARED, base
from continual.strategies.magmax import SCALES, MagMax
from continual.training import collate_rows
from fusion.merge import magmax_merge

LORA = [{"method": "lora", "rank": 4}]


def test_the_rule_takes_each_entry_from_the_row_that_moved_it_most():
    v = torch.tensor([[3.0, -1.0, 0.5, 0.0], [-2.0, -4.0, -0.5, 0.0], [1.0, 0.0, 0.25, 0.0]])
    # largest magnitudes: 3 (row 0), -4 (row 1), a tie of 0.5 and -0.5 (the later row, 1, wins), 0
    torch.testing.assert_close(magmax_merge(v, torch.ones(3)), torch.tensor([3.0, -4.0, -0.5, 0.0]))
    # weights scale the rows before the choice: row 0 at 0.1 loses entry 0 (0.3 against -2 and 2, a
    # tie the last row wins), and row 2 at 2 ties row 1 in entry 2 and wins it
    torch.testing.assert_close(magmax_merge(v, torch.tensor([0.1, 1.0, 2.0])), torch.tensor([2.0, -4.0, 0.5, 0.0]))
    # weights on the CPU with vectors elsewhere (a GPU run's delta; the meta device stands in here)
    assert magmax_merge(torch.zeros(2, 3, device="meta"), torch.ones(2)).device.type == "meta"
    # any shape after the first dimension
    m = torch.randn(3, 2, 5, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(magmax_merge(m, torch.ones(3)).flatten(), magmax_merge(m.reshape(3, -1), torch.ones(3)))


def test_the_delta_answers_with_the_merge_of_its_chains_task_vectors(text_model, tmp_path, monkeypatch):
    starts, chains = [], []
    real_train = base.train_task

    def recording(model, task, *a, **kw):  # where each task's training starts
        starts.append({k: p.detach().clone() for k, p in MagMax.shared_params(model).items()})
        return real_train(model, task, *a, **kw)

    monkeypatch.setattr(base, "train_task", recording)
    real_merge = MagMax.merge
    monkeypatch.setattr(MagMax, "merge", lambda self, shared: (chains.append({k: p.detach().clone() for k, p in shared.items()}),
                                                               real_merge(self, shared))[-1])
    model = text_model()
    strategy = make_strategy("magmax", LORA, scale=0.7)
    res = run_stream(toy_stream(), model, strategy, TrainConfig(**{**FAST, "max_steps": 30, "eval_every": 15}), tmp_path / "r")
    assert not np.isnan(res.matrix.R[-1]).any() and len(chains) == len(starts) == 3
    for t in (1, 2):  # the chain goes on from where the last task ended, not from the merge
        for k in starts[t]:
            torch.testing.assert_close(starts[t][k], chains[t - 1][k])
    final = MagMax.shared_params(model)
    moved = 0
    for k, theta0 in starts[0].items():
        taus = torch.stack([c[k] - theta0 for c in chains])
        pick = taus.abs().argmax(0, keepdim=True)  # the paper's equation, written apart from the rule's code
        want = theta0 + 0.7 * taus.gather(0, pick).squeeze(0)
        torch.testing.assert_close(final[k].detach(), want)
        moved += int((pick != 2).sum())
    assert moved > 0  # some parameters keep an earlier task's move: the merge is not the last task's delta


def test_scale_dev_keeps_the_scale_with_the_best_mean_dev_score(text_model, tmp_path, monkeypatch):
    picked = []
    real = MagMax.choose_scale
    monkeypatch.setattr(MagMax, "choose_scale", lambda self, *a: (picked.append(real(self, *a)), picked[-1])[-1])
    model, config = text_model(), TrainConfig(**{**FAST, "max_steps": 30, "eval_every": 15})
    strategy = make_strategy("magmax", LORA, scale="dev")
    run_stream(toy_stream(), model, strategy, config, tmp_path / "r")
    assert len(picked) == 3 and all(v in SCALES for v in picked)
    final = {k: p.detach().clone() for k, p in MagMax.shared_params(model).items()}
    # by hand: each λ's delta, each task's dev accuracy through its own head, the mean over the three
    data, means = TokenisedTasks(model.tokenizer, config.max_length, 32), {}
    model.eval()
    for lam in SCALES:
        accs = []
        with torch.no_grad():
            for k, p in MagMax.shared_params(model).items():
                p.copy_(strategy.init[k] + lam * strategy.merged[k])
            for t in toy_stream():
                dev = data(t)["dev"]
                rows = collate_rows(dev, list(range(len(dev))), model.tokenizer)
                with model.acting(SHARED, t.name):
                    logits = model(input_ids=rows["input_ids"], attention_mask=rows["attention_mask"])
                accs.append(float((logits.argmax(-1) == rows["labels"]).float().mean()))
        means[lam] = sum(accs) / len(accs)
    best = max(SCALES, key=lambda v: (means[v], -v))  # the smaller λ on a tie
    assert picked[-1] == best, means
    for k, theta0 in strategy.init.items():
        torch.testing.assert_close(final[k], theta0 + best * strategy.merged[k])


def test_bad_scales_are_refused():
    for bad in (0, -1.0, float("nan"), float("inf"), True, "best"):
        with pytest.raises(ValueError, match=r"magmax: scale must be a finite number > 0 \(or dev\)"):
            make_strategy("magmax", LORA, scale=bad)
    assert make_strategy("magmax", LORA).describe()["scale"] == 0.5
