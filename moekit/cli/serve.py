"""`moekit serve`: run the OpenAI-compatible server (moekit.server) on a model.

Flags, their checks, and one uvicorn server; the model loads in the
background (GET /health answers 503 until it is ready) with the same loading
flags as `moekit generate` (--dtype, --device, --expert-budget, --cache,
--prefetch, --pregate, --slow-tier, --low-bit-fallback, ...: one group and one
function from them to the engine, in loading_flags.py). SIGTERM / Ctrl-C stop it
gracefully: no new connections, running requests get --shutdown-timeout
seconds to finish, the rest are cancelled. Heavy imports (torch, fastapi,
uvicorn) happen inside the handler.

Not here: the server itself (moekit.server), offloading (moekit.infer.offload).
"""

from __future__ import annotations

import os
import signal
import socket
import sys

from .loading_flags import add_loading_flags, check_loading_flags


def _check(args):
    from ..errors import ConfigError

    for name, low in (("max_batch", 1), ("max_queue", 0), ("max_tokens_limit", 1), ("step_tokens", 1), ("max_wait", 0)):
        value = getattr(args, name)
        if value is not None and value < low:
            raise ConfigError(f"--{name.replace('_', '-')} {value} is invalid: it must be an integer >= {low}")
    if not 0 <= args.port <= 65535:
        raise ConfigError(f"--port {args.port} is invalid: it must be in 0..65535")
    if args.shutdown_timeout < 0:
        raise ConfigError(f"--shutdown-timeout {args.shutdown_timeout} is invalid: it must be >= 0 seconds")
    check_loading_flags(args)
    if args.cache == "belady":
        raise ConfigError("--cache belady needs the future routing, which a server does not know: use lru, lfu or lfru")
    if not os.path.exists(args.model):
        raise ConfigError(f"model path {args.model} does not exist: give a Hugging Face model directory or a moekit checkpoint")
    try:
        import fastapi  # noqa: F401
        import prometheus_client  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise ConfigError(f"moekit serve needs the serve extra ({e.name} is missing): pip install 'moekit[serve]'") from None


def _loader(args):
    def load():
        from .loading_flags import engine_from_flags

        engine = engine_from_flags(args)  # the same loading as `moekit generate` (loading_flags.py)
        print(f"moekit serve: model loaded; serving {args.model_name or _default_name(args.model)}", flush=True)
        return engine
    return load


def _default_name(model: str) -> str:
    return os.path.basename(os.path.normpath(model)) or "moekit"


def _bind(host: str, port: int) -> socket.socket:
    """A TCP socket bound to host:port (uvicorn listens on it); a ConfigError naming the address if it cannot be."""
    from ..errors import ConfigError

    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except (OSError, UnicodeError) as e:
        sock.close()
        raise ConfigError(f"cannot listen on --host {host} --port {port}: {getattr(e, 'strerror', None) or e}; give "
                          "an address of this machine (127.0.0.1, 0.0.0.0, ::1) and a free port (0: any)") from None
    sock.set_inheritable(True)
    return sock


def _serve(args) -> int:
    _check(args)
    import uvicorn

    from ..errors import ConfigError, MoekitError
    from ..server import ServerSettings, create_app

    settings = ServerSettings(model_name=args.model_name or _default_name(args.model), max_batch=args.max_batch,
                              max_queue=args.max_queue, max_tokens_limit=args.max_tokens_limit,
                              api_key=args.api_key or os.environ.get("MOEKIT_API_KEY") or None,
                              shutdown_timeout=args.shutdown_timeout, step_tokens=args.step_tokens, max_wait=args.max_wait)
    holder = {}

    def on_load_error(e):
        holder["server"].should_exit = True

    app = create_app(_loader(args), settings, on_load_error=on_load_error)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level, lifespan="on",
                            timeout_graceful_shutdown=max(1, round(args.shutdown_timeout)))
    server = holder["server"] = uvicorn.Server(config)
    sock = _bind(args.host, args.port)  # here, not in uvicorn: the real port (--port 0) is known before it is printed
    # uvicorn shuts down gracefully on SIGTERM, then re-raises it with the previous handler: make that a clean exit
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    auth = " (API key required)" if settings.api_key else ""
    host = f"[{args.host}]" if ":" in args.host else args.host
    print(f"moekit serve: http://{host}:{sock.getsockname()[1]}/v1 as model {settings.model_name!r}{auth}; "
          f"loading {args.model}", flush=True)
    server.run(sockets=[sock])
    error = app.state.server.load_error
    if error is not None:
        if isinstance(error, MoekitError):
            raise error
        raise ConfigError(f"loading {args.model} failed: {type(error).__name__}: {error}")
    print("moekit serve: stopped", file=sys.stderr, flush=True)
    return 0


def add_parsers(sub) -> None:
    """Register `serve` on the `moekit` subparsers."""
    p = sub.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API (continuous batching)")
    p.add_argument("model", help="a GGUF file, a Hugging Face model directory, a moekit run/checkpoint or a moefy output "
                                  "(as `moekit generate` takes)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--model-name", help="the model id clients send (default: the model directory's name)")
    p.add_argument("--max-batch", type=int, default=8, help="sequences decoded together (default 8)")
    p.add_argument("--step-tokens", type=int, help="most sequences decoded per step (default: --max-batch); fewer: a "
                   "model with known routes (Read-ME) picks them by expert")
    p.add_argument("--max-wait", type=int, default=8, help="with --step-tokens: steps a sequence may wait before it goes first (default 8)")
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting for a slot before 429 (default 64)")
    p.add_argument("--max-tokens-limit", type=int, help="largest max_tokens a request may ask for (default: the context)")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1/* (default: $MOEKIT_API_KEY, else none)")
    p.add_argument("--shutdown-timeout", type=float, default=10.0,
                   help="seconds running requests get to finish on SIGTERM before they are cancelled (default 10)")
    p.add_argument("--log-level", default="warning", choices=["critical", "error", "warning", "info", "debug"],
                   help="uvicorn's log level (default warning)")
    add_loading_flags(p)  # --dtype, --device, --quantize, --expert-budget, ... (the same as `moekit generate`)
    p.set_defaults(handler=_serve)


__all__ = ["add_parsers"]
