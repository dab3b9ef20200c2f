"""The per-node agent of a multi-node deployment: each node's GPUs and its latency toward the head.

Every rank of `dsr1 serve --nodes N` runs one (port --node-metrics-port) beside its engine
process. It serves /metrics for Prometheus (NVML GPU gauges, as the front's; the round trip to
the head) and, on the head, /ping, through which the other ranks announce themselves: the head's
front then lists every node in GET /dsr1/deployment, and `dsr1 monitor init` writes a scrape
target per node without being told the addresses.

The latency is a TCP connect to the head's agent from this node's address on the interface NCCL
uses (NCCL_SOCKET_IFNAME, chosen by dsr1.netenv): the handshake's round trip on the path the
collective bootstrap takes, not on whatever route the default gateway would pick.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from prometheus_client import CollectorRegistry, Gauge, generate_latest

log = logging.getLogger("dsr1.serve")


class NodeAgent:
    def __init__(self, rank: int, *, bind: str, port: int, head: tuple[str, int] | None = None,
                 source: str | None = None, interval: float = 5.0, nvml: Any = None):
        """`head`: (host, agent port) of rank 0's agent; None on the head itself. `source`: the
        local address to connect from (the NCCL interface's); None lets the kernel route."""
        from dsr1.serve.gpustats import GpuCollector

        self.rank, self.head, self.source, self.interval = rank, head, source, interval
        self.registry = CollectorRegistry()
        self.gpus = GpuCollector(nvml)
        if self.gpus.available:
            self.registry.register(self.gpus)
        self.rtt = Gauge("dsr1_node_head_rtt_seconds", "TCP round trip from this node to the head's agent, on the "
                         "NCCL interface", ["node_rank"], registry=self.registry if head else None)
        self.reachable = Gauge("dsr1_node_head_reachable", "1 when the last probe of the head succeeded",
                               ["node_rank"], registry=self.registry if head else None)
        self._nodes: dict[int, dict] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        agent = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                u = urlsplit(self.path)
                if u.path == "/metrics":
                    self._send(200, generate_latest(agent.registry), "text/plain; version=0.0.4")
                elif u.path == "/ping" and agent.head is None:
                    q = parse_qs(u.query)
                    try:
                        rank, port = int(q["rank"][0]), int(q["port"][0])
                    except (KeyError, ValueError):
                        self._send(400, b'{"error": "rank and port are required"}', "application/json")
                        return
                    agent._seen(rank, f"{self.client_address[0]}:{port}")
                    self._send(200, b'{"ok": true}', "application/json")
                elif u.path == "/nodes":
                    self._send(200, json.dumps(agent.nodes()).encode(), "application/json")
                else:
                    self._send(404, b"", "text/plain")

            def _send(self, code: int, body: bytes, ctype: str) -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:  # scrapes every few seconds: not worth a log line
                pass

        self.server = ThreadingHTTPServer((bind, port), Handler)
        self.port = self.server.server_address[1]
        self.address = f"{bind}:{self.port}"
        if head is None:
            self._seen(rank, self.address)

    def _seen(self, rank: int, address: str) -> None:
        with self._lock:
            self._nodes[rank] = {"rank": rank, "address": address, "last_seen": time.time()}

    def nodes(self) -> list[dict]:
        """The agents the head has heard from (rank, HOST:PORT), by rank."""
        with self._lock:
            return [{"rank": n["rank"], "address": n["address"]} for n in sorted(self._nodes.values(),
                                                                                  key=lambda n: n["rank"])]

    def probe(self) -> float | None:
        """One round trip to the head: the TCP handshake's time, then /ping to announce this node."""
        assert self.head is not None
        label = str(self.rank)
        try:
            t0 = time.perf_counter()
            with socket.create_connection(self.head, timeout=2,
                                          source_address=(self.source, 0) if self.source else None) as s:
                rtt = time.perf_counter() - t0
                s.settimeout(2)
                s.sendall(f"GET /ping?rank={self.rank}&port={self.port} HTTP/1.1\r\nHost: {self.head[0]}\r\n"
                          f"Connection: close\r\n\r\n".encode())
                ok = b" 200 " in s.recv(64).split(b"\r\n", 1)[0]
        except OSError as e:
            log.warning("node %d cannot reach the head's agent at %s:%d (%s)", self.rank, *self.head, e)
            self.reachable.labels(label).set(0)
            return None
        self.rtt.labels(label).set(rtt)
        self.reachable.labels(label).set(1 if ok else 0)
        return rtt

    def start(self) -> "NodeAgent":
        threading.Thread(target=self.server.serve_forever, name="dsr1-node-agent", daemon=True).start()
        if self.head is not None:
            threading.Thread(target=self._probe_loop, name="dsr1-node-probe", daemon=True).start()
        return self

    def _probe_loop(self) -> None:
        while not self._stop.is_set():
            self.probe()
            self._stop.wait(self.interval)

    def stop(self) -> None:
        self._stop.set()
        self.server.shutdown()
        self.server.server_close()


def for_plan(plan, port: int) -> NodeAgent | None:
    """The agent for this node of a multi-node `plan` (dsr1.plan.Plan); None on one node or port 0.
    It listens on this node's address on the NCCL interface (the head's own address on rank 0),
    so it is reachable on the cluster network and not beyond it."""
    if plan.nodes_count <= 1 or not port:
        return None
    from dsr1 import netenv

    head_host = (plan.head or "").rpartition(":")[0].strip("[]")
    itf = netenv.interface_for(head_host, netenv.probe_interfaces())
    local = itf.addresses[0][0] if itf is not None else None
    if plan.node_rank == 0:
        try:
            return NodeAgent(0, bind=local or head_host, port=port).start()
        except OSError as e:
            from dsr1.errors import ServerError

            raise ServerError(f"the head's node agent cannot listen on {local or head_host}:{port}: {e.strerror}",
                              hint="pick a free --node-metrics-port (the same on every node), or 0 to run "
                                   "without it") from None
    bind = local or "0.0.0.0"
    try:
        return NodeAgent(plan.node_rank, bind=bind, port=port, head=(head_host, port), source=local).start()
    except OSError as e:
        # Another rank on this host has the port (several ranks of one machine, as in tests): any free
        # port will do for a worker, which tells the head where it listens.
        log.warning("node agent: %s:%d is taken (%s); listening on a free port instead", bind, port, e.strerror)
        return NodeAgent(plan.node_rank, bind=bind, port=0, head=(head_host, port), source=local).start()
