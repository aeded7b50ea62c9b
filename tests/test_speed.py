"""The fast path gives the same numbers as the plain one, piece by piece.

CPU tests run everywhere; the GPU ones (bf16, fused AdamW, torch.compile, mixed batches on CUDA)
skip with a reason where there is no CUDA device."""

import numpy as np
import pytest
import torch

import adapters
from adapters.precision import autocast, frozen_linears_in, resolve_precision
from conftest import FAST, batch, lora_model, method_config, tiny_backbone, toy_task
from continual import TrainConfig, train_task
from continual.training import bucket_batches, bucketed_loader, make_loader, mfu, tokenize

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (run on the GPU machine)")


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_precast_frozen_linears_give_autocast_results_bit_for_bit(arch):
    model = lora_model(arch)
    inputs = batch()
    device = torch.device("cpu")
    with torch.no_grad(), autocast("bf16", device):
        want = model(**inputs)
        originals = {n: p.data_ptr() for n, p in model.backbone.named_parameters()}
        with frozen_linears_in(model.backbone, "bf16"):
            assert model.backbone.get_submodule("layers.0.mlp.down_proj" if arch == "llama" else "encoder.layer.0.output.dense").weight.dtype == torch.bfloat16
            got = model(**inputs)
    assert torch.equal(got, want)
    for n, p in model.backbone.named_parameters():  # the very same fp32 tensors are back
        assert p.data_ptr() == originals[n] and p.dtype == torch.float32


def test_precast_casts_the_frozen_weight_of_a_layer_whose_bias_trains():
    """A layer whose bias alone trains (a user's unfrozen biases): its frozen weight is still cast
    once, not by autocast at every step; the trained bias is left alone; both are back afterwards."""
    model = adapters.DeltaModel(tiny_backbone("bert"))
    layer = model.backbone.get_submodule("encoder.layer.0.output.dense")
    layer.bias.requires_grad_(True)
    with frozen_linears_in(model.backbone, "bf16"):
        assert layer.weight.dtype == torch.bfloat16 and layer.bias.dtype == torch.float32
    assert layer.weight.dtype == torch.float32 and layer.bias.requires_grad


def _tied_lm(arch: str) -> adapters.DeltaModel:
    """A tiny decoder or T5 whose LM head shares the input embeddings' weight, with a generative
    LoRA task whose B is non-zero (so gradients reach the head's input through it)."""
    from transformers import LlamaConfig, LlamaForCausalLM, T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    if arch == "llama":
        lm = LlamaForCausalLM(LlamaConfig(vocab_size=120, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True))
    else:
        lm = T5ForConditionalGeneration(T5Config(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2,
                                                 num_heads=4, vocab_size=120, decoder_start_token_id=0,
                                                 tie_word_embeddings=True))
    model = adapters.DeltaModel(lm.eval())  # (no dropout: two passes must draw nothing different)
    task = model.add_task("g", [method_config("lora")], generative=True)
    with torch.no_grad():
        for p in task.parameters():
            p.add_(0.1 * torch.randn_like(p))
    model.activate("g")
    assert model.lm_head.weight is model.backbone.get_input_embeddings().weight  # tied, as SmolLM2's and T5's
    return model


@pytest.mark.parametrize("arch", ["llama", "t5"])
def test_precast_holds_a_tied_lm_head_apart_and_trains_as_autocast_bit_for_bit(arch):
    """A tied LM head is not cast in place (T5's lives in its backbone: cast there, the embeddings
    turned bf16 and the residual stream with them, 0.04 off autocast's logits); a causal LM's,
    outside its backbone, is held in bf16 once instead of cast at every step. Loss and gradients
    are autocast's, bit for bit, and the model is as before afterwards."""
    model = _tied_lm(arch)
    inputs = batch()
    if arch == "t5":
        inputs["decoder_input_ids"] = batch(seed=2, t=5)["input_ids"]
    head, embeddings = model.lm_head, model.backbone.get_input_embeddings()
    trained = [p for p in model.parameters() if p.requires_grad]

    def step() -> tuple[torch.Tensor, list[torch.Tensor]]:
        for p in trained:
            p.grad = None
        with autocast("bf16", torch.device("cpu")):
            loss = model(**inputs).float().logsumexp(-1).mean()
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in trained]

    want_loss, want_grads = step()
    with frozen_linears_in(model.backbone, "bf16", model.lm_head):
        assert embeddings.weight.dtype == torch.float32 and head.weight.dtype == torch.float32
        assert "forward" in head.__dict__  # its bf16 copy, made once
        got_loss, got_grads = step()
    assert torch.equal(got_loss, want_loss)
    assert all(torch.equal(g, w) for g, w in zip(got_grads, want_grads))
    assert "forward" not in head.__dict__ and head.weight is embeddings.weight


def test_precision_resolution():
    from adapters.precision import cpu_has_fast_bf16

    assert resolve_precision("auto", torch.device("cpu")) == ("bf16" if cpu_has_fast_bf16() else "fp32")
    assert resolve_precision("bf16", torch.device("cpu")) == "bf16"
    with pytest.raises(ValueError, match="unknown precision"):
        resolve_precision("int8", torch.device("cpu"))
    with pytest.raises(ValueError, match="precision must be one of"):
        TrainConfig(precision="fp8").validate()
    with pytest.raises(ValueError, match="compile must be"):
        TrainConfig(compile="fastest").validate()


def test_bucket_batches_cover_every_example_once_and_cut_padding():
    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 120, size=1000).tolist()
    batches = bucket_batches(lengths, 16, seed=3)
    assert sorted(i for b in batches for i in b) == list(range(1000))
    assert batches == bucket_batches(lengths, 16, seed=3) and batches != bucket_batches(lengths, 16, seed=4)
    padded = lambda bs: sum(len(b) * max(lengths[i] for i in b) for b in bs)  # noqa: E731
    random_batches = [list(range(i, min(i + 16, 1000))) for i in range(0, 1000, 16)]
    assert padded(batches) < 0.7 * padded(random_batches)


def test_padding_to_a_multiple_of_8_changes_no_logit(text_model):
    model = text_model()
    model.add_task("t", ["lora"], num_labels=2)
    model.activate("t")
    model.eval()
    ds = tokenize(toy_task("t", "apple", 1).train.select(range(16)), model.tokenizer, 16)
    plain = next(iter(make_loader(ds, model.tokenizer, 16, False)))
    bucketed = next(iter(bucketed_loader(ds, model.tokenizer, 16, seed=0)))
    assert bucketed["input_ids"].shape[1] % 8 == 0
    order = [int(torch.nonzero((plain["input_ids"] == row[: plain["input_ids"].shape[1]]).all(1))[0]) for row in bucketed["input_ids"]]
    with torch.no_grad():
        a = model(**{k: v for k, v in plain.items() if k != "labels"})[order]
        b = model(**{k: v for k, v in bucketed.items() if k != "labels"})
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_reading_the_loss_less_often_changes_no_parameter(text_model):
    task = toy_task("t", "apple", 1)
    results, params = [], []
    for every in (1, 5):
        model = text_model()
        model.add_task("t", ["lora"], label_names=["no", "yes"])
        results.append(train_task(model, "t", task.splits(), TrainConfig(**{**FAST, "max_steps": 20, "log_every": every})))
        params.append([p.detach().clone() for p in model.task("t").parameters()])
    for a, b in zip(*params):
        assert torch.equal(a, b)
    one, five = results
    assert [r["step"] for r in five.history] == [5, 10, 15, 20]
    assert five.history[0]["loss"] == pytest.approx(np.mean([r["loss"] for r in one.history[:5]]), rel=1e-5)


class _Confident(torch.nn.Module):
    """A trainable layer before a frozen head so sure of its answers that the loss's gradient at
    the logits (about 2e-9) is below fp16's smallest number (6e-8)."""

    def __init__(self):
        super().__init__()
        self.delta = torch.nn.Linear(4, 4)
        torch.nn.init.eye_(self.delta.weight)
        torch.nn.init.zeros_(self.delta.bias)
        self.head = torch.nn.Linear(4, 3, bias=False).requires_grad_(False)
        with torch.no_grad():
            self.head.weight.copy_(16 * torch.eye(4)[:3])

    def forward(self, x):
        return self.head(self.delta(x))


def test_fp16_training_scales_the_loss_so_small_gradients_survive():
    """fp16 autocast without loss scaling flushed such gradients to zero: the delta never learned."""
    from continual.training import TrainStep, make_optimizer

    x, labels = torch.eye(4)[:3].repeat(16, 1), torch.arange(3).repeat(16)
    grads = {}
    for precision in ("fp32", "fp16"):
        model = _Confident()
        opt = make_optimizer([{"params": list(model.delta.parameters()), "lr": 1e-3}], torch.device("cpu"))
        step = TrainStep(model, opt, precision, grad_clip=None)
        step({"x": x}, labels)
        grads[precision] = model.delta.weight.grad.clone()  # what the optimizer stepped with (unscaled)
        assert (step.scaler is not None) == (precision == "fp16")
    assert grads["fp32"].abs().max() > 0
    assert grads["fp16"].abs().max() > 0, "every gradient underflowed to 0 in fp16"
    torch.testing.assert_close(grads["fp16"], grads["fp32"], rtol=0.05, atol=1e-3 * float(grads["fp32"].abs().max()))


def test_mfu_formula():
    # 4 * 100M params * 128 tokens * 1000 samples/s = 51.2 TFLOP/s, on a 512 TFLOP/s peak: 10%
    assert mfu(1000, 128, 100_000_000, 512e12) == pytest.approx(0.1)


def compile_matches_eager(device, precision, atol):
    model = lora_model("bert", ("lora", "parallel", "bottleneck")).to(device)
    model.train()
    for m in model.modules():  # dropout would draw different masks in compiled code
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    inputs = {k: v.to(device) for k, v in batch(b=4, t=16).items()}
    params = list(model.task("t").parameters())

    def run(fn):
        out = fn(**inputs)
        out.float().pow(2).mean().backward()
        grads = [p.grad.clone() for p in params]
        model.zero_grad(set_to_none=True)
        return out.detach().float(), grads

    with frozen_linears_in(model.backbone, precision), autocast(precision, torch.device(device)):
        want_out, want_grads = run(model)
        out, grads = run(torch.compile(model))
    torch.testing.assert_close(out, want_out, atol=atol, rtol=atol)
    for a, b in zip(grads, want_grads):
        torch.testing.assert_close(a, b, atol=atol, rtol=atol * 10)


@pytest.mark.slow
def test_compiled_forward_and_backward_match_eager_cpu():
    compile_matches_eager("cpu", "fp32", 1e-4)


@needs_cuda
def test_compiled_bf16_matches_eager_bf16_on_gpu():
    compile_matches_eager("cuda", "bf16", 2e-2)


def test_fast_path_compiles_with_cuda_graphs_on_a_gpu_only():
    # checked in the real loop on an H200 (benchmarks/compile_loop.py; docs/speed.md)
    assert TrainConfig.fast(device="cuda").compile == "reduce-overhead"
    assert TrainConfig.fast(device="cuda:1").compile == "reduce-overhead"
    assert TrainConfig.fast(device="cpu").compile is None
    assert TrainConfig.fast(device="cuda", compile=None).compile is None  # an explicit choice wins


@needs_cuda
def test_fast_path_trains_like_the_plain_path_on_gpu(text_model):
    task = toy_task("t", "apple", 1)
    scores = {}
    configs = {"plain": TrainConfig(**FAST, device="cuda"), "fast": TrainConfig.fast(**FAST, device="cuda"),
               "compiled, no cuda graphs": TrainConfig.fast(**FAST, device="cuda", compile="default")}
    assert configs["fast"].compile == "reduce-overhead"
    for name, config in configs.items():
        model = text_model()
        model.add_task("t", ["lora"], label_names=["no", "yes"])
        res = train_task(model, "t", task.splits(), config)
        scores[name] = res.best_dev["accuracy"]
        assert all(p.dtype == torch.float32 for p in model.parameters())  # the model is given back in fp32
    assert scores["plain"] >= 0.9, scores
    assert all(abs(v - scores["plain"]) <= 0.1 for v in scores.values()), scores


@needs_cuda
def test_mixed_batch_parity_on_gpu_in_bf16():
    model = adapters.DeltaModel(tiny_backbone("bert"))
    for i in range(3):
        t = model.add_task(f"t{i}", [method_config("lora"), method_config("bottleneck")], num_labels=2 + i)
        torch.manual_seed(i)
        with torch.no_grad():
            for p in t.parameters():
                p.add_(0.3 * torch.randn_like(p))
    model.cuda().eval()
    inputs = {k: v.cuda() for k, v in batch(b=6).items()}
    ids = ["t0", "t2", "t1", "t1", "t0", "t2"]
    with torch.no_grad(), autocast("bf16", torch.device("cuda")):
        got = model.mixed()(**inputs, task_ids=ids)
        for i, t in enumerate(ids):
            model.activate(t)
            want = model(**{k: v[i : i + 1] for k, v in inputs.items()})[0]
            torch.testing.assert_close(got[i, : want.shape[0]].float(), want.float(), atol=3e-2, rtol=3e-2)


def test_bf16_scores_match_fp32_within_the_stated_tolerance(text_model):
    """What `--precision auto` changes on a CPU with bf16 instructions: the same trained model
    scored in bf16 and fp32 gives logits within 0.05 of each other (bf16 keeps 8 mantissa bits:
    ~0.4% per operation) and the same accuracy up to one example. (Autocast emulates bf16 where the
    CPU lacks the instructions, so this runs everywhere.)"""
    from continual import eval_loader, evaluate

    model = text_model()
    model.add_task("a", [{"method": "lora", "rank": 4}], label_names=["no", "yes"])
    data = toy_task("a", "apple", 1).splits()
    train_task(model, "a", data, TrainConfig(**FAST))
    loader = eval_loader(data["test"], model.tokenizer, 16)
    batch = {k: v for k, v in next(iter(loader)).items() if k != "labels"}
    model.activate("a")
    with torch.no_grad():
        fp32 = model(**batch)
        with frozen_linears_in(model.backbone, "bf16"), autocast("bf16", torch.device("cpu")):
            bf16 = model(**batch).float()
    assert (bf16 - fp32).abs().max() < 0.05, (bf16 - fp32).abs().max()
    a32, a16 = (evaluate(model, "a", loader, precision=p)["accuracy"] for p in ("fp32", "bf16"))
    assert abs(a32 - a16) <= 1 / len(data["test"]) + 1e-9
