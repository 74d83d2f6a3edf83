"""`import embserve` stays light: no heavy dependency until a feature needs it."""

from __future__ import annotations

import json
import subprocess
import sys


def test_import_embserve_pulls_in_no_heavy_dependency() -> None:
    code = (
        "import sys, json, embserve; "
        "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))"
    )
    output = subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True
    ).stdout
    loaded = set(json.loads(output))
    heavy = {"dask", "distributed", "hypercorn", "starlette", "numpy", "embserve_asgi"}
    assert not loaded & heavy, loaded & heavy


def test_public_names_have_docstrings() -> None:
    import embserve

    for name in embserve.__all__:
        if name in ("App", "ingress"):
            continue
        value = getattr(embserve, name)
        assert getattr(value, "__doc__", None), name
