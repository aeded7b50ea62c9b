"""The capability contract: what each registered method declares (``Delta.capabilities``) is what
it does. Shared code trusts these flags instead of testing types, so a wrong flag must fail here.

Parametrized over every registered method: a new method file is checked automatically.
"""

import pytest
import torch

import adapters
from adapters import ConfigError, Delta
from adapters.base import FrozenRef
from conftest import batch, method_config, tiny_backbone
from fusion import add_fusion

METHODS = adapters.available_methods()


def model_with(method, n_tasks=1):
    model = adapters.DeltaModel(tiny_backbone("bert"))
    for i in range(n_tasks):
        model.add_task(f"t{i}", [method_config(method)], num_labels=2)
    return model


@pytest.mark.parametrize("method", METHODS)
def test_declared_capabilities_match_behaviour(method):
    cls = adapters.get_method(method)
    caps = cls.capabilities
    model = model_with(method, 2)
    delta = next(iter(model.task("t0").deltas.values()))
    # site terms <=> a SiteDelta with sites; input transforms <=> the hook is overridden
    assert caps.site_terms == (isinstance(delta, adapters.SiteDelta) and bool(delta.sites))
    assert caps.input_transform == (cls.transform_inputs is not Delta.transform_inputs)
    assert caps.folds or cls.fold is Delta.fold, "fold() is overridden but capabilities.folds is False"
    assert not caps.fusable or caps.site_terms, "fusion weighs per-module terms: fusable needs site_terms"
    # mixed batches: built without error exactly when declared, else refused with the declared reason
    if caps.mixed_batches:
        mixed = model.mixed(["t0", "t1"])
        out = mixed(**batch(), task_ids=["t0", "t1", "t0"])
        assert out.shape[0] == 3
        mixed.detach()
    else:
        with pytest.raises(ConfigError, match="cannot share a batch"):
            model.mixed(["t0", "t1"])
    # decoder-only backbones: refused, with the reason, exactly where declared
    decoder = adapters.DeltaModel(tiny_backbone("llama"))
    if caps.decoders:
        decoder.add_task("t", [method_config(method)], num_labels=2)
    else:
        with pytest.raises(ConfigError, match="decoder-only backbone"):
            decoder.add_task("t", [method_config(method)], num_labels=2)
    check_linear_units(caps, model)
    # fusion: accepted exactly when declared
    if caps.fusable:
        add_fusion(model, "f", ["t0", "t1"], ["x", "y"])
        assert model.task("f")
    else:
        with pytest.raises(ConfigError, match="cannot fuse"):
            add_fusion(model, "f", ["t0", "t1"], ["x", "y"])


def check_linear_units(caps, model):
    """linear units <=> the site modules name their linear maps: every trained parameter once, each
    output with one unit per weight row, the last output equal to the term the site adds."""
    delta = next(iter(model.task("t0").deltas.values()))
    sites = dict(getattr(delta, "site_modules", {}))
    assert caps.linear_units == (bool(sites) and all(hasattr(s, "linear_outputs") for s in sites.values()))
    if not caps.linear_units:
        return
    seen = {}
    handles = [s.register_forward_hook(lambda m, args, out, k=k: seen.__setitem__(k, (args, out))) for k, s in sites.items()]
    with torch.no_grad():
        for p in delta.parameters():
            p.add_(0.1 * torch.randn_like(p))  # LoRA's B and an adapter's up-projection start at zero
        model.activate("t0")
        model(**batch())
    for h in handles:
        h.remove()
    assert set(seen) == set(sites)
    for key, site in sites.items():
        (x, h), term = seen[key]
        maps = site.linear_outputs(x, h)
        named = [id(w) for w, _, _ in maps] + [id(b) for _, b, _ in maps if b is not None]
        assert sorted(named) == sorted(id(p) for p in site.parameters())
        assert all(out.shape[-1] == w.shape[0] for w, _, out in maps)
        torch.testing.assert_close(maps[-1][2], term)


def test_composite_methods_are_not_offered_as_methods():
    composite = [m for m in adapters.available_methods(include_composite=True)
                 if adapters.get_method(m).capabilities.composite]
    assert composite == ["fusion"] and "fusion" not in METHODS


def test_frozen_ref_is_not_saved_counted_or_trained():
    """A site module reading a frozen base weight through FrozenRef (what (IA)^3 and DoRA need)."""
    backbone = tiny_backbone("bert")
    linear = backbone.encoder.layer[0].output.dense

    class Holder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = torch.nn.Parameter(torch.ones(3))
            self.base = FrozenRef(linear)

    h = Holder()
    assert list(h.state_dict()) == ["scale"] and sum(p.numel() for p in h.parameters()) == 3
    assert h.base() is linear and h.base().weight is linear.weight  # the live weight, not a copy
    h.to(torch.float64)
    assert linear.weight.dtype == torch.float32  # casting the holder leaves the backbone alone


def test_ia3_reads_the_frozen_weight_and_saves_only_its_scales(tmp_path):
    model = model_with("ia3")
    task = model.task("t0")
    assert all(k.endswith(".scale") for k in task.deltas.state_dict())
    with torch.no_grad():
        for p in task.deltas.parameters():
            p.fill_(2.0)  # every scaled quantity doubled
    inputs = batch()
    model.activate("t0")
    with torch.no_grad():
        doubled = model.encode(**inputs)[0]
    adapters.save_task(model, "t0", tmp_path / "t0")
    fresh = adapters.DeltaModel(tiny_backbone("bert"))
    adapters.load_task(fresh, tmp_path / "t0")
    fresh.activate("t0")
    with torch.no_grad():
        torch.testing.assert_close(fresh.encode(**inputs)[0], doubled)
