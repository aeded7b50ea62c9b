"""Why the mahalanobis router shrinks its covariance: the routers of a finished per-task run, fitted
on N training examples a task, against two variants of the Mahalanobis router that only this
benchmark builds: ABSCL's own estimate (the pooled sample covariance plus 1e-5 on the diagonal)
and a fixed shrinkage weight.

    python3 benchmarks/router_shrinkage.py RUN [--fit-max 1000,50] [--weight 0.5]

RUN: a finished per-task run (``continual run``'s output folder, e.g. the main command's
``runs/default-per-task-bottleneck-s0``). Prints, per fit size, the Ledoit-Wolf weight chosen
after each task and one table of routing accuracy and ACC with routed tasks. Embedding and
scoring go through ``continual route``'s own path (the run's precision and batch size); each fit
size embeds the stream again. Like ``continual route`` it writes routing-<router>.md/.png and
routing.json into RUN (routing.json then holds the last fit size's routers): run it on a copy
where those files matter.
"""

from __future__ import annotations

import argparse

import torch

from continual.studies.route import route_run
from fusion import routing


class Ridge(routing.MahalanobisRouter):
    """ABSCL's selector as released: Σ = S + 1e-5 I, no shrinkage towards the identity."""

    name = "ridge-1e-5"

    def _estimate(self, scatter: torch.Tensor, fourth: float, n: int, tasks: list[str]) -> tuple[torch.Tensor, float]:
        sample = scatter / n
        return torch.linalg.inv(sample + 1e-5 * torch.eye(sample.shape[0], dtype=sample.dtype)), float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", help="a finished per-task run folder")
    ap.add_argument("--fit-max", default="1000,50", help="training examples a task the routers fit on, comma-separated")
    ap.add_argument("--weight", type=float, default=0.5, help="the fixed shrinkage weight of the 'fixed' variant")
    args = ap.parse_args()
    sizes = [int(s) for s in args.fit_max.split(",")]

    class Fixed(routing.MahalanobisRouter):
        name = f"fixed-{args.weight:g}"

        def __init__(self) -> None:
            super().__init__(shrinkage=args.weight)

    class Logged(routing.MahalanobisRouter):  # the shipped router, printing its weight
        def add_task(self, task, embeddings, labels) -> None:
            super().add_task(task, embeddings, labels)
            print(f"  Ledoit-Wolf weight after {task}: {self.weight:.3f}", flush=True)

    # variants join the registry for this process only, so route_run builds them like the shipped routers
    routing.ROUTERS.update({"mahalanobis": Logged, Ridge.name: Ridge, Fixed.name: Fixed})
    names = ["mahalanobis", Ridge.name, Fixed.name, "prototype", "linear"]
    rows = []
    for n in sizes:
        print(f"fitted on {n} training examples a task:", flush=True)
        for res in route_run(args.run, routers=names, fit_max=n, progress=False):
            rows.append((n, res.router, res.routing_accuracy, res.routed_acc, res.oracle_acc))
    print("\n| fitted on | router | routing accuracy | ACC routed | ACC oracle |\n|---|---|---|---|---|")
    for n, name, routed_to, acc, oracle in rows:
        print(f"| {n} a task | {name} | {routed_to:.3f} | {acc:.3f} | {oracle:.3f} |")


if __name__ == "__main__":
    main()
