"""Small programs the tests start as separate processes (workers sharing one study)."""

import time
from pathlib import Path


def start_together(out: str, workers: int, timeout: float) -> None:
    """Return when ``workers`` workers writing beside ``out`` are ready (at most ``timeout`` s), so
    they race."""
    Path(out + ".ready").touch()
    deadline = time.time() + timeout
    while len(list(Path(out).parent.glob("*.ready"))) < workers and time.time() < deadline:
        time.sleep(0.01)
