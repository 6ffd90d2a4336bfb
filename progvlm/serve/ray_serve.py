"""The cloud half as a Ray Serve application: replicas, Ray Serve's request batching,
autoscaling, and the very HTTP contract of the single-process service.

Each replica loads the (VLM, MAE) pair once and serves the single-process FastAPI app
(cloud.create_app) through `@serve.ingress`: /healthz, /v1/info, /v1/full,
/v1/progressive and the WebSocket /v1/progressive/stream (Ray Serve passes WebSockets through
a FastAPI ingress: docs.ray.io, serve/http-guide, "WebSockets"). Behind the app the model is
a `BatchingCloudModel` whose jobs go to the replica's `@serve.batch` method, so Ray Serve
forms the batches (at most `max_batch`, waiting at most `batch_wait_ms` after the first
request: unlike the in-process MicroBatcher, Ray Serve waits even for a lone request) and
each runs as one pass (`run_jobs`: MAE decoder over all frames, padded language half).

Scaling: `replicas` fixed, or `autoscale=(min, max)` with Ray Serve's autoscaler aiming at
`max_batch` requests in flight per replica (a full batch each). Each replica asks Ray for
`num_cpus` CPUs and `num_gpus` GPUs (fractions share a GPU: 0.5 → two replicas per GPU).

    python -m progvlm serve-cloud-ray --replicas 2 --port 8600
"""
from __future__ import annotations

import asyncio
import time
from functools import partial
from pathlib import Path

from . import cloud
from .batching import MAX_BATCH, MAX_WAIT_MS, Batched, BatchingCloudModel, Job, run_isolated, run_jobs
from .cloud import DEFAULT_MAX_BODY_BYTES
from ..net.http_limits import bind_names

APP_NAME = "progvlm-cloud"


def cloud_app(model: BatchingCloudModel, token: str | None, max_body_bytes: int,
              allowed_hosts=frozenset()):
    """The single-process service's FastAPI app, around `model`."""
    return cloud.create_app(model.split, token, max_body_bytes, model=model,
                                    allowed_hosts=allowed_hosts)


def _replica_class():
    """The deployment class, built on first use so that importing this module needs no Ray."""
    from ray import serve

    @serve.ingress()
    class CloudReplica:
        """One replica: the (VLM, MAE) pair, the FastAPI app, Ray Serve's batch queue."""

        def __init__(self, vlm, mae, token, max_body_bytes, max_batch, batch_wait_ms, threads,
                     allowed_hosts=()):
            import torch

            from ..split import load_split
            torch.set_num_threads(threads)
            self.split = load_split(vlm, mae)
            self.token, self.max_body_bytes = token, max_body_bytes
            self.allowed_hosts = frozenset(allowed_hosts)
            self.max_batch, self.batch_wait_ms = max_batch, batch_wait_ms
            self.answer_batch.set_max_batch_size(max_batch)
            self.answer_batch.set_batch_wait_timeout_s(batch_wait_ms / 1e3)

        async def __serve_build_asgi_app__(self):
            """Called by Ray Serve after __init__, on the loop that serves the app: the app's
            worker threads hand their jobs to @serve.batch on this loop."""
            loop = asyncio.get_running_loop()

            def submit(job: Job) -> Batched:
                outcome = asyncio.run_coroutine_threadsafe(
                    self.answer_batch((job, time.perf_counter())), loop).result()
                if isinstance(outcome, Exception):
                    raise outcome
                return outcome
            how = (f"Ray Serve @serve.batch: up to {self.max_batch} requests per batch, waiting "
                   f"at most {self.batch_wait_ms:g} ms after the first")
            self.model = BatchingCloudModel(self.split, self.max_batch, self.batch_wait_ms,
                                            submit=submit, how=how)
            app = cloud_app(self.model, self.token, self.max_body_bytes, self.allowed_hosts)
            await asyncio.to_thread(self.model.warm_up)  # through the batch queue, like requests
            return app

        @serve.batch(max_batch_size=MAX_BATCH, batch_wait_timeout_s=MAX_WAIT_MS / 1e3)
        async def answer_batch(self, requests: list[tuple[Job, float]]) -> list[Batched | Exception]:
            jobs, submitted = (list(column) for column in zip(*requests))
            # the model runs in a thread: the replica's loop keeps receiving requests meanwhile
            return await asyncio.to_thread(run_isolated, partial(run_jobs, self.split), jobs, submitted)

    return CloudReplica


def cloud_application(vlm: str | Path | None = None, mae: str | Path | None = None,
                      token: str | None = None, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
                      replicas: int = 1, autoscale: tuple[int, int] | None = None,
                      max_batch: int = MAX_BATCH, batch_wait_ms: float = MAX_WAIT_MS,
                      threads: int = 1, num_cpus: float = 1.0, num_gpus: float = 0.0,
                      allowed_hosts=()):
    """The Ray Serve application (deploy it with serve.run). `replicas` fixed, or `autoscale`
    (min, max) replicas; per replica `num_cpus`/`num_gpus` (Ray resources) and `threads`
    torch threads; `allowed_hosts`: the names the app answers to besides its addresses and
    localhost (http_limits.TrustedHost)."""
    from ray import serve
    if autoscale is not None:
        low, high = autoscale
        if not 0 <= low <= high or high < 1:
            raise ValueError(f"autoscale needs 0 <= min <= max and max >= 1, got {autoscale}")
        scaling = {"autoscaling_config": {
            "min_replicas": low, "max_replicas": high,
            # a replica is at its best with a full batch in flight
            "target_ongoing_requests": max_batch,
            "upscale_delay_s": 5, "downscale_delay_s": 60}}
    else:
        if replicas < 1:
            raise ValueError(f"replicas must be at least 1, got {replicas}")
        scaling = {"num_replicas": replicas}
    deployment = serve.deployment(_replica_class()).options(
        name=APP_NAME, ray_actor_options={"num_cpus": num_cpus, "num_gpus": num_gpus},
        # Ray Serve's default (5) would cap every batch at 5; room for a full batch queued
        # behind the one computing
        max_ongoing_requests=2 * max_batch, **scaling)
    return deployment.bind(None if vlm is None else str(vlm), None if mae is None else str(mae),
                           token, max_body_bytes, max_batch, batch_wait_ms, threads,
                           tuple(allowed_hosts))


def serve_ray(host: str, port: int, ray_address: str | None = None, **app_kwargs):
    """Start (or join, with `ray_address`) a Ray cluster, serve the application on host:port
    and block until interrupted."""
    import ray
    from ray import serve
    app_kwargs["allowed_hosts"] = bind_names(host, app_kwargs.get("allowed_hosts", ()))
    ray.init(address=ray_address, include_dashboard=False)
    serve.start(http_options={"host": host, "port": port})
    serve.run(cloud_application(**app_kwargs), name=APP_NAME, route_prefix="/", blocking=True)
