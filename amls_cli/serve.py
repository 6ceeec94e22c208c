"""`amls serve` (the ML backend under gunicorn) and `amls worker` (RQ training workers)."""

from __future__ import annotations

import argparse
import logging
from typing import Any

from ml_backend.config import Config, ConfigError

logger = logging.getLogger(__name__)

# Threads per gunicorn worker: webhooks must be answered while /predict is scoring.
THREADS = 8


def register(sub: argparse._SubParsersAction) -> None:
    """Add `serve` and `worker` to the `amls` parser."""
    serve = sub.add_parser("serve", help="run the Label Studio ML backend (HTTP, gunicorn)",
                           description="Serve the ML backend. Settings come from the "
                                       "environment (LABEL_STUDIO_URL, LABEL_STUDIO_API_KEY, "
                                       "MODEL_DIR, REDIS_URL, AMLS_*).")
    serve.add_argument("--host", default="127.0.0.1",
                       help="address to bind (default 127.0.0.1: this machine only); any other "
                       "address needs BASIC_AUTH_USER / BASIC_AUTH_PASS or --insecure")
    serve.add_argument("--insecure", action="store_true",
                       help="allow a non-loopback --host without basic auth: anyone who can "
                       "reach it can start training jobs and read /metrics")
    serve.add_argument("--port", type=int, default=9090, help="port (default 9090)")
    serve.add_argument("--workers", type=int, default=1,
                       help="gunicorn worker processes (default 1; forced to 1 without "
                            "REDIS_URL, because jobs then run in the server process)")
    serve.set_defaults(func=serve_command)

    worker = sub.add_parser("worker", help="run an RQ worker for training jobs and "
                                           "re-rankings (needs REDIS_URL)")
    worker.add_argument("--burst", action="store_true",
                        help="exit when the queue is empty instead of waiting for jobs")
    worker.set_defaults(func=worker_command)


def _config() -> Config | None:
    try:
        return Config.from_env()
    except ConfigError as err:
        logger.error("invalid configuration: %s", err)
        return None


def serve_command(args: argparse.Namespace) -> int:
    cfg = _config()
    if cfg is None:
        return 2
    if args.workers < 1 or not 0 < args.port < 65536:
        logger.error("--workers must be >= 1 and --port in 1..65535")
        return 2
    if not cfg.auth_enabled and not is_loopback(args.host):
        if not args.insecure:
            logger.error("refusing to serve on %s without authentication: set "
                         "BASIC_AUTH_USER and BASIC_AUTH_PASS (and the same in the Label "
                         "Studio ML backend connection), bind 127.0.0.1, or pass --insecure",
                         args.host)
            return 2
        logger.warning("serving on %s WITHOUT authentication (--insecure): anyone who can "
                       "reach it can start training jobs", args.host)
    workers = args.workers
    if not cfg.redis_url and workers > 1:
        logger.warning("REDIS_URL is not set: jobs run in-process, so using 1 worker, not %d",
                       workers)
        workers = 1
    if not cfg.label_studio_url or not cfg.label_studio_api_key:
        logger.warning("LABEL_STUDIO_URL / LABEL_STUDIO_API_KEY unset: training jobs will fail "
                       "until they are set")
    options = {"bind": f"{args.host}:{args.port}", "workers": workers,
               "worker_class": "gthread", "threads": THREADS, "timeout": 120,
               "accesslog": "-", "errorlog": "-"}
    logger.info("serving on %s with %d worker(s), jobs %s", options["bind"], workers,
                "on RQ queue " + cfg.queue_name if cfg.redis_url else "in-process")
    _gunicorn_app(cfg, options).run()
    return 0


def is_loopback(host: str) -> bool:
    """True for localhost and loopback addresses (127.0.0.0/8, ::1)."""
    import ipaddress

    if host.strip("[]").lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve anywhere


def worker_command(args: argparse.Namespace) -> int:
    cfg = _config()
    if cfg is None:
        return 2
    if not cfg.redis_url:
        logger.error("amls worker needs REDIS_URL (e.g. redis://localhost:6379/0); without it "
                     "`amls serve` runs training jobs itself")
        return 2
    from redis import Redis
    from rq import Queue, Worker

    connection = Redis.from_url(cfg.redis_url)
    # Instant re-rankings first: a free worker takes them before the next training cycle.
    names = [cfg.fast_queue_name, cfg.queue_name] if cfg.fast_rerank else [cfg.queue_name]
    worker = Worker([Queue(n, connection=connection) for n in names], connection=connection)
    logger.info("RQ worker on queues %s (burst=%s)", ", ".join(names), args.burst)
    worker.work(burst=args.burst)
    return 0


def _gunicorn_app(cfg: Config, options: dict[str, Any]) -> Any:
    """A gunicorn application whose workers each build the service and the Flask app."""
    from gunicorn.app.base import BaseApplication

    class App(BaseApplication):
        def load_config(self) -> None:
            for key, value in options.items():
                self.cfg.set(key, value)

        def load(self) -> Any:
            # Runs in each worker process after the fork: threads and Redis connections are
            # created where they are used.
            from ml_backend.app import create_app
            from ml_backend.service import AnomalyService

            return create_app(AnomalyService.from_config(cfg), cfg)

    return App()
