"""`illada serve`: an OpenAI-compatible HTTP API (completions, chat, streaming) and a live playground page."""
from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import os
import socket
import sys

from illada.commands.generate import add_model_arguments, load_model
from illada.commands.sampling_flags import add_sampling_flags, sampling_changes
from illada.errors import IlladaError

API_KEY_ENV = "ILLADA_API_KEY"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default: this machine only; 0.0.0.0 exposes it to the network)")
    parser.add_argument("--port", type=int, default=8000, help="port (0: any free port)")
    parser.add_argument("--api-key", default=None,
                        help=f"require 'Authorization: Bearer KEY' on every route but / and /health "
                             f"(default: ${API_KEY_ENV} if set)")
    parser.add_argument("--model-name", default=None, help="the model id clients send (default: the checkpoint name)")
    g = parser.add_argument_group("scheduling")
    g.add_argument("--max-batch", type=int, default=8, help="rows (requests × n) sharing one forward pass")
    g.add_argument("--queue-size", type=int, default=64, help="queued requests (rows) before answering 429")
    g.add_argument("--timeout", type=float, default=600.0, help="seconds a request may take, queueing included")
    g = parser.add_argument_group("limits per request")
    g.add_argument("--max-tokens", type=int, default=1024, help="largest max_tokens accepted")
    g.add_argument("--default-max-tokens", type=int, default=128, help="max_tokens when a request gives none")
    g.add_argument("--max-prompt-tokens", type=int, default=None, help="longest prompt (default: the model context)")
    g.add_argument("--max-n", type=int, default=8, help="largest n (choices per prompt)")
    g.add_argument("--max-body-bytes", type=int, default=1 << 20, help="largest request body")
    g = parser.add_argument_group("sampling defaults (a request's own fields override them)")
    add_sampling_flags(g, skip={"gen_length", "stop_strings", "seed"}, defaults=False,
                       unset="the model's generation_config.json, else the sampler's: variable length, one "
                             "token per pass, greedy")
    parser.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])


def settings_from_args(args: argparse.Namespace):
    """ServerSettings from the parsed options, each checked."""
    from illada.sampling.config import SamplingConfig
    from illada.serving import Limits, ServerSettings

    for name in ("max_batch", "queue_size", "max_tokens", "default_max_tokens", "max_n", "max_body_bytes"):
        if getattr(args, name) < 1:
            raise IlladaError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.max_prompt_tokens is not None and args.max_prompt_tokens < 1:
        raise IlladaError(f"--max-prompt-tokens must be >= 1, got {args.max_prompt_tokens}")
    if args.default_max_tokens > args.max_tokens:
        raise IlladaError(f"--default-max-tokens ({args.default_max_tokens}) exceeds --max-tokens ({args.max_tokens})")
    if args.timeout <= 0:
        raise IlladaError(f"--timeout must be > 0, got {args.timeout}")
    if not 0 <= args.port <= 65535:
        raise IlladaError(f"--port must be in 0..65535, got {args.port}")
    limits = Limits(max_prompt_tokens=args.max_prompt_tokens, max_tokens=args.max_tokens,
                    default_max_tokens=args.default_max_tokens, max_n=args.max_n, max_body_bytes=args.max_body_bytes)
    api_key = args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENV) or None
    sampling = SamplingConfig(**sampling_changes(args))
    return ServerSettings(api_key=api_key, max_batch=args.max_batch, queue_size=args.queue_size,
                          timeout=args.timeout, limits=limits, model_name=args.model_name, sampling=sampling)


def server_sampling(lm, args: argparse.Namespace):
    """What requests start from: the sampling flags over the model's generation_config.json defaults (the flags
    alone were checked before the load, by `settings_from_args`)."""
    return lm.generation.sampling_config().replace(**sampling_changes(args))


def listen(host: str, port: int) -> socket.socket:
    """A listening socket, so a busy port is a one-line error before the model is loaded."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as error:
        raise IlladaError(f"cannot listen on {host}:{port}: {error.strerror or error}") from None
    return sock


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def run(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    try:
        import uvicorn

        from illada.serving import create_app
    except ImportError as error:
        raise IlladaError(f"illada serve needs the serving extra ({error.name} is missing): "
                          "pip install 'illada[serve]'") from None

    sock = listen(args.host, args.port)
    try:
        lm = load_model(args)
        settings = dataclasses.replace(settings, sampling=server_sampling(lm, args))
        app = create_app(lm, settings)
    except BaseException:
        sock.close()
        raise
    if lm.is_random:
        print("(random-weight stand-in model: its answers are noise)", file=sys.stderr)
    if not _is_loopback(args.host) and not settings.api_key:
        print(f"illada: warning: listening on {args.host} without an API key: anyone who can reach it can use "
              f"the model (--api-key or ${API_KEY_ENV})", file=sys.stderr)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    print(f"illada: serving {app.state.model_id} on http://{shown}:{port} · playground at / · OpenAI API at /v1",
          file=sys.stderr)
    server = uvicorn.Server(uvicorn.Config(app, log_level=args.log_level))
    server.run(sockets=[sock])
    return 0
