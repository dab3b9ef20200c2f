"""`dsr1 serve --emit DIR`: one launch script per node, from the plan.

Each script exports the node's environment, runs its setup commands (a Ray head, say)
and execs its command: exactly what `dsr1 serve ... --node-rank R` runs on that node,
for schedulers (slurm, k8s) that want a file. Written crash-safely: a temp file created
executable, fsync, rename, then the directory fsync'd.
"""

from __future__ import annotations

import os
import shlex
from pathlib import Path

from dsr1 import __version__
from dsr1.fsutil import fsync_dir
from dsr1.plan import Plan


def script(plan: Plan, rank: int) -> str:
    node = next(n for n in plan.nodes if n.rank == rank)
    engine = f"{plan.engine} {plan.engine_version}" if plan.engine_version else plan.engine
    lines = [
        "#!/bin/sh",
        f"# dsr1 {__version__}: node {rank} of {plan.nodes_count} ({node.role}) for {plan.model} on {engine}",
        f"# precision {plan.precision}, TP {plan.tensor_parallel} x PP {plan.pipeline_parallel} x DP {plan.data_parallel}, "
        f"context {plan.max_model_len}, {plan.max_num_seqs} sequences",
        f"# flags checked against: {plan.checked_against or 'nothing installed (documented flags)'}",
    ]
    if plan.engine != "embedded" and node.role == "head":
        lines.append(f"# the engine listens on {plan.engine_host}:{plan.engine_port} for dsr1's front "
                     f"(`dsr1 serve {plan.model} --engine {plan.engine}` runs both)")
    lines.append("set -e")
    if plan.nodes_count > 1:
        lines.append("# pre-launch checks (dsr1.preflight): ports, --head, and this node's copy of the model")
        lines.append(shlex.join(check_command(plan, rank)))
    lines += [f"export {k}={shlex.quote(v)}" for k, v in sorted(node.env.items())]
    lines += [shlex.join(cmd) for cmd in node.setup]
    lines.append("exec " + shlex.join(node.argv))
    return "\n".join(lines) + "\n"


def check_command(plan: Plan, rank: int) -> list[str]:
    """`dsr1 serve ... --check-only` for node `rank`: the same plan's checks, seconds before the engine."""
    cmd = ["dsr1", "serve", plan.model, "--profile", plan.profile, "--engine", plan.engine,
           "--precision", plan.precision, "--tensor-parallel", str(plan.tensor_parallel),
           "--pipeline-parallel", str(plan.pipeline_parallel), "--nodes", str(plan.nodes_count),
           "--node-rank", str(rank), "--head", plan.head or "", "--port", str(plan.port),
           "--engine-port", str(plan.engine_port)]
    if plan.model_fingerprint:
        cmd += ["--expect-model", plan.model_fingerprint]
    return cmd + ["--check-only"]


def write_scripts(plan: Plan, directory: Path) -> list[Path]:
    """node-0.sh, node-1.sh, ... in `directory`; returns their paths."""
    directory.mkdir(parents=True, exist_ok=True)
    out = []
    for node in plan.nodes:
        path = directory / f"node-{node.rank}.sh"
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o755)
        try:
            with os.fdopen(fd, "w") as f:
                f.write(script(plan, node.rank))
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o755)  # the umask may have taken bits from os.open's mode
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        out.append(path)
    fsync_dir(directory)
    return out
