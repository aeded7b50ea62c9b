"""Task-free routing: routers on known embeddings, scoring by label names through a mixed model."""

import numpy as np
import pytest
import torch

from conftest import FAST, toy_stream
from continual import TrainConfig, eval_loader, evaluate, make_strategy, run_stream
from continual.plots import routing_heatmap
from fusion.routing import LinearRouter, MahalanobisRouter, PrototypeRouter, RoutingData, embed, route_and_score


def clusters(seed: int, n: int = 40) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Three tasks, each two labels, at well separated points of a 16-d sphere."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.nn.functional.normalize(torch.randn(6, 16, generator=g), dim=1)
    xs, ys = [], []
    for t in range(3):
        y = torch.arange(n) % 2
        x = centres[2 * t + y] + 0.05 * torch.randn(n, 16, generator=g)
        xs.append(torch.nn.functional.normalize(x, dim=1))
        ys.append(y)
    return xs, ys


@pytest.mark.parametrize("router_cls", [PrototypeRouter, LinearRouter, MahalanobisRouter])
def test_routers_find_separated_tasks(router_cls):
    xs, ys = clusters(0)
    router = router_cls()
    for t, (x, y) in enumerate(zip(xs, ys)):
        router.add_task(f"t{t}", x, y.tolist())
    test_x, _ = clusters(0)
    for t, x in enumerate(test_x):
        assert torch.equal(router.predict(x), torch.full((len(x),), t))


def test_prototype_router_is_incremental():
    xs, ys = clusters(1)
    router = PrototypeRouter()
    router.add_task("t0", xs[0], ys[0].tolist())
    protos = [p.clone() for p in router._protos]
    router.add_task("t1", xs[1], ys[1].tolist())
    assert all(torch.equal(a, b) for a, b in zip(protos, router._protos))  # old routes untouched
    assert len(router._protos) == 4
    with pytest.raises(ValueError, match="no examples"):
        router.add_task("t2", xs[2][:0], [])


@pytest.mark.parametrize("router", [PrototypeRouter, LinearRouter, MahalanobisRouter])
def test_a_router_refuses_what_it_would_learn_wrong(router):
    xs, ys = clusters(1)
    r = router()
    with pytest.raises(ValueError, match="no tasks yet"):
        r.predict(xs[0])
    r.add_task("t0", xs[0], ys[0].tolist())
    # the same name twice had become two slots of one task, splitting its examples between them
    for bad, says in [(("t0", xs[1], ys[1].tolist()), "already in the router"),
                      (("t1", xs[1], ys[1].tolist()[:-1]), "labels for"),
                      (("t1", xs[1][:, :-1], ys[1].tolist()), "width")]:
        with pytest.raises(ValueError, match=says):
            r.add_task(*bad)
    assert r.tasks == ["t0"]
    with pytest.raises(ValueError, match="embeddings must be"):
        r.predict(xs[0][:, :-1])


def test_routed_scores_follow_the_route(text_model, tmp_path):
    """With one-hot 'embeddings' routing is perfect (routed = oracle = the stream's own scores);
    with a and b swapped, a's examples are answered by b's delta and head (label names compared)."""
    stream = toy_stream()
    model = text_model()
    run_stream(stream, model, make_strategy("per-task", [{"method": "lora", "rank": 4}]), TrainConfig(**FAST),
               tmp_path / "r")
    tok, names = model.tokenizer, stream.names
    test = {t.name: list(eval_loader(t.test, tok, 16, 8)) for t in stream}
    gold = {t.name: [t.label_names[y] for y in t.test["label"]] for t in stream}
    eye = torch.eye(3)
    train_emb = {n: eye[i].expand(4, -1) for i, n in enumerate(names)}
    data = RoutingData(names, train_emb, {n: [0, 1, 0, 1] for n in names}, test,
                       {n: eye[i].expand(len(gold[n]), -1) for i, n in enumerate(names)}, gold)
    res = route_and_score(model, data, PrototypeRouter())
    assert res.routing_accuracy == 1.0 and res.routed_accuracy == res.oracle_accuracy
    for t in stream:
        assert res.oracle_accuracy[t.name] == pytest.approx(evaluate(model, t.name, eval_loader(t.test, tok, 16))["accuracy"])
    swapped = dict(data.test_emb, a=data.test_emb["b"], b=data.test_emb["a"])
    res = route_and_score(model, RoutingData(names, train_emb, data.fit_labels, test, swapped, gold), PrototypeRouter())
    assert res.confusion.tolist() == [[0, 20, 0], [20, 0, 0], [0, 0, 20]]
    b_on_a = evaluate(model, "b", eval_loader(stream["a"].test, tok, 16))["accuracy"]  # same label names
    assert res.routed_accuracy["a"] == pytest.approx(b_on_a)
    assert res.routed_accuracy["c"] == res.oracle_accuracy["c"]
    assert "| **all** | **0.333** |" in res.table()
    assert routing_heatmap(res, tmp_path / "c.png").stat().st_size > 1000


def test_embeddings_ignore_deltas_and_padding(text_model):
    model = text_model()
    model.add_task("x", [{"method": "bitfit"}], num_labels=2)
    with torch.no_grad():
        for p in model.task("x").parameters():
            p.add_(1.0)
    model.activate("x")
    batch = model.tokenizer(["apple river", "green music table window"], padding=True, return_tensors="pt")
    one = model.tokenizer(["apple river"], return_tensors="pt")
    e = embed(model, [dict(batch)])
    np.testing.assert_allclose(e[0].numpy(), embed(model, [dict(one)])[0].numpy(), atol=1e-5)
    np.testing.assert_allclose(e.norm(dim=1).numpy(), 1.0, rtol=1e-5)
    assert model.active_tasks == ("x",)
    model.remove_task("x")  # the backbone alone gives the same embeddings: the active delta was ignored
    torch.testing.assert_close(embed(model, [dict(batch)]), e)


def test_routers_fit_on_every_label_of_a_file_sorted_by_label(text_model, monkeypatch):
    """Past the fitting cap the router took a task's first training rows: in a file sorted by
    label, one label only, so the other label's examples had no prototype of their task."""
    from datasets import Dataset

    from continual import agnostic
    from continual.scoring import TokenisedTasks
    from streams import Task
    from conftest import toy_rows

    rows = sorted(toy_rows("apple", 1), key=lambda r: r[1])  # all 'no' first
    ds = Dataset.from_dict({"text": [r[0] for r in rows], "label": [r[1] for r in rows]})
    task = Task("sorted", ds, ds.select(range(10)), ds.select(range(10)), ["no", "yes"], {"origin": "toy"})
    monkeypatch.setattr(agnostic, "FIT_MAX", 20)
    model = text_model()
    scorer = agnostic.AgnosticScorer(model, TokenisedTasks(model.tokenizer, 16, 32), lambda name: (name,), seed=3)
    scorer.add_task(task)
    (_, emb, labels), = scorer.fitted
    assert emb.shape[0] == 20 and sorted(labels.tolist()) == [0] * 10 + [1] * 10
    from continual.training.data import sample_rows

    assert sample_rows(ds, None, 3) == list(range(len(ds))) and sample_rows(ds.remove_columns("label"), 5, 3) != [0, 1, 2, 3, 4]
    # fewer rows than labels (fisher_samples=1, design_samples=1, --fit-max 1): a seeded draw; it was
    # "a cap of 1 keeps none", raised after the run's first task had trained
    one = sample_rows(ds, 1, 3)
    assert len(one) == 1 and one == sample_rows(ds, 1, 3) and {tuple(sample_rows(ds, 1, s)) for s in range(20)} != {tuple(one)}


def test_router_names_in_the_config_are_the_routers():
    from continual.training.config import ROUTERS as NAMES
    from fusion.routing import ROUTERS

    assert NAMES == tuple(ROUTERS)


def _tasks_apart_along_a_quiet_direction(seed: int, n: int = 200) -> list[torch.Tensor]:
    """Two tasks whose means differ by 0.3 along a direction of spread 0.05, while both spread
    1.0 along another (a shared nuisance, e.g. length): the cosine to the means mostly measures
    the nuisance, the pooled covariance tells it apart."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for shift in (0.0, 0.3):
        x = torch.randn(n, 8, generator=g) * torch.tensor([1.0, 0.05, 0.2, 0.2, 0.2, 0.2, 0.2, 0.2])
        x[:, 1] += shift
        x[:, 2] += 1.0  # away from the origin, so cosines are defined
        out.append(x)
    return out


def test_mahalanobis_router_reads_the_shared_covariance():
    fit, test = _tasks_apart_along_a_quiet_direction(0), _tasks_apart_along_a_quiet_direction(1)
    maha, proto = MahalanobisRouter(), PrototypeRouter()
    for t, x in enumerate(fit):
        maha.add_task(f"t{t}", x, [0] * len(x))
        proto.add_task(f"t{t}", x, [0] * len(x))
    right = lambda r: float(np.mean([(r.predict(x) == t).float().mean() for t, x in enumerate(test)]))  # noqa: E731
    assert right(maha) > 0.95 and right(proto) < 0.75
    # the distance is the paper's: argmin over tasks of (x - mu_t)^T Sigma^-1 (x - mu_t), by hand in numpy
    x = torch.cat(test).double().numpy()
    centred = np.concatenate([f.double().numpy() - f.double().numpy().mean(0) for f in fit])
    s = centred.T @ centred / len(centred)
    cov = (1 - maha.weight) * s + maha.weight * np.trace(s) / 8 * np.eye(8)
    means = np.stack([f.double().numpy().mean(0) for f in fit])
    dist = np.stack([np.einsum("ed,df,ef->e", x - m, np.linalg.inv(cov), x - m) for m in means], 1)
    assert maha.predict(torch.cat(test)).tolist() == dist.argmin(1).tolist()


def test_mahalanobis_router_shrinks_as_ledoit_wolf_does():
    """The pooled covariance's shrinkage weight is Ledoit and Wolf's, checked against scikit-learn's
    own estimator on the same per-task-centred rows; one task of fewer rows than dimensions (a
    singular sample covariance) still routes."""
    covariance = pytest.importorskip("sklearn.covariance")

    g = torch.Generator().manual_seed(2)
    xs = [torch.randn(12, 20, generator=g) * torch.linspace(0.1, 2, 20) + t for t in range(3)]
    router = MahalanobisRouter()
    for t, x in enumerate(xs):
        router.add_task(f"t{t}", x, [0] * len(x))
        centred = torch.cat([v - v.mean(0) for v in xs[:t + 1]]).double().numpy()
        cov, weight = covariance.ledoit_wolf(centred, assume_centered=True)
        assert router.weight == pytest.approx(weight, rel=1e-6)
        np.testing.assert_allclose(np.linalg.inv(router._precision.numpy()), cov, rtol=1e-6, atol=1e-7)
    assert 0 < router.weight < 1
    assert router.predict(xs[2]).tolist().count(2) > 6


def test_mahalanobis_router_is_incremental_and_refuses_a_singular_covariance():
    xs, ys = clusters(3)
    router = MahalanobisRouter()
    router.add_task("t0", xs[0], ys[0].tolist())
    mean = router._means[0].clone()
    router.add_task("t1", xs[1], ys[1].tolist())
    assert torch.equal(router._means[0], mean) and router._scatter.shape == (16, 16)  # sums, no rows kept
    with pytest.raises(ValueError, match="shrinkage must be"):
        MahalanobisRouter(shrinkage=1.5)
    few = MahalanobisRouter(shrinkage=0.0)  # 10 rows in 16 dimensions: singular, and no shrinkage
    with pytest.raises(ValueError, match="singular at shrinkage 0"):
        few.add_task("t0", xs[0][:10], ys[0][:10].tolist())
    assert few.tasks == [] and few._means == [] and few._count == 0 and few._scatter is None  # nothing kept
    few.add_task("t0", xs[0], ys[0].tolist())  # 40 rows: well estimated, and the refused one left no trace
    assert few.tasks == ["t0"] and few._count == 40
    # the estimate itself can have nothing to go on: two mirror-image rows (Ledoit-Wolf weight 0,
    # a rank-1 sample covariance) or one row per task (no spread); the plain nearest mean routes
    for rows in ([torch.tensor([[1.0, 0.0, 0.0], [-1.0, 0.0, 0.0]]) + 2], [torch.ones(1, 3), torch.zeros(1, 3)]):
        tiny = MahalanobisRouter()
        for t, x in enumerate(rows):
            tiny.add_task(f"t{t}", x, [0] * len(x))
        assert tiny.weight == 1.0
        assert tiny.predict(torch.cat(rows)).tolist() == [t for t, x in enumerate(rows) for _ in x]
