"""``python -m embserve run module:attr``: the ``embserve`` command (from ``embserve-asgi``)."""

from __future__ import annotations

import importlib
import sys


def main() -> int:
    """Run the ``embserve`` command of the ASGI adapter, found at run time."""
    # The core never imports the adapter statically; the command lives with it.
    try:
        cli = importlib.import_module("embserve_asgi.cli")
    except ImportError:
        from embserve._install import install_command

        print(f"the embserve command needs the ASGI adapter: {install_command('asgi')}")
        return 1
    code: int = cli.main(sys.argv[1:])
    return code


if __name__ == "__main__":
    sys.exit(main())
