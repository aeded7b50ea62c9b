"""Jobs for the pool tests, in a module of their own: spawned workers import it by name."""

import os
import signal
import time


def die_or_wait(job: str) -> str:
    """``"die"`` kills its worker process (as the OOM killer would); the others take a moment, so
    they are still running in the pool when it breaks."""
    if job == "die":
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(2)
    return job
