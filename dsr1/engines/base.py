"""The engine seam: one small protocol, one file per engine, chosen by name.

An engine turns a deployment plan (dsr1.plan.Plan) into the exact command each node
runs, says where its health endpoint is, and reads its own dying words:

    commands(plan, installed) -> tuple[NodeCommand, ...]   argv + env per node
    health_path                                              e.g. "/health"
    diagnose(log_tail, plan) -> str | None                   a message with the fix

Flags come from the installed engine's own `--help` (dsr1.engines.envs.help_text):
`check_flags` refuses a flag the installed version lacks, naming a version that has it.
With nothing installed (planning a cluster from a laptop) commands are generated from
the engine's documented flags and the plan says `checked_against: null`.

Adding an engine: one new file with a class satisfying `Engine`, and one line in `_NAMES`.
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, Sequence

from dsr1.errors import UsageError
from dsr1.plantypes import NodeCommand  # noqa: F401  (re-exported: the engines' return type)

if TYPE_CHECKING:
    from dsr1.engines.envs import InstalledEngine
    from dsr1.plantypes import Plan

# name -> module; `auto` is the plan's choice, not an engine.
_NAMES = {
    "embedded": "dsr1.engines.embedded",
    "vllm": "dsr1.engines.vllm",
    "sglang": "dsr1.engines.sglang",
    "llamacpp": "dsr1.engines.llamacpp",
}
ENGINES = tuple(_NAMES)
CHOICES = ("auto", *ENGINES)


class Engine(Protocol):
    name: str
    label: str  # how people write it: "vLLM", "SGLang", "llama.cpp"
    health_path: str

    def commands(self, plan: "Plan", installed: "InstalledEngine | None") -> tuple[NodeCommand, ...]: ...

    def diagnose(self, log_tail: Sequence[str], plan: "Plan | None" = None) -> str | None: ...


def get(name: str) -> Engine:
    if name not in _NAMES:
        raise UsageError(f"unknown engine '{name}'", hint=f"use --engine {'|'.join(CHOICES)}")
    return importlib.import_module(_NAMES[name]).ENGINE


# --- flags and versions ------------------------------------------------------------

_FLAG_RE = re.compile(r"(?<![\w-])(--?[A-Za-z][\w-]*)")


def flags_in(help_text: str) -> frozenset[str]:
    """Every option an engine's --help text names (`-np`, `--ctx-size`, `--tp-size` ...)."""
    return frozenset(m.group(1).rstrip("-") for m in _FLAG_RE.finditer(help_text))


def version_tuple(version: str | None) -> tuple[int, ...]:
    """'0.32.0' -> (0, 32, 0); '0.5.23.post1' -> (0, 5, 23); llama.cpp's 'b6123' -> (6123,)."""
    m = re.match(r"[bv]?(\d+(?:\.\d+)*)", (version or "").strip())
    return tuple(int(x) for x in m.group(1).split(".")) if m else ()


@dataclass(frozen=True)
class Flags:
    """The flags an engine version offers, and where that list came from.

    `known` is None when nothing is installed: generation then follows the engine's
    documentation (`documented`), unchecked."""

    engine: str
    label: str
    version: str | None
    known: frozenset[str] | None
    source: str | None  # "vllm 0.32.0 --help" ; None = not checked
    since: dict[str, str]  # flag -> first version known to have it
    reference: str  # the version the documented flags come from

    def has(self, flag: str) -> bool:
        """Whether to use `flag`: the installed version has it; with nothing installed, the
        documented (newest recorded) version does."""
        return flag in self.known if self.known is not None else True

    def check(self, argv: Sequence[str]) -> None:
        """Every option in argv must be one the installed version lists."""
        if self.known is None:
            return
        missing = [a for a in argv if a.startswith("-") and _is_flag(a) and a not in self.known]
        if missing:
            flag = missing[0]
            need = self.since.get(flag)
            if need:
                version = f"{self.label} {need} or newer"
            elif self.reference:
                version = f"a {self.label} version that has it ({self.reference} does)"
            else:
                version = f"a newer {self.label}"
            raise UsageError(f"{self.label} {self.version} has no {flag}, which this deployment needs",
                             hint=f"install {version}: dsr1 engine install {self.engine}; or pick another --engine")


def _is_flag(arg: str) -> bool:
    return bool(re.fullmatch(r"--?[A-Za-z][\w-]*", arg))


def flags_for(engine: str, label: str, installed: "InstalledEngine | None", *, since: dict[str, str],
              reference: str) -> Flags:
    if installed is None:
        return Flags(engine, label, None, None, None, since, reference)
    from dsr1.engines import envs

    text = envs.help_text(installed)
    return Flags(engine, label, installed.version, flags_in(text), f"{engine} {installed.version} --help", since,
                 reference)


def env_dict(pairs: dict[str, str]) -> dict[str, str]:
    return {k: str(v) for k, v in sorted(pairs.items()) if v is not None and v != ""}


# --- shared diagnoses ----------------------------------------------------------------

def diagnose_common(text: str, plan: "Plan | None", label: str) -> str | None:
    """Failures every engine can die of, from its last log lines."""
    low = text.lower()
    port = getattr(plan, "engine_port", None)
    if "address already in use" in low or "errno 98" in low:
        return (f"port {port} is taken by another process: run again (dsr1 picks a free engine port), "
                f"or stop what listens there (ss -ltnp | grep {port})" if port else
                "the port is taken by another process: stop it or pick another --port")
    if "error 802" in low or "system not yet initialized" in low or "fabric manager" in low:
        return ("the NVSwitch fabric is not initialized (CUDA error 802): start nvidia-fabricmanager "
                "(systemctl enable --now nvidia-fabricmanager); `dsr1 doctor` checks it")
    if "nccl" in low and ("timeout" in low or "timed out" in low or "watchdog" in low):
        fix = ("NCCL timed out between ranks: check every node started with the same command, that the "
               "nodes reach each other on the head's port, and NCCL_SOCKET_IFNAME / NCCL_IB_HCA "
               "(dsr1 serve --dry-run shows what dsr1 set); NCCL_DEBUG=INFO shows which link failed")
        return fix
    if "nccl" in low and ("unhandled system error" in low or "ibv_" in low):
        return ("NCCL could not use the network: check the InfiniBand ports (`ibstat`; `dsr1 doctor`), "
                "NCCL_IB_HCA, and that /dev/shm is large enough (docker run --shm-size 16g or --ipc=host)")
    return None
