"""Freed memory held for reuse on a CPU (continual.training.malloc): what it is for, page faults
that stop, checked in fresh processes (the setting is process-wide and cannot be undone)."""

import subprocess
import sys
import textwrap

import pytest

from continual import TrainConfig
from continual.training import MALLOC

PROBE = textwrap.dedent("""
    import resource, statistics, sys, torch
    from continual.training import hold_freed_memory, malloc
    if sys.argv[1] == "hold":
        assert malloc.apply("hold", "cpu") and hold_freed_memory()  # the second call: cached, the same answer
    else:
        assert not malloc.apply("hold", "cuda") and not malloc.apply("default", "cpu")  # nothing set
    faults = []
    for _ in range(10):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        x = torch.ones(16 << 20)  # 64 MiB: above glibc's adaptive mmap ceiling of 32 MiB
        del x
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    print(statistics.median(faults))  # the first one or two blocks are new memory either way
""")


def faults_per_allocation(malloc: str) -> float:
    """The median number of minor page faults of making and dropping a 64 MiB tensor."""
    out = subprocess.run([sys.executable, "-c", PROBE, malloc], capture_output=True, text=True, check=True)
    return float(out.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_held_memory_is_reused_without_page_faults():
    # a fresh 64 MiB block is 16,384 pages of 4 KiB: the kernel maps each one again on first touch
    assert faults_per_allocation("default") > 10_000
    assert faults_per_allocation("hold") < 100


def test_the_setting_is_validated_and_on_in_the_fast_path():
    assert MALLOC == ("default", "hold") and TrainConfig().malloc == "default"
    assert TrainConfig.fast().malloc == "hold"
    with pytest.raises(ValueError, match="malloc"):
        TrainConfig(malloc="jemalloc").validate()


def test_continual_run_holds_memory_by_default():
    from continual.cli import build_parser
    from continual.cli.commands import train_config

    args = build_parser().parse_args(["run", "--no-mlflow"])
    assert train_config(args).malloc == "hold"
    args = build_parser().parse_args(["run", "--no-mlflow", "--malloc", "default"])
    assert train_config(args).malloc == "default"
