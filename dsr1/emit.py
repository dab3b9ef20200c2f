"""`dsr1 serve --emit DIR`: one launch script per node, from the plan.

Each script installs the engine build the plan needs when none was checked, runs the node's
pre-launch checks and execs `dsr1 serve ... --node-rank R` with every choice of the plan spelt
out: on the head that is the engine behind dsr1's front (key, metrics, guards), on the others the
engine (and its setup, a Ray worker say). For schedulers (slurm, k8s) that want a file. Written crash-safely: a temp file created
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
    if plan.placement:  # a GGUF on llama-server: what goes where, and the host RAM it needs
        from dsr1 import gguf_place

        lines.append(f"# {plan.checkpoint or plan.model_path}: {gguf_place.describe(plan.placement)}")
    lines.append("set -e")
    if plan.engine != "embedded" and plan.engine_version is None:
        # no install of the engine was checked for this plan (none here, or a build for another device):
        # each node installs the one it needs; an engine already installed is left as it is
        from dsr1.plan import install_command

        lines.append(install_command(plan))
    if plan.nodes_count > 1:
        lines.append("# pre-launch checks (dsr1.preflight): ports, --head, and this node's copy of the model")
        lines.append(shlex.join(serve_command(plan, rank) + ["--check-only"]))
    lines += [f"export {k}={shlex.quote(v)}" for k, v in sorted(node.env.items())]
    if plan.engine == "embedded":
        lines.append("exec " + shlex.join(node.argv))
    else:
        # dsr1 serve runs the engine below and, on the head, dsr1's front before it (API key from
        # DSR1_API_KEY, /metrics, admission, guards) on --host/--port: what `dsr1 serve` runs here.
        lines.append(f"# {'engine and front' if node.role == 'head' else 'engine'}; dsr1 serve runs this node's setup "
                     "and then the engine's own command:")
        lines += ["#   " + shlex.join(cmd) for cmd in (*node.setup, node.argv)]
        lines.append("exec " + shlex.join(serve_command(plan, rank)))
    return "\n".join(lines) + "\n"


def serve_command(plan: Plan, rank: int) -> list[str]:
    """`dsr1 serve` with every choice of this plan spelt out, for node `rank`: the same plan on every node."""
    from dsr1.fit import PRECISIONS

    cmd = ["dsr1", "serve", plan.model, "--profile", plan.profile, "--engine", plan.engine]
    if plan.precision in PRECISIONS:  # a GGUF's precision is the file's own
        cmd += ["--precision", plan.precision]
    cmd += ["--tensor-parallel", str(plan.tensor_parallel),
           "--pipeline-parallel", str(plan.pipeline_parallel), "--data-parallel", str(plan.data_parallel),
           "--max-model-len", str(plan.max_model_len), "--max-concurrent", str(plan.max_num_seqs),
           "--memory-utilization", f"{plan.memory_utilization:g}", "--reasoning-parser", plan.reasoning_parser,
           "--nodes", str(plan.nodes_count), "--node-rank", str(rank), "--host", plan.host,
           "--port", str(plan.port), "--engine-port", str(plan.engine_port)]
    if plan.head:
        cmd += ["--head", plan.head]
    if plan.model_fingerprint:
        cmd += ["--expect-model", plan.model_fingerprint]
    return cmd


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
