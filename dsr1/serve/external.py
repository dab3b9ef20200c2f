"""`dsr1 serve --engine vllm|sglang|llamacpp` on this node: the engine as a supervised child
on 127.0.0.1, dsr1's OpenAI front (dsr1.serve.front) on the address the user asked for.

Order matters at both ends. At start the engine must answer its health endpoint before
the front listens, so the ready line means the model answers. At stop (SIGTERM/SIGINT)
the front stops accepting and drains its running requests while the engine still
serves them; only then is the engine stopped, with its own grace. If the engine dies
while serving, the front stops and dsr1 exits 10 with the engine's last lines and a
diagnosis.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from dsr1.errors import ServerError
from dsr1.serve import requestlog


@dataclass
class EngineLaunch:
    """What to run for one engine process on this node, and how to know it is up."""

    engine: str  # vllm | sglang | llamacpp
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    port: int = 0  # where the engine listens on 127.0.0.1 (bound into argv)
    health_path: str = "/health"
    start_timeout: float = 900.0
    diagnose: Callable[[list[str]], str | None] = lambda lines: None
    # (exit code, last log lines) -> (argv to try once more, why) when a known start-up crash has
    # a known way around it (llama.cpp: SIGSEGV while repacking weights -> --no-repack), else None
    fallback: Callable[[int, list[str]], tuple[list[str], str] | None] = lambda code, lines: None


def free_port() -> int:
    """A port free on 127.0.0.1 now, for an engine that needs its port named up front."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_engine(launch: EngineLaunch, front_cfg, backend_cfg, *, host: str, port: int, grace: float,
               on_ready: Callable[[str], None], progress: Callable[[str], None] = lambda m: None,
               nodes: Callable[[], list[dict]] | None = None) -> None:
    """Start the engine, wait until healthy, serve the front until a signal or the engine's death."""
    from dsr1.serve import listen
    from dsr1.serve.front import create_front
    from dsr1.serve.metrics import Metrics
    from dsr1.serve.proxy import ProxyBackend
    from dsr1.supervise import Child

    progress(f"starting {launch.engine}: {' '.join(launch.argv)}")
    child = Child(launch.argv, launch.env, prefix=launch.engine, echo=requestlog.EngineEcho(launch.engine))
    health = f"http://127.0.0.1:{launch.port}{launch.health_path}"
    try:
        try:
            took = child.wait_healthy(health, timeout=launch.start_timeout, progress=progress,
                                      diagnose=launch.diagnose)
        except ServerError:
            # the whole kept tail: a crash's backtrace (gdb's thread list, ~70 lines) follows the line that
            # says which crash it was
            retry = None if child.alive() else launch.fallback(child.proc.returncode,
                                                                 child.last_lines(child.tail.maxlen))
            if retry is None:
                raise
            argv, why = retry
            progress(f"warning: {why}; starting again: {' '.join(argv)}")
            child = Child(argv, launch.env, prefix=launch.engine, echo=requestlog.EngineEcho(launch.engine))
            took = child.wait_healthy(health, timeout=launch.start_timeout, progress=progress,
                                      diagnose=launch.diagnose)
        progress(f"{launch.engine} is up after {took:.0f}s")
        app, front = create_front(ProxyBackend(backend_cfg), front_cfg,
                                  Metrics(front_cfg.model_name, engine_gauges=False, gpus=nodes is None))
        front.nodes = nodes
        died = threading.Event()

        def draining() -> None:
            front.draining = True

        def ready(url: str) -> None:
            front.ready = True
            on_ready(url)

        server = listen.make_server(app, host=host, port=port, grace=grace, on_ready=ready, on_signal=draining)

        def watch() -> None:
            while not server.should_exit:
                if not child.alive():
                    died.set()
                    server.should_exit = True
                    return
                time.sleep(0.5)

        threading.Thread(target=watch, name="dsr1-engine-watch", daemon=True).start()
        listen.run(server, host=host, port=port)
        if died.is_set():
            raise child.failure(f"{launch.engine} exited with code {child.proc.returncode} while serving",
                                launch.diagnose)
    except BaseException:
        child.stop(5)
        raise
    code = child.stop(grace)
    if code not in (0, -15, 143, None):
        progress(f"{launch.engine} stopped with exit code {code}")


def serve_external(plan, opts, out, on_ready: Callable[[str], None] | None = None, *,
                   expect_model: str | None = None) -> None:
    """Run this node's part of `plan` (dsr1.plan.Plan): pre-launch checks (dsr1.preflight), setup
    commands, then the engine; on the head node dsr1's front too. `opts` is the command's
    ServeOptions (key, queue, reasoning field, grace)."""
    import subprocess

    from dsr1 import preflight
    from dsr1.engines import base

    for line in preflight.run(plan, api_host=opts.host, expect_model=expect_model, progress=out.info):
        out.info(f"checked: {line}")
    node = plan.local
    assert node is not None  # preflight.run refuses a rank the plan has no command for
    if plan.engine == "llamacpp" and plan.lora:
        _convert_adapters(plan, opts, out.info)
    engine = base.get(plan.engine)
    env = {**plan.env, **node.env}
    for cmd in node.setup:  # e.g. `ray start --head`: returns once the daemon is up
        out.info(f"running {' '.join(cmd)}")
        done = subprocess.run(list(cmd), env={**os.environ, **env}, capture_output=True, text=True)
        if done.returncode != 0:
            tail = (done.stdout + done.stderr).strip().splitlines()[-15:]
            raise ServerError(f"`{' '.join(cmd)}` failed with exit code {done.returncode}:\n" + "\n".join(tail),
                              hint=engine.diagnose(tail, plan) or "read the lines above")
    launch = EngineLaunch(engine=plan.engine, argv=list(node.argv), env=env, port=plan.engine_port,
                          health_path=plan.health_path, diagnose=lambda lines: engine.diagnose(lines, plan),
                          fallback=lambda code, lines: _fallback(engine, code, lines, list(node.argv)))
    from dsr1.monitoring import nodeagent

    agent = nodeagent.for_plan(plan, opts.node_metrics_port)
    if agent is not None:
        out.info(f"node agent for rank {plan.node_rank} on http://{agent.address}/metrics")
    try:
        _serve_node(plan, node, launch, opts, out, on_ready, agent)
    finally:
        if agent is not None:
            agent.stop()


def _convert_adapters(plan, opts, progress) -> None:
    """The GGUFs of the PEFT adapters the plan gives llama-server (dsr1.lora_gguf), made if missing."""
    from dsr1 import lora, lora_gguf, store

    given = dict(opts.lora)
    stored = store.find(opts.model)
    dirs = [Path(stored.model_dir)] if stored is not None and stored.embedded_ready else []
    for name, path in plan.lora:
        if Path(path).is_file() or name not in given:
            continue
        adapter = lora.read(lora.resolve(given[name]))
        lora_gguf.convert(adapter.path, lora_gguf.base_config_dir(adapter, dirs), Path(path), progress,
                          binary=plan.local.argv[0])


def _serve_node(plan, node, launch, opts, out, on_ready, agent) -> None:
    from dsr1.serve.front import FrontConfig
    from dsr1.serve.proxy import ProxyConfig
    from dsr1.serve.server import load_guards

    if node.role != "head":  # a worker rank: the engine process only; the head node's front serves clients
        run_worker(launch, grace=opts.grace, progress=out.info)
        return
    policy, plugin = load_guards(opts)  # a bad policy fails before the engine's minutes of loading
    running = opts.max_concurrent or plan.max_num_seqs
    cfg = FrontConfig(model_name=plan.served_name, max_model_len=plan.max_model_len, max_concurrent=running,
                      max_queue=opts.max_queue if opts.max_queue is not None else 4 * running,
                      api_key=opts.api_key, max_body_bytes=opts.max_body_bytes, reasoning_field=opts.reasoning_field,
                      reasoning_on=plan.reasoning_parser != "none", adapters=tuple(n for n, _ in plan.lora),
                      guard=policy, guard_plugin=plugin, audit_log=opts.audit_log, audit_content=opts.audit_content,
                      audit_max_bytes=int(opts.audit_max_mb * 2**20), audit_backups=opts.audit_backups)
    backend = ProxyConfig(engine=plan.engine, url=f"http://127.0.0.1:{plan.engine_port}",
                          health_path=plan.health_path, max_connections=running, served_name=plan.served_name,
                          lora_ids={n: i for i, (n, _) in enumerate(plan.lora)} if plan.engine == "llamacpp" else {},
                          tools=bool(getattr(plan, "tool_parser", "")) or plan.engine == "llamacpp")

    def ready(url: str) -> None:
        requestlog.ready(url)

    run_engine(launch, cfg, backend, host=opts.host, port=opts.port, grace=opts.grace, on_ready=on_ready or ready,
               progress=out.info, nodes=agent.nodes if agent is not None else None)


def _fallback(engine, code: int, lines: list[str], argv: list[str]):
    fn = getattr(engine, "start_fallback", None)
    return fn(code, lines, argv) if fn else None


def run_worker(launch: EngineLaunch, *, grace: float, progress: Callable[[str], None]) -> None:
    """A non-head rank: run the engine process until SIGTERM/SIGINT or its exit."""
    import signal

    from dsr1.supervise import Child

    progress(f"starting {launch.engine} worker: {' '.join(launch.argv)}")
    child = Child(launch.argv, launch.env, prefix=launch.engine, echo=requestlog.EngineEcho(launch.engine))
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.is_set() and child.alive():
        stop.wait(0.5)
    if not child.alive() and not stop.is_set():
        raise child.failure(f"{launch.engine} worker exited with code {child.proc.returncode}", launch.diagnose)
    child.stop(grace)
