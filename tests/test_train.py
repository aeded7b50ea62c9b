"""Training-loop helpers, checked against values computed by hand."""

import numpy as np
import pytest
from datasets import Dataset

from continual import majority_rate
from continual.training import lr_factor, macro_f1


def test_majority_rate():
    assert majority_rate(Dataset.from_dict({"label": [0, 1, 1, 2]})) == 0.5
    assert majority_rate(Dataset.from_dict({"label": [3, 3, 3]})) == 1.0


def test_macro_f1_by_hand():
    pred, gold = np.array([0, 0, 1, 1, 2]), np.array([0, 1, 1, 1, 2])
    # class 0: tp1 fp1 fn0 -> 2/3; class 1: tp2 fp0 fn1 -> 4/5; class 2: 1
    assert macro_f1(pred, gold, 3) == pytest.approx((2 / 3 + 4 / 5 + 1) / 3)
    # a label absent from both gold and pred is not averaged in
    assert macro_f1(np.array([0, 1]), np.array([0, 1]), 5) == 1.0


def test_warmup_then_linear_decay():
    assert lr_factor(0, 100, 10) == pytest.approx(0.1)
    assert lr_factor(9, 100, 10) == pytest.approx(1.0)
    assert lr_factor(55, 100, 10) == pytest.approx(0.5)
    assert lr_factor(100, 100, 10) == 0.0


def test_resolve_device_errors_clearly():
    import torch

    from continual import resolve_device

    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="unknown device 'gpu0'"):
        resolve_device("gpu0")
    for other in ("meta", "mps"):  # meta trained on nothing / failed in autocast; mps is not built for
        with pytest.raises(ValueError, match=f"device '{other}': this tool trains on cpu or cuda"):
            resolve_device(other)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="sees no CUDA GPU"):
            resolve_device("cuda")
    else:  # a GPU index the machine lacks: named with the ones it has
        with pytest.raises(ValueError, match="CUDA GPU"):
            resolve_device(f"cuda:{torch.cuda.device_count()}")
