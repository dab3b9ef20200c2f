"""Checks before a node launches its engine: what can be known before minutes of model loading.

Multi-node launches fail late and far from the cause: a worker that cannot reach the head
waits out NCCL's or Ray's timeout, two nodes with different copies of a model load and then
produce garbage or a shape error, a port held by a stale server fails the head after the
workers have joined. Each check here fails in seconds with the fix:

- ports free on this node (the API port, the engine's private port, and on rank 0 the
  rendezvous port of --head);
- rank 0: --head names an address of this machine (other ranks will connect to it);
- other ranks: --head resolves and accepts TCP connections (waited for, with a progress line,
  because rank 0 may still be starting);
- every rank: the model here has the fingerprint the plan was made with (`--expect-model`,
  which `--emit` writes into each node's script), so all nodes load the same weights.

Each returns plainly or raises a dsr1 error; `run` applies those that fit a plan.
"""

from __future__ import annotations

import socket
import time
from typing import Callable

from dsr1.errors import IntegrityError, NetworkError, ServerError, UsageError

# How long a non-head rank waits for rank 0's rendezvous port: rank 0 may be pulling or still
# starting Ray. Long enough for a scheduler's staggered starts, short of NCCL's 10 minutes.
HEAD_WAIT_S = 300.0


def split_head(head: str) -> tuple[str, int]:
    host, _, port = head.rpartition(":")
    return host.strip("[]"), int(port)


def port_free(host: str, port: int, what: str, flag: str) -> None:
    """Raise if `port` cannot be bound on `host` now (0 means "pick one": nothing to check)."""
    if port == 0:
        return
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        # as the servers bind (uvicorn, vLLM): a port that only a closed connection still names (TIME_WAIT,
        # right after a restart) is free for them, and only a listener holds it
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise ServerError(f"{what} port {port} on {host} is not free ({e.strerror or e})",
                              hint=f"stop what holds it (`ss -ltnp 'sport = :{port}'` shows it) or pass another {flag}")


def head_is_here(host: str) -> None:
    """Rank 0 must own --head's address: the other ranks connect to it."""
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except socket.gaierror as e:
        raise NetworkError(f"--head host {host!r} does not resolve here ({e.strerror})",
                           hint="use this node's address on the cluster network, e.g. its InfiniBand/Ethernet IP")
    for family, _, _, _, addr in infos:
        with socket.socket(family, socket.SOCK_STREAM) as s:
            try:
                s.bind((addr[0], 0))  # binds only to an address this machine has
                return
            except OSError:
                continue
    raise NetworkError(f"--head {host} is not an address of this machine, and rank 0 is the head",
                       hint="run rank 0 on the machine --head names, or pass this machine's address as --head")


def head_reachable(host: str, port: int, *, wait_s: float = HEAD_WAIT_S,
                   progress: Callable[[str], None] | None = None, poll_s: float = 2.0) -> float:
    """Wait until rank 0 accepts TCP connections on --head; seconds waited. A name that does not
    resolve fails at once; a refused or silent port is retried until `wait_s`."""
    try:
        socket.getaddrinfo(host, port, proto=socket.IPPROTO_TCP)
    except socket.gaierror as e:
        raise NetworkError(f"--head host {host!r} does not resolve from this node ({e.strerror})",
                           hint="use node 0's IP address, or add its name to DNS or /etc/hosts here")
    t0 = time.monotonic()
    last_said = t0
    last_err = ""
    while True:
        try:
            with socket.create_connection((host, port), timeout=min(5.0, max(poll_s, 0.5))):
                return time.monotonic() - t0
        except OSError as e:
            last_err = e.strerror or str(e)
        now = time.monotonic()
        if now - t0 >= wait_s:
            raise NetworkError(f"node 0 at {host}:{port} did not accept a connection within {wait_s:.0f} s "
                               f"(last: {last_err})",
                               hint="start rank 0 first; check that the port is open between the nodes "
                                    "(firewall, security group) and that --head is node 0's address on this network")
        if progress and now - last_said >= 10:
            progress(f"waiting for node 0 at {host}:{port} ({now - t0:.0f} s, {last_err})")
            last_said = now
        time.sleep(poll_s)


def same_model(fingerprint: str | None, expected: str | None, model: str) -> None:
    if expected is None:
        return
    if fingerprint is None:
        raise IntegrityError(f"{model} is not on this node, and the other nodes expect model {expected}",
                             hint=f"pull it here first (`dsr1 pull {model}`), or copy the same files")
    if fingerprint != expected:
        raise IntegrityError(f"{model} on this node is not the same as on the node that made the plan "
                             f"(fingerprint {fingerprint}, expected {expected})",
                             hint="copy or pull the same revision on every node (`dsr1 list --json` shows each "
                                  "store's revision and `dsr1 serve MODEL --dry-run --json` its fingerprint)")


def run(plan, *, api_host: str, expect_model: str | None = None, head_wait_s: float = HEAD_WAIT_S,
        progress: Callable[[str], None] | None = None) -> list[str]:
    """The checks that fit `plan` on this node; what was checked, for the log."""
    done = []
    same_model(plan.model_fingerprint, expect_model, plan.model)
    if expect_model:
        done.append(f"model fingerprint {expect_model}")
    local = plan.local
    if local is None:
        raise UsageError(f"the plan has no command for node rank {plan.node_rank}", hint="check --nodes and --node-rank")
    if local.role == "head":
        port_free(api_host, plan.port, "the API", "--port")
        if plan.engine != "embedded":
            port_free(plan.engine_host, plan.engine_port, "the engine's", "--engine-port")
        done.append("ports free")
    if plan.nodes_count > 1 and plan.head:
        host, port = split_head(plan.head)
        if local.role == "head":
            head_is_here(host)
            port_free("0.0.0.0", port, "the rendezvous (--head)", "--head HOST:PORT")
            done.append(f"--head {plan.head} is this machine")
        else:  # rank 0 opens it early in start-up (Ray's GCS, torch's TCPStore), before loading weights
            waited = head_reachable(host, port, wait_s=head_wait_s, progress=progress)
            done.append(f"node 0 reachable at {plan.head} (after {waited:.0f} s)")
    return done
