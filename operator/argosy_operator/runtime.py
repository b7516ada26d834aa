"""`argosy-operator run`: kopf embedded in our own event loop, plus the metrics server."""

from __future__ import annotations

import argparse
import asyncio
import logging

import kopf
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, disable_created_metrics, generate_latest

from argosy_operator import handlers
from argosy_operator.autoscaling_loop import start_autoscaling
from argosy_operator.controller import Runtime
from argosy_operator.kubeapi import CredentialsError, load_credentials
from argosy_operator.metrics import OperatorMetrics, create_metrics
from argosy_operator.settings import OperatorSettings, settings_from_args

logger = logging.getLogger(__name__)


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level, logging.INFO),
        format="%(asctime)s level=%(levelname)s logger=%(name)s %(message)s",
    )
    # aiohttp's access log would print every scrape, kopf one line per handled event.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    if level != "DEBUG":
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)


def metrics_app(metrics: OperatorMetrics, ready: asyncio.Event) -> web.Application:
    async def serve_metrics(_: web.Request) -> web.Response:
        return web.Response(body=generate_latest(metrics.registry),
                            headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def healthz(_: web.Request) -> web.Response:
        return web.Response(text="ok\n")  # the event loop answers: the process is alive

    async def readyz(_: web.Request) -> web.Response:
        if ready.is_set():
            return web.Response(text="ok\n")
        return web.Response(status=503, text="kopf is starting\n")

    app = web.Application()
    app.router.add_get("/metrics", serve_metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    return app


async def serve(settings: OperatorSettings) -> int:
    try:
        credentials = load_credentials(settings.kubeconfig)
    except CredentialsError as e:
        logger.error("%s", e)
        return 1
    metrics = create_metrics()
    runtime = Runtime(settings, credentials, metrics)
    registry = kopf.OperatorRegistry()
    handlers.register(registry, runtime)
    kopf_settings = kopf.OperatorSettings()
    handlers.configure(kopf_settings)

    ready = asyncio.Event()
    runner = web.AppRunner(metrics_app(metrics, ready), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, settings.metrics_host, settings.metrics_port)
    try:
        await site.start()
    except OSError as e:
        logger.error("cannot serve metrics on %s:%d: %s", settings.metrics_host, settings.metrics_port, e)
        await runner.cleanup()
        await runtime.api.close()
        return 1
    logger.info("metrics on %s:%d; watching %s", settings.metrics_host, settings.metrics_port,
                ", ".join(settings.namespaces) or "all namespaces")
    runtime.begin()
    # spec.autoscaling (autoscaling_loop.py); it scales only while this replica leads.
    autoscaling = start_autoscaling(settings, metrics.registry, is_leader=lambda: runtime.leading,
                                    client=runtime.api.client, snapshot=runtime.autoscaling_snapshot)
    try:
        await kopf.operator(
            registry=registry,
            settings=kopf_settings,
            # No kopf peering: several replicas elect one leader with a Lease (leader.py), and
            # a standby's kopf only watches, so it writes nothing.
            standalone=True,
            clusterwide=settings.clusterwide,
            namespaces=list(settings.namespaces),
            ready_flag=ready,
        )
    finally:
        await autoscaling.stop()
        await runtime.stop()
        await runner.cleanup()
    return 0


def run_operator(args: argparse.Namespace) -> int:
    """Entry point of `argosy-operator run` (cli.py parses the flags)."""
    settings = settings_from_args(args)
    configure_logging(settings.log_level)
    disable_created_metrics()  # *_created series double the scrape for no use here
    try:
        return asyncio.run(serve(settings))
    except KeyboardInterrupt:
        return 0
