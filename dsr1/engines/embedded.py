"""dsr1's own engine (transformers + dsr1.serve's scheduler), run in process by `dsr1 serve`.

Its launch is dsr1.serve.server.plan/run; `commands` gives the equivalent command line
(what `--emit` writes and `--dry-run` shows).
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Sequence

from dsr1.engines.base import NodeCommand

if TYPE_CHECKING:
    from dsr1.engines.envs import InstalledEngine
    from dsr1.plantypes import Plan


class EmbeddedEngine:
    name = "embedded"
    label = "dsr1 embedded"
    health_path = "/health"

    def commands(self, plan: "Plan", installed: "InstalledEngine | None" = None) -> tuple[NodeCommand, ...]:
        if plan.nodes_count > 1:
            from dsr1.errors import UsageError

            raise UsageError("the embedded engine runs on one machine", hint="use --engine vllm or sglang for --nodes")
        argv = [sys.executable, "-m", "dsr1", "serve", plan.model, "--engine", "embedded", "--profile", plan.profile,
                "--host", plan.host, "--port", str(plan.port), "--max-concurrent", str(plan.max_num_seqs),
                "--served-model-name", plan.served_name]
        return (NodeCommand(0, "head", tuple(argv), dict(plan.env)),)

    def diagnose(self, log_tail: Sequence[str], plan: "Plan | None" = None) -> str | None:
        return None  # in process: failures are already dsr1 errors with their fix


ENGINE = EmbeddedEngine()
