"""What is running, asked of the server itself: GET /dsr1/deployment (dsr1.serve.app.deployment_body).

`dsr1 monitor init` writes panels and alerts only for series this deployment exports, so a
dashboard never ships a panel that stays empty: GPU panels only where NVML sees GPUs, the
speculative panel only with --speculative, engine panels under the engine's own metric names.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from urllib.parse import urlsplit

from dsr1.errors import AuthError, NetworkError, UsageError

ENGINES = ("embedded", "vllm", "sglang", "llamacpp")


@dataclass
class Deployment:
    url: str  # the dsr1 front, e.g. http://127.0.0.1:8000
    model: str
    engine: str  # embedded | vllm | sglang | llamacpp
    gpus: int = 0
    prefix_cache: bool = False
    speculative: bool = False
    nodes: list[dict] = field(default_factory=list)  # [{"rank": R, "address": "HOST:PORT"}]: node agents

    @property
    def target(self) -> str:
        """HOST:PORT Prometheus scrapes."""
        u = urlsplit(self.url)
        return f"{u.hostname}:{u.port or (443 if u.scheme == 'https' else 80)}"

    @property
    def scheme(self) -> str:
        return urlsplit(self.url).scheme or "http"


def from_body(url: str, body: dict) -> Deployment:
    engine = body.get("engine")
    if engine not in ENGINES:
        raise NetworkError(f"{url} answered /dsr1/deployment with engine {engine!r}",
                           hint="is this a dsr1 server of the same version as this dsr1?")
    m = body.get("metrics") or {}
    return Deployment(url=url.rstrip("/"), model=str(body.get("model", "")), engine=engine,
                      gpus=int(m.get("gpus", 0)), prefix_cache=bool(m.get("prefix_cache")),
                      speculative=bool(m.get("speculative")), nodes=list(body.get("nodes") or []))


def fetch(url: str, api_key: str | None = None, timeout: float = 10.0) -> Deployment:
    """Ask the dsr1 server at `url` what it runs. Errors say what to fix."""
    import httpx

    if not url.startswith(("http://", "https://")):
        raise UsageError(f"--url {url!r} is not an http(s) URL", hint="e.g. --url http://127.0.0.1:8000")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        r = httpx.get(url.rstrip("/") + "/dsr1/deployment", headers=headers, timeout=timeout)
    except httpx.HTTPError as e:
        raise NetworkError(f"no dsr1 server answered at {url} ({type(e).__name__})",
                           hint="start it first (`dsr1 serve MODEL`), pass its address with --url, or write the files from the plan with --model MODEL") from None
    if r.status_code == 401:
        raise AuthError(f"{url} wants an API key", hint="pass the server's key with --api-key-file (Prometheus will "
                                                        "read the same file)")
    if r.status_code == 404:
        raise NetworkError(f"{url} has no /dsr1/deployment: not a dsr1 server, or an older dsr1",
                           hint="point --url at `dsr1 serve` (not at the engine's private port)")
    if r.status_code != 200:
        raise NetworkError(f"{url}/dsr1/deployment answered {r.status_code}", hint="check the server's log")
    return from_body(url, r.json())


def from_plan(plan, url: str | None = None) -> Deployment:
    """What `dsr1 serve` will export for `plan` (dsr1.plan.Plan), without a running server: the
    engine's own metric names, GPU panels when it plans GPUs, the embedded engine's prefix cache
    (on by default). Node agents' addresses are known only once the nodes run: none here."""
    front = url or f"http://{plan.host if plan.host not in ('0.0.0.0', '::') else '127.0.0.1'}:{plan.port}"
    return Deployment(url=front.rstrip("/"), model=plan.served_name, engine=plan.engine,
                      gpus=plan.gpus_per_node if plan.device == "cuda" else 0,
                      prefix_cache=plan.engine == "embedded", speculative=False)
