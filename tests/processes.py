"""Looking at processes from tests: whether one is still running."""

from __future__ import annotations

import os


def alive(pid: int) -> bool:
    """Whether process ``pid`` runs; a zombie (exited, not yet reaped) does not."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            # An orphan's exit is reaped by whoever adopted it; until then it is a zombie.
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
    except OSError:  # no /proc here: ask the kernel directly
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
