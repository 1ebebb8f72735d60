"""moekit.server: an OpenAI-compatible HTTP server over the continuous-batching scheduler.

`create_app` (app.py) builds the FastAPI app; schemas.py holds the request
models, generation.py the prompt/budget rules and responses, streaming.py the
server-sent events, metrics.py the Prometheus metrics, errors.py the OpenAI
error envelope. Needs the `serve` extra (fastapi, uvicorn, prometheus-client).

Not here: the batching itself (moekit.infer.scheduler), the CLI (moekit.cli.serve).
"""

from .app import ServerSettings, create_app

__all__ = ["create_app", "ServerSettings"]
