"""migu (MIGU on a shared delta): the mask against output magnitudes computed by hand, the first
task trained unmasked, its end (threshold 0 keeps every unit: seq-delta), bottleneck adapters, and
its refusals, on tiny models."""

import numpy as np
import pytest
import torch

import dataclasses

from conftest import FAST, tiny_t5, toy_generative_stream, toy_stream
from continual import TrainConfig, make_strategy, run_stream
from continual.strategies import SHARED
from continual.strategies import migu as migu_module
from continual.strategies.migu import UnitMagnitudes
from streams import TaskStream

CONFIG = TrainConfig(**{**FAST, "max_steps": 12, "eval_every": 4})
LORA = [{"method": "lora", "rank": 4}]


def shared_lora(text_model):
    """A model with the shared LoRA and two heads (tasks a and b), its B away from zero."""
    model, strategy = text_model(), make_strategy("migu", LORA, threshold=0.5)
    for task in toy_stream()[:2]:
        strategy.prepare(model, task)
    with torch.no_grad():
        for p in model.task(SHARED).deltas.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model, strategy


@pytest.mark.parametrize("layer", [False, True])
def test_the_mask_keeps_the_rows_whose_outputs_were_largest(layer, text_model):
    """Each LoRA site's input (and the frozen layer's output h) is recorded by a hook of its own;
    A's and B's output magnitudes are computed by hand from it, |x Aᵀ| and |s x Aᵀ Bᵀ| (with
    ``layer``, B's: the whole layer's |h + s x Aᵀ Bᵀ|) summed over the positions. The rows at or
    above the threshold quantile keep their gradient exactly; the others are zero. A pass without
    gradients (a dev score) counts for nothing."""
    model, strategy = shared_lora(text_model)
    sites = [s for d in model.task(SHARED).deltas.values() for s in d.site_modules.values()]
    b = toy_stream()[1]
    batch = dict(model.tokenizer(list(b.train["text"][:6]), padding=True, return_tensors="pt"))
    labels = torch.tensor(list(b.train["label"][:6]))
    inputs = {}
    handles = [s.register_forward_hook(lambda m, args, out: inputs.__setitem__(m, (args[0].detach(), args[1].detach())))
               for s in sites]
    model.activate(*strategy.active("b"))
    params = [p for p in model.parameters() if p.requires_grad]
    with UnitMagnitudes(sites, 0.75, layer=layer) as units:
        with torch.no_grad():
            other = dict(model.tokenizer(["a different text"] * 3, return_tensors="pt"))
            model(**other)  # not counted
        loss = torch.nn.functional.cross_entropy(model(**batch), labels)
        loss.backward()
        unmasked = {id(p): p.grad.clone() for p in params}
        units.mask(params)
    for h in handles:
        h.remove()
    assert len(inputs) == len(sites) == 4  # query and value of the tiny backbone's two layers
    checked = 0
    for site in sites:
        x, h = (v.reshape(-1, v.shape[-1]) for v in inputs[site])
        a = x @ site.lora_A.detach().t()
        term = site.scaling * a @ site.lora_B.detach().t()
        for weight, out in ((site.lora_A, a), (site.lora_B, h + term if layer else term)):
            m = out.abs().sum(0)
            keep = m >= torch.quantile(m, 0.75)
            assert 0 < int(keep.sum()) < len(keep)
            torch.testing.assert_close(weight.grad[keep], unmasked[id(weight)][keep])
            assert not weight.grad[~keep].any() and unmasked[id(weight)][~keep].abs().sum() > 0
            checked += 1
    assert checked == 8
    head = [p for p in model.task("b").parameters() if p.requires_grad]
    assert head and all(torch.equal(p.grad, unmasked[id(p)]) for p in head)  # the head is not masked
    assert units.kept and 0.2 < units.kept[0] < 0.4 and not units.sums


def test_the_first_task_trains_every_unit_and_later_ones_are_masked_each_step(text_model, tmp_path, monkeypatch):
    calls = []
    real = UnitMagnitudes.mask
    monkeypatch.setattr(UnitMagnitudes, "mask", lambda self, params: (calls.append(len(self.sums)), real(self, params)))
    strategy = make_strategy("migu", LORA)
    res = run_stream(toy_stream(), text_model(), strategy, CONFIG, tmp_path / "r")
    assert not np.isnan(res.matrix.R[-1]).any()
    assert len(calls) == 2 * CONFIG.max_steps  # tasks b and c, every step; none on task a
    assert set(calls) == {8}  # A and B at each of the 4 sites


def test_threshold_zero_keeps_every_unit_so_it_is_seq_delta(text_model, tmp_path):
    go = lambda name, d, **kw: run_stream(toy_stream(), text_model(), make_strategy(name, LORA, **kw),  # noqa: E731
                                          CONFIG, tmp_path / d).matrix
    ends = go("migu", "ends", threshold=0.0)
    np.testing.assert_array_equal(ends.R, go("seq-delta", "seq").R)
    masked = go("migu", "masked", threshold=0.9)
    assert not np.array_equal(masked.R, ends.R) and not np.isnan(masked.R[-1]).any()


@pytest.mark.parametrize("method", ["bottleneck", "parallel", "lora+parallel"])
def test_adapter_maps_are_masked_row_by_row_with_their_biases(method, text_model, tmp_path, monkeypatch):
    shares, biases = [], []
    real = UnitMagnitudes.mask

    def spy(self, params):
        tracked = [(w, b) for w, b, _ in self.sums.values()]
        real(self, params)
        for w, b in tracked:
            zero_rows = (w.grad.reshape(len(w.grad), -1) == 0).all(1)
            shares.append(float(zero_rows.float().mean()))
            if b is not None:
                biases.append(torch.equal(zero_rows, b.grad == 0))

    monkeypatch.setattr(UnitMagnitudes, "mask", spy)
    res = run_stream(toy_stream(), text_model(), make_strategy("migu", method, threshold=0.5), CONFIG, tmp_path / "r")
    assert not np.isnan(res.matrix.R[-1]).any()
    assert shares and 0.3 < np.mean(shares) < 0.6  # about half of each map's rows zeroed
    assert biases and all(biases)  # a unit's bias goes with its row


@pytest.mark.parametrize("kind", ["decoder", "t5"])
def test_generative_tasks_are_masked_on_a_decoder_and_on_t5(kind, lm_model, word_tokenizer, tmp_path, monkeypatch):
    """T5's LoRA sites are in its encoder and its decoder; every one is masked in every step."""
    calls = []
    real = UnitMagnitudes.mask
    monkeypatch.setattr(UnitMagnitudes, "mask", lambda self, params: (calls.append(len(self.sums)), real(self, params)))
    model = lm_model() if kind == "decoder" else tiny_t5(word_tokenizer)
    config = dataclasses.replace(CONFIG, max_length=32, lr=3e-2)
    res = run_stream(TaskStream("toy-gen", toy_generative_stream().tasks[:2]), model, make_strategy("migu", LORA),
                     config, tmp_path / "r")
    sites = sum(len(d.site_modules) for d in model.task(SHARED).deltas.values())
    assert not np.isnan(res.matrix.R[-1]).any()
    assert len(calls) == config.max_steps and set(calls) == {2 * sites}


def test_a_method_without_linear_maps_and_bad_thresholds_are_refused():
    for method in ("bitfit", "ia3", "prompt", "lora+bitfit"):
        with pytest.raises(ValueError, match="migu masks the output units of a delta's linear maps"):
            make_strategy("migu", method)
    for bad in (1, 1.5, -0.1, float("nan"), True, "0.5"):
        with pytest.raises(ValueError, match=r"migu: threshold must be a number in \[0, 1\)"):
            make_strategy("migu", LORA, threshold=bad)
    with pytest.raises(ValueError, match="migu: magnitudes must be one of term, layer, got 'output'"):
        make_strategy("migu", LORA, magnitudes="output")
    assert make_strategy("migu").describe()["threshold"] == 0.7
    assert make_strategy("migu").describe()["magnitudes"] == "term"
    assert [m.method for m in make_strategy("migu").methods] == ["lora"]


def test_a_step_that_saw_no_output_is_an_error():
    with pytest.raises(RuntimeError, match="no output of the shared delta's linear maps"):
        migu_module.UnitMagnitudes([], 0.5).mask([])


def test_several_processes_are_refused_with_the_reason(monkeypatch):
    from continual import scheduler

    monkeypatch.setattr(scheduler.distributed, "active", lambda: True)
    monkeypatch.setattr(scheduler.distributed, "world_size", lambda: 2)
    with pytest.raises(ValueError, match=r"'migu' cannot run on 2 processes \(its gradient mask is chosen from one "
                                         r"process's batch"):
        scheduler.check_distributed(make_strategy("migu", LORA), CONFIG)
