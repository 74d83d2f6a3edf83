"""A Flask app calling embserve deployments through sync handles.

Run it with Flask's server (or any WSGI server: one runtime per worker process)::

    python examples/flask_host.py --port 8000
    curl -s -X POST http://127.0.0.1:8000/predict -H 'Content-Type: application/json' \\
        -d '{"x": 0.7}'

The runtime runs its own event-loop thread; each Flask view blocks only its own thread while it
waits for an answer, with a timeout, and a busy model answers 503 instead of queueing forever.
"""

from __future__ import annotations

import argparse

from flask import Flask, jsonify, request
from flask.typing import ResponseReturnValue

import embserve


@embserve.deployment(num_replicas=2, max_ongoing_requests=4, max_queued_requests=64)
class Classifier:
    """Above the threshold is class 1."""

    def __init__(self, threshold: float) -> None:
        self.threshold = threshold

    def __call__(self, x: float) -> int:
        return int(x > self.threshold)


# One runtime for the process, started when this module is imported (by the WSGI server's
# worker, after any fork), shut down at exit.
runtime = embserve.Runtime()
classifier = runtime.run(Classifier.bind(0.5), name="classifier")

app = Flask(__name__)


@app.post("/predict")
def predict() -> ResponseReturnValue:
    """``{"x": number}`` in, ``{"label": 0 or 1}`` out."""
    body = request.get_json(silent=True)
    if not isinstance(body, dict) or not isinstance(body.get("x"), (int, float)):
        return jsonify(error='expected {"x": number}'), 400
    try:
        label = classifier.remote(float(body["x"])).result(timeout_s=2)
    except (embserve.BackPressureError, TimeoutError):
        return jsonify(error="busy; retry"), 503, {"Retry-After": "1"}
    return jsonify(label=label)


@app.get("/status")
def status() -> ResponseReturnValue:
    """The runtime's deployments and their state."""
    snapshot = runtime.status()
    return jsonify({name: d.state for name, d in snapshot.deployments.items()})


def main() -> None:
    """Serve on 127.0.0.1 with Flask's own server."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()
    print(f"serving on http://{args.host}:{args.port}", flush=True)
    app.run(host=args.host, port=args.port, threaded=True)


if __name__ == "__main__":
    main()
