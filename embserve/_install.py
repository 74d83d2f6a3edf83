"""What to run to install a missing part, said the way that works from where embserve is.

From a checkout of the repository (embserve imported from its source tree, as ``make``
installs it), the sub-distributions are folders beside the core: ``pip install
/path/to/checkout/adapters/asgi``. Installed from wheels or an index, they are the core's
extras: ``pip install 'embserve[asgi]'`` (with ``--find-links DIR`` where ``make dist`` put the
wheels).
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["install_command"]

# Extra name -> the folder of its distribution in a checkout.
_FOLDERS = {"asgi": "adapters/asgi", "process": "backends/process", "dask": "backends/dask"}


def install_command(extra: str, root: Path | None = None) -> str:
    """The command that installs the distribution behind ``extra`` (``"asgi"``, ...).

    ``root`` is the directory above the ``embserve`` package (found when not given).
    """
    if root is None:
        root = Path(__file__).resolve().parent.parent
    folder = root / _FOLDERS[extra]
    if (folder / "pyproject.toml").is_file() and (root / "pyproject.toml").is_file():
        return f"pip install {folder}"
    return f"pip install 'embserve[{extra}]'"
