"""The environment a plan gives its engine: NCCL over InfiniBand, vLLM's CPU settings, /dev/shm.

From the probe: active InfiniBand/RoCE ports (/sys/class/infiniband, dsr1.probe.host) name
NCCL_IB_HCA; the interface that carries the head's address names NCCL_SOCKET_IFNAME and
GLOO_SOCKET_IFNAME (NCCL's bootstrap and torch's gloo groups otherwise pick the first
interface, often docker0 or a management NIC). On a CPU box vLLM gets its KV cache size
and every core (anchors/engines.md: +25% at concurrency 16 with both cores bound).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

GiB = 1024**3


@dataclass(frozen=True)
class Interface:
    name: str
    addresses: tuple[tuple[str, str], ...]  # (IPv4 address, netmask)
    up: bool = True


def probe_interfaces() -> list[Interface]:
    import psutil

    stats = psutil.net_if_stats()
    out = []
    for name, addrs in psutil.net_if_addrs().items():
        v4 = tuple((a.address, a.netmask or "255.255.255.255") for a in addrs if a.family.name == "AF_INET")
        if v4:
            out.append(Interface(name, v4, bool(stats.get(name) and stats[name].isup)))
    return out


def interface_for(address: str, interfaces: list[Interface]) -> Interface | None:
    """The up, non-loopback interface whose subnet holds `address` (an IPv4 literal)."""
    try:
        ip = ipaddress.IPv4Address(address)
    except ValueError:
        return None
    for itf in interfaces:
        if not itf.up or itf.name == "lo":
            continue
        for addr, mask in itf.addresses:
            try:
                if ip in ipaddress.IPv4Network(f"{addr}/{mask}", strict=False):
                    return itf
            except ValueError:
                continue
    return None


def ib_hca(host) -> str:
    """NCCL_IB_HCA for the active ports: "mlx5_0:1,mlx5_1:1" (device:port)."""
    return ",".join(f"{p.device}:{p.port}" for p in host.infiniband if p.state == "ACTIVE")


def cpu_bind(host, ranks: int = 1) -> str:
    """Every physical core for vLLM's OpenMP threads. Its default reserves one core for the
    front end (reserve_cpu_num=1): on 2 cores that halves the compute threads. With several
    ranks on this node (CPU tensor/pipeline parallel) each gets its own contiguous cores,
    `|`-separated as vLLM reads them; more ranks than cores share them."""
    n = max(1, host.cores_physical)
    if ranks <= 1:
        return "0" if n == 1 else f"0-{n - 1}"
    groups = []
    for r in range(ranks):
        lo, hi = r * n // ranks, max(r * n // ranks, (r + 1) * n // ranks - 1)
        lo, hi = min(lo, n - 1), min(hi, n - 1)
        groups.append(str(lo) if lo == hi else f"{lo}-{hi}")
    return "|".join(groups)


def environment(engine: str, device: str, host, gpus, o, sizes: dict, interfaces, d, *, virtual: bool = False) -> dict[str, str]:
    """`virtual`: planned for a profile's hardware from another machine (a laptop), whose ports
    and interfaces say nothing about the cluster's."""
    env: dict[str, str] = {}
    if engine == "vllm" and device == "cpu":
        env["VLLM_CPU_KVCACHE_SPACE"] = str(sizes["kv_budget_bytes"] // GiB)
        per_node = max(1, sizes["tensor_parallel"] * sizes["pipeline_parallel"] // max(1, o.nodes))
        env["VLLM_CPU_OMP_THREADS_BIND"] = cpu_bind(host, per_node)
        d.notes.append(f"vLLM CPU: KV cache {env['VLLM_CPU_KVCACHE_SPACE']} GiB; OpenMP on cores "
                       f"{env['VLLM_CPU_OMP_THREADS_BIND']} (no core held back for its front end)")
    if device != "cuda" or engine == "embedded":
        return env
    ranks = sizes["tensor_parallel"] * sizes["pipeline_parallel"]
    if not virtual and host.shm_total is not None and host.shm_total < GiB and (ranks > 1 or o.nodes > 1):
        d.warnings.append(f"/dev/shm is {host.shm_total / 2**20:.0f} MiB: NCCL and the engine's workers share memory "
                          "through it; in docker use --shm-size 16g or --ipc=host")
    if o.nodes == 1:
        return env
    if virtual:
        d.notes.append("NCCL_IB_HCA and NCCL_SOCKET_IFNAME come from each node's own ports: run this dry run on the "
                       "head node to see them")
        return env
    hca = ib_hca(host)
    if hca:
        env["NCCL_IB_HCA"] = hca
    else:
        d.warnings.append("no active InfiniBand port here: NCCL falls back to TCP sockets, far too slow for "
                          "tensor parallel across nodes (`dsr1 doctor` lists the ports)")
    head_host = (o.head or "").rpartition(":")[0].strip("[]")
    itfs = interfaces if interfaces is not None else probe_interfaces()
    itf = interface_for(head_host, itfs)
    if itf is not None:
        env["NCCL_SOCKET_IFNAME"] = itf.name
        env["GLOO_SOCKET_IFNAME"] = itf.name
        d.notes.append(f"NCCL/gloo bootstrap over {itf.name} (its subnet holds the head {head_host}); "
                       "every node is assumed to name that interface the same")
    else:
        d.warnings.append(f"no interface here is on the head's subnet ({head_host}): set NCCL_SOCKET_IFNAME and "
                          "GLOO_SOCKET_IFNAME to the interface that reaches it")
    return env
