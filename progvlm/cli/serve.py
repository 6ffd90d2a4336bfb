"""serve-cloud and serve-cloud-ray: the cloud backend, as one process or on Ray Serve."""
from __future__ import annotations

import sys

from ..net.http_limits import add_allow_host
from .options import add_vlm_options, fail


def add_serve_cloud(sub):
    p = sub.add_parser("serve-cloud", help="run the cloud backend (FastAPI): full and progressive answers",
                       description="The GPU-server side: /healthz, /v1/info, POST /v1/full (image + "
                       "question), POST /v1/progressive and WS /v1/progressive/stream (bitstream + "
                       "question). With PROGVLM_CLOUD_TOKEN set, /v1/* needs 'Authorization: "
                       "Bearer <token>'. The model runs one request at a time (a lock), or with "
                       "--batching concurrent requests as batches. The "
                       "WebSocket carries many requests on one kept-open socket (the edge agent's "
                       "session); browser pages may open it only from an --allow-origin.")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8600)
    add_vlm_options(p)
    p.add_argument("--max-body-bytes", type=int, default=8 << 20, help="larger bodies get 413")
    p.add_argument("--allow-open", action="store_true",
                   help="serve beyond loopback without PROGVLM_CLOUD_TOKEN (anyone who reaches the port can use it)")
    p.add_argument("--threads", type=int, default=1,
                   help="compute threads (default 1: the demo shares this host with the edge agent)")
    p.add_argument("--batching", action="store_true",
                   help="run concurrent requests as batches (MAE decode, prefill, decoding "
                        "together; a lone request waits for nothing); default: one at a time")
    p.add_argument("--allow-origin", action="append", default=[], metavar="ORIGIN",
                   help="a browser origin (scheme://host[:port]) whose pages may open the "
                        "WebSocket; repeatable (default: none; clients that send no Origin, "
                        "like the edge agent, are always served)")
    add_allow_host(p)
    p.set_defaults(run=cmd_serve_cloud)


def add_serve_cloud_ray(sub):
    from ..serve.batching import MAX_BATCH, MAX_WAIT_MS
    p = sub.add_parser("serve-cloud-ray", help="the cloud backend on Ray Serve: replicas, "
                       "request batching, autoscaling (pip install 'ray[serve]')",
                       description="The serve-cloud HTTP contract (the same FastAPI app, WebSocket "
                       "included) served by Ray Serve replicas, each batching concurrent requests "
                       "with @serve.batch. PROGVLM_CLOUD_TOKEN as for serve-cloud.")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8600)
    add_vlm_options(p)
    p.add_argument("--replicas", type=int, default=1, help="fixed number of replicas")
    add_allow_host(p)
    p.add_argument("--autoscale", type=int, nargs=2, metavar=("MIN", "MAX"), default=None,
                   help="scale between MIN and MAX replicas instead (aiming at one full batch "
                        "in flight per replica)")
    p.add_argument("--max-batch", type=int, default=MAX_BATCH, help="requests per batch at most")
    p.add_argument("--batch-wait-ms", type=float, default=MAX_WAIT_MS,
                   help="how long a batch waits to fill after its first request")
    p.add_argument("--num-cpus", type=float, default=1.0, help="Ray CPUs per replica")
    p.add_argument("--num-gpus", type=float, default=0.0,
                   help="Ray GPUs per replica (0.5: two replicas share a GPU)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per replica")
    p.add_argument("--max-body-bytes", type=int, default=8 << 20, help="larger bodies get 413")
    p.add_argument("--ray-address", default=None,
                   help="join this Ray cluster (default: start a local one)")
    p.set_defaults(run=cmd_serve_cloud_ray)


def cmd_serve_cloud(a) -> int:
    import os
    from ..serve import cloud
    from ..net.http_limits import OpenBindError, check_bind
    token = os.environ.get(cloud.TOKEN_ENV) or None
    try:
        check_bind(a.host, token, a.allow_open, cloud.TOKEN_ENV)
    except OpenBindError as e:
        return fail(e)
    if token is None:
        print(cloud.open_access_warning(a.host), file=sys.stderr, flush=True)
    model_class = None
    if a.batching:
        from ..serve.batching import BatchingCloudModel
        model_class = BatchingCloudModel
    cloud.serve(a.host, a.port, token, a.vlm, a.mae, a.max_body_bytes, a.threads,
                allowed_origins=a.allow_origin, model_class=model_class, allowed_hosts=a.allow_host)
    return 0


def cmd_serve_cloud_ray(a) -> int:
    import os
    from ..serve.cloud import TOKEN_ENV
    try:
        from ..serve.ray_serve import serve_ray
        import ray.serve  # noqa: F401
    except ImportError:
        return fail("serve-cloud-ray needs Ray Serve: pip install 'ray[serve]' (see "
                    "requirements.txt for the tested version)")
    serve_ray(a.host, a.port, a.ray_address, vlm=a.vlm, mae=a.mae,
              token=os.environ.get(TOKEN_ENV) or None, max_body_bytes=a.max_body_bytes,
              replicas=a.replicas, autoscale=tuple(a.autoscale) if a.autoscale else None,
              max_batch=a.max_batch, batch_wait_ms=a.batch_wait_ms, threads=a.threads,
              num_cpus=a.num_cpus, num_gpus=a.num_gpus, allowed_hosts=a.allow_host)
    return 0
