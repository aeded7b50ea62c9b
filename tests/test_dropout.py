"""Fast dropout masks on a CPU (continual.training.dropout): the same dropout, drawn more cheaply.

The spec: masks drop at the stated (rounded) rate and keep the mean; they follow torch's seed;
with nothing dropped the model computes exactly what it computes without the swap (so the only
change is the random draw); every dropout site of a BERT goes through it, and leaving the block
puts the model back as it was; decoders (causal attention) are untouched."""

import math

import pytest
import torch
from torch import nn
from transformers import BertConfig, BertModel

from continual.training.dropout import ATTENTION, FastDropout, _attention, fast_dropout, keep_mask
from continual import TrainConfig, train_task
from conftest import TINY, batch, tiny_backbone, toy_task

CPU = torch.device("cpu")


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_masks_drop_at_the_rounded_rate_and_keep_the_mean(p):
    torch.manual_seed(0)
    n = 1_000_000
    m = keep_mask(torch.Size([1000, 1000]), p, CPU)
    q = round(p * 65536) / 65536  # the rate actually drawn
    assert abs(q - p) <= 0.5 / 65536
    dropped = (m == 0).double().mean().item()
    sigma = math.sqrt(q * (1 - q) / n)
    assert abs(dropped - q) < 5 * sigma, (dropped, q)
    kept = m[m != 0]
    assert torch.all(kept == kept[0]) and kept[0].item() == pytest.approx(1 / (1 - q), rel=1e-6)
    assert abs(m.double().mean().item() - 1) < 5 * sigma / (1 - q)


def test_rates_that_round_to_0_or_1_keep_or_drop_everything():
    from continual.training.dropout import dropout

    x = torch.randn(50, 40)
    assert torch.equal(dropout(x, 0.0), x) and torch.equal(dropout(x, 0.4 / 65536), x)
    assert torch.equal(dropout(x, 1 - 0.4 / 65536), torch.zeros_like(x))
    assert torch.equal(dropout(x, 1.0), torch.zeros_like(x))


def test_masks_follow_torch_manual_seed_and_odd_shapes():
    torch.manual_seed(3)
    a = keep_mask(torch.Size([7, 3, 5]), 0.3, CPU, torch.bfloat16)
    torch.manual_seed(3)
    b = keep_mask(torch.Size([7, 3, 5]), 0.3, CPU, torch.bfloat16)
    c = keep_mask(torch.Size([7, 3, 5]), 0.3, CPU, torch.bfloat16)
    assert a.dtype == torch.bfloat16 and a.shape == (7, 3, 5)  # 105 elements: not a multiple of 4
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_masks_built_in_integers_equal_the_plain_select(dtype):
    """The mask is built as (bits >= threshold) times the scale's bit pattern: the very values
    torch.where(keep, scale, 0) gives for the same draw (the same seed)."""
    shape = torch.Size([33, 65, 7])
    torch.manual_seed(11)
    got = keep_mask(shape, 0.1, CPU, dtype)
    torch.manual_seed(11)
    n = shape.numel()
    bits = torch.empty((n + 3) // 4, dtype=torch.int64).random_(-(1 << 63), None).view(torch.int16)[:n].view(shape)
    drop = round(0.1 * 65536)
    scale = torch.tensor(65536 / (65536 - drop), dtype=dtype)
    want = torch.where(bits >= drop - 32768, scale, torch.zeros((), dtype=dtype))
    assert got.dtype == dtype and torch.equal(got.view(torch.uint8), want.view(torch.uint8))
    assert 0 < (got == 0).sum() < n


def bert(hidden: float, attention: float) -> BertModel:
    torch.manual_seed(0)
    cfg = BertConfig(**TINY, max_position_embeddings=64, hidden_dropout_prob=hidden, attention_probs_dropout_prob=attention)
    return BertModel(cfg, add_pooling_layer=False)


def test_with_nothing_dropped_the_model_computes_what_it_did():
    """p = 1e-7 rounds to 0 of 65536: every mask keeps everything, so any difference would come
    from the swapped modules or the plain attention, not from randomness."""
    model = bert(1e-7, 1e-7).train()
    x = batch()
    model.eval()
    ref = model(**x).last_hidden_state
    model.train()
    calls = []
    with fast_dropout(model):
        assert model.config._attn_implementation == ATTENTION
        sites = [m for m in model.modules() if isinstance(m, nn.Dropout)]
        assert sites and all(type(m) is FastDropout for m in sites)
        import continual.training.dropout as fd
        original = fd._dropout
        fd._dropout = lambda t, p: calls.append(t.shape) or original(t, p)
        try:
            out = model(**x).last_hidden_state
        finally:
            fd._dropout = original
    assert len(calls) == TINY["num_hidden_layers"]  # the attention probabilities of every layer
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_leaving_the_block_puts_the_model_back_bit_for_bit():
    model = bert(0.1, 0.1).train()
    before = {name: m for name, m in model.named_modules() if isinstance(m, nn.Dropout)}
    x = batch()
    torch.manual_seed(5)
    ref = model(**x).last_hidden_state
    with fast_dropout(model):
        torch.manual_seed(5)
        fast = model(**x).last_hidden_state
        model.eval()  # a mode set inside the block survives it
    model.train()
    after = {name: m for name, m in model.named_modules() if isinstance(m, nn.Dropout)}
    assert all(after[k] is before[k] and type(after[k]) is nn.Dropout for k in before) and after.keys() == before.keys()
    assert model.config._attn_implementation == "sdpa"
    torch.manual_seed(5)
    assert torch.equal(model(**x).last_hidden_state, ref)
    assert not torch.allclose(fast, ref)  # dropout was on inside the block: other masks


def test_dropout_is_really_applied_and_trains_the_same_way():
    """Train-mode outputs scatter around the eval-mode output by about as much with fast masks as
    with torch's: same dropout rate, same scale."""
    model = bert(0.1, 0.1)
    x = batch(b=8, t=16)
    model.eval()
    ref = model(**x).last_hidden_state.detach()
    model.train()
    spread = {}
    for kind in ("torch", "fast"):
        torch.manual_seed(0)
        with fast_dropout(model, kind), torch.no_grad():
            outs = torch.stack([model(**x).last_hidden_state for _ in range(20)])
        spread[kind] = (outs - ref).pow(2).mean().sqrt().item()
        assert (outs.mean(0) - ref).abs().mean() < (outs - ref).abs().mean()  # centred on the eval output
    assert spread["fast"] > 0.05 and abs(spread["fast"] / spread["torch"] - 1) < 0.15, spread


@pytest.mark.parametrize("bool_mask", [True, False])
def test_plain_attention_equals_sdpa_when_nothing_is_dropped(bool_mask):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 6, 8) for _ in range(3))
    keep = torch.ones(2, 1, 6, 6, dtype=torch.bool)
    keep[1, ..., 4:] = False  # a padded row
    mask = keep if bool_mask else torch.zeros(2, 1, 6, 6).masked_fill(~keep, torch.finfo(torch.float32).min)
    module = nn.Module().train()
    module.is_causal = False
    plain, _ = _attention(module, q, k, v, mask, dropout=1e-7, scaling=0.3)
    ref, _ = sdpa_attention_forward(module, q, k, v, mask, dropout=0.0, scaling=0.3)
    torch.testing.assert_close(plain, ref, atol=1e-6, rtol=1e-5)


def test_a_decoder_is_untouched():
    """Causal attention (and dropout 0, a decoder's default) goes to transformers' SDPA."""
    model = tiny_backbone("llama").train()
    x = batch()
    torch.manual_seed(1)
    ref = model(**x).last_hidden_state
    with fast_dropout(model):
        torch.manual_seed(1)
        assert torch.equal(model(**x).last_hidden_state, ref)


def test_training_with_fast_masks_learns_and_repeats(text_model):
    task = toy_task("t", "apple", 1)
    config = dict(max_steps=30, batch_size=8, eval_every=30, patience=None, progress=False, max_length=32)
    params, results = {}, {}
    for kind in ("fast", "fast", "torch"):
        model = text_model()
        model.add_task("t", ["lora"], label_names=["no", "yes"])
        torch.manual_seed(0)
        results[kind] = train_task(model, "t", task.splits(), TrainConfig(**config, dropout_masks=kind))
        p = torch.cat([q.detach().flatten() for q in model.task("t").parameters()])
        if kind in params:
            assert torch.equal(p, params[kind])  # the same seed: the same masks, the same run
        params[kind] = p
        assert model.backbone.config._attn_implementation == "sdpa"
    assert not torch.equal(params["fast"], params["torch"])
    assert results["fast"].history[-1]["loss"] < results["fast"].history[0]["loss"]
    with pytest.raises(ValueError, match="dropout_masks"):
        TrainConfig(dropout_masks="bernoulli").validate()


@pytest.mark.parametrize("grad", [True, False])
def test_training_attention_on_a_cpu_runs_in_fp32_under_bf16_autocast(monkeypatch, grad):
    """bf16 training on a CPU: the attention kernel gets fp32 inputs with autocast off (its
    bf16 backward is about twice as slow) and the output comes back in bf16; scoring keeps
    autocast's bf16 path."""
    import transformers.integrations.sdpa_attention as sa

    real, seen = sa.sdpa_attention_forward, []

    def spy(module, q, k, v, mask, **kw):
        seen.append((q.dtype, k.dtype, v.dtype, torch.is_autocast_enabled("cpu")))
        return real(module, q, k, v, mask, **kw)

    monkeypatch.setattr(sa, "sdpa_attention_forward", spy)
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 6, 8, requires_grad=grad) for _ in range(3))
    module = nn.Module().train()
    module.is_causal = True
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.set_grad_enabled(grad):
        out, _ = _attention(module, q, k, v, None, dropout=0.0, scaling=0.3)
    assert out.dtype == torch.bfloat16
    if not grad:
        assert seen == [(torch.float32, torch.float32, torch.float32, True)]
        return
    assert seen == [(torch.float32, torch.float32, torch.float32, False)]
    ref, _ = real(module, q.detach(), k.detach(), v.detach(), None, dropout=0.0, scaling=0.3)
    assert torch.equal(out, ref.to(torch.bfloat16))
    out.float().sum().backward()
    assert q.grad is not None and q.grad.dtype == torch.float32 and q.grad.abs().sum() > 0


@pytest.mark.parametrize("masks", ["fast", "torch"])
def test_bf16_training_of_a_real_decoder_runs_attention_in_fp32_with_either_masks(monkeypatch, masks):
    """Inside the training loop's block, a decoder's attention (causal: never the fast-mask path)
    gets fp32 inputs under bf16 autocast, with torch's own masks too."""
    import transformers.integrations.sdpa_attention as sa

    real, seen = sa.sdpa_attention_forward, []
    monkeypatch.setattr(sa, "sdpa_attention_forward", lambda m, q, *a, **kw: seen.append(q.dtype) or real(m, q, *a, **kw))
    model = tiny_backbone("llama").train()
    x = batch()
    for p in model.parameters():
        p.requires_grad_(False)
    emb = model.get_input_embeddings()(x["input_ids"]).requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with fast_dropout(model, masks):
            model(inputs_embeds=emb, attention_mask=x["attention_mask"]).last_hidden_state.float().sum().backward()
    assert seen and set(seen) == {torch.float32}, seen
    assert model.config._attn_implementation == "sdpa"  # put back
    assert emb.grad is not None and emb.grad.abs().sum() > 0


def test_compiled_training_traces_without_graph_breaks():
    # The 64-bit in-place draw of the fast masks cannot be traced: torch.compile on a CPU broke the
    # graph at every dropout, sent the encoder's layer loop back to eager and hit the recompile
    # limit (54 graphs for two tasks in benchmarks/compile_loop.py; 3 once compiled code draws
    # torch's masks). dynamo's explain traces without compiling, so this stays quick.
    model = tiny_backbone("bert").train()
    inputs = batch()
    with fast_dropout(model):
        assert any(isinstance(m, FastDropout) for m in model.modules())
        explained = torch._dynamo.explain(model)(**inputs)
        eager = model(**inputs).last_hidden_state
    assert explained.graph_break_count == 0, explained.break_reasons
    assert eager.requires_grad and torch.isfinite(eager).all()
