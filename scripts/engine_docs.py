"""Regenerate the command blocks of docs/engines.md and docs/multi-node.md from dsr1.plan.

    python scripts/engine_docs.py          # rewrite the blocks in place
    python scripts/engine_docs.py --check  # exit 1 when a block is stale (tests/test_plan.py runs this check)

Each block sits between `<!-- BEGIN generated:NAME -->` and `<!-- END generated:NAME -->`; the
prose around it (and any section another page adds after it) is left alone. Hardware comes
from the recorded snapshots in tests/snapshots (through the same fake NVML the doctor tests
use); flags are checked against the recorded vLLM 0.32.0 --help and SGLang 0.5.23 flag list
in tests/data, so the commands shown are the ones dsr1 generates, not hand-written.
"""

from __future__ import annotations

import atexit
import json
import os
import re
import shlex
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
# An empty DSR1_HOME: the reader's stored models and own profiles must not change the docs.
os.environ["DSR1_HOME"] = _HOME = tempfile.mkdtemp(prefix="dsr1-docs-")
atexit.register(shutil.rmtree, _HOME, True)

from dsr1 import plan, profiles  # noqa: E402
from dsr1.engines import envs  # noqa: E402
from dsr1.engines.envs import InstalledEngine  # noqa: E402
from dsr1.netenv import Interface  # noqa: E402
from tests.fake_nvml import load_snapshot  # noqa: E402
from tests.hardware import probes_for  # noqa: E402

DATA = REPO / "tests" / "data"
HELP = {"vllm": (DATA / "vllm-0.32.0-help.txt").read_text(),
        "sglang": "\n".join(json.loads((DATA / "sglang-0.5.23-flags.json").read_text())["flags"]),
        "llamacpp": (DATA / "llama-server-b11434-help.txt").read_text()}
ENV = "$DSR1_HOME/engines/{}/venv/bin/python"
INSTALLED = {"vllm": InstalledEngine("vllm", "0.32.0", ENV.format("vllm"), None, "", "dsr1"),
             "sglang": InstalledEngine("sglang", "0.5.23", ENV.format("sglang"), None, "", "dsr1")}
HEAD = "10.0.0.1:29500"
ITFS = [Interface("ib0", (("10.0.0.1", "255.255.255.0"),))]
ENGINE_PORT = 8100
# profile -> the recorded machine it is planned on (small-gpu has none: its own hardware, "virtual")
MACHINES = {"cpu": "driver-missing", "small-gpu": "driver-missing", "single-gpu": "rtx4090", "base": "a100x2-sxm",
            "pro": "h100x4-sxm", "enterprise": "h100x8-ib", "workstation": "driver-missing",
            "cpu-large": "driver-missing"}


def _h200() -> dict:
    snap = load_snapshot("h100x8-ib")
    snap["description"] = "8x H200 141 GB (an H100 node's snapshot with H200 memory; constructed, not recorded)"
    for g in snap["nvml"]["gpus"]:
        g["name"], g["memory_total"], g["memory_free"] = "NVIDIA H200", 143771 * 2**20, 143771 * 2**20 - 2**29
    return snap


def _plan(machine: str, model: str, *, profile: str | None = None, snapshot: dict | None = None,
          installed: dict | None = None, **kw) -> plan.Plan:
    with tempfile.TemporaryDirectory() as tmp:
        gpus, host, _ = probes_for(machine, Path(tmp), snapshot)
    return plan.make_plan(model, profile, plan.Overrides(engine_port=ENGINE_PORT, **kw), gpus=gpus, host=host,
                          installed=INSTALLED if installed is None else installed, interfaces=ITFS)


def _commands(p: plan.Plan) -> list[str]:
    out = ["```sh"]
    for n in p.nodes:
        if len(p.nodes) > 1:
            out.append(f"# node {n.rank} ({n.role})")
        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(n.env.items()))
        for cmd in n.setup:
            out.append(shlex.join(cmd))
        argv = ("python", *n.argv[1:]) if n.argv[0] == sys.executable else n.argv
        line = shlex.join(argv).replace(shlex.quote(ENV.format(p.engine)), ENV.format(p.engine))
        out.append((env + " \\\n  " if env else "") + _wrap(line))
    out.append("```")
    return out


def _wrap(line: str) -> str:
    """One flag per continuation line past the launcher, as the engines' docs write them."""
    parts = re.split(r" (?=--?[a-zA-Z])", line)
    return " \\\n    ".join(parts)


def _row(p: plan.Plan) -> str:
    par = f"TP {p.tensor_parallel} x PP {p.pipeline_parallel} x DP {p.data_parallel}"
    if p.dp_attention > 1:
        par += f", DP-attention {p.dp_attention}"
    return (f"| {p.profile} | {p.model} | {p.engine} | {p.precision} | {par} | {p.max_model_len:,} | {p.max_num_seqs} "
            f"| {p.sequences_at_full_context} |")


def profiles_block() -> list[str]:
    lines = ["| profile | model | engine | precision | parallel | context | max seqs | seqs at full context |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    plans = []
    for prof in sorted(profiles.load_all().values(), key=lambda p: p.rank):
        machine = MACHINES[prof.name]
        prof_arg = prof.name if machine == "driver-missing" and prof.name != "cpu" else None
        if prof.name == "cpu":  # without and with vLLM's CPU build installed
            plans.append(_plan(machine, prof.settings.default_model, installed={}))
        plans.append(_plan(machine, prof.settings.default_model, profile=prof_arg))
    lines += [_row(p) for p in plans]
    for p in plans:
        how = "" if p.engine_reason.startswith("--engine") else " " + p.engine_reason.removeprefix("auto: ")
        cmd = f"dsr1 serve {p.model}" + (f" --engine {p.engine}" if p.engine_reason.startswith("--engine") else "")
        lines += ["", f"**{p.profile}**, `{cmd}` ({p.engine} {p.engine_version or ''}".rstrip() + f"):{how}", ""]
        lines += _commands(p)
    return lines


def multinode_block() -> list[str]:
    out = []
    cases = [("Two 8x H100 nodes, SGLang", "h100x8-ib", None, dict(nodes=2, head=HEAD)),
             ("Two 8x H100 nodes, vLLM", "h100x8-ib", None, dict(nodes=2, head=HEAD, engine="vllm")),
             ("One 8x H200 node, SGLang", "h100x8-ib", _h200(), {}),
             ("One 8x H200 node, vLLM", "h100x8-ib", _h200(), dict(engine="vllm"))]
    for title, machine, snap, kw in cases:
        p = _plan(machine, "r1", snapshot=snap, **kw)
        flags = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in kw.items())
        out += [f"### {title}", "", f"`dsr1 serve r1 {flags}`".replace("  ", " ").replace(" `", "`"), "",
                f"{p.precision} weights, TP {p.tensor_parallel} x PP {p.pipeline_parallel}"
                + (f", DP-attention {p.dp_attention}" if p.dp_attention > 1 else "")
                + f"; context {p.max_model_len:,} tokens, {p.kv_capacity_tokens:,} KV tokens per GPU; "
                  f"{p.max_num_seqs} sequences ({p.sequences_at_full_context} at full context).", ""]
        out += _commands(p) + [""]
    return out[:-1]


def matrix_block() -> list[str]:
    """The seed's three GPU tiers x every R1 model x vLLM and SGLang: what `dsr1 serve MODEL --engine E`
    plans on the tier's recorded machine (tests/test_plan_matrix.py holds the same rows as expectations)."""
    from dsr1 import catalog
    from dsr1.errors import HardwareError

    lines = ["| tier | model | engine | precision | checkpoint | parallel | context | max seqs | at full context |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for tier in ("base", "pro", "enterprise"):
        for m in catalog.models():
            if m.name == "smollm2-135m":
                continue
            for engine in ("vllm", "sglang"):
                try:
                    p = _plan(MACHINES[tier], m.name, engine=engine)
                except HardwareError as exc:
                    lines.append(f"| {tier} | {m.name} | {engine} | does not fit | {exc.hint} | | | | |")
                    continue
                par = f"TP {p.tensor_parallel} x PP {p.pipeline_parallel} x DP {p.data_parallel}"
                if p.dp_attention > 1:
                    par += f", DP-attention {p.dp_attention}"
                how = p.checkpoint + (f" (`--quantization {p.quantization}`)" if p.quantization else "")
                lines.append(f"| {tier} | {m.name} | {engine} | {p.precision} | {how} | {par} | {p.max_model_len:,} "
                             f"| {p.max_num_seqs} | {p.sequences_at_full_context} |")
    return lines


def r1_gguf_block() -> list[str]:
    """R1 671B as a dynamic-quant GGUF on each tier (dsr1.gguf_place), llama-server b11434's flags."""
    from dsr1 import gguf_place

    llama = {"llamacpp": InstalledEngine("llamacpp", "b11434", None, "llama-server", "", "dsr1")}
    tiers = [("base: 2x A100 80GB, 128 GB RAM", "a100x2-sxm", None, {}),
             ("pro: 4x H100 80GB", "h100x4-sxm", None, {}),
             ("enterprise: 8x H100 80GB, asked for llama.cpp (auto runs SGLang with the 4-bit checkpoint)",
              "h100x8-ib", None, {"engine": "llamacpp"}),
             ("workstation: one 24 GB GPU, 384 GB RAM", "driver-missing", "workstation", {}),
             ("cpu-large: no GPU, 384 GB RAM", "driver-missing", "cpu-large", {})]
    out = []
    for title, machine, profile, kw in tiers:
        p = _plan(machine, "r1", profile=profile, installed=llama, **kw)
        lo, hi = p.expected_tok_s
        flags = f" --profile {profile}" if profile else ""
        flags += "".join(f" --{k} {v}" for k, v in kw.items())
        out += [f"### {title}", "", f"`dsr1 serve r1{flags}`: **{p.checkpoint}** ({p.checkpoint_gb:g} GB), "
                f"context {p.max_model_len:,} tokens, {p.max_num_seqs} slot.", "",
                f"- placement: {gguf_place.describe(p.placement)}",
                f"- expected: {lo:g}-{hi:g} output tok/s single-stream ({p.expected_source})"]
        out += [f"- {n}" for n in p.notes if "largest" in n or "next larger" in n]
        out += [""] + _commands(p) + [""]
    return out


def speed_block() -> list[str]:
    """dsr1/data/engine_speed.toml, what `--engine auto` picks from on a CPU."""
    from dsr1 import engine_speed

    lines = ["| CPU class | CPU | model | dtype | engine | c=1 tok/s | c=16 tok/s | source |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in engine_speed.rows():
        lines.append(f"| {r.cpu_class} | {r.cpu} | {r.model} | {r.dtype} | {r.engine} | {r.tok_s_c1:g} | "
                     f"{r.tok_s_c16:g} | {r.source} |")
    return lines


BLOCKS = {"docs/engines.md": {"profiles": profiles_block, "matrix": matrix_block, "speed": speed_block},
          "docs/multi-node.md": {"r1": multinode_block}, "docs/r1-671b.md": {"tiers": r1_gguf_block}}


def refresh(text: str, name: str, lines: list[str]) -> str:
    begin, end = f"<!-- BEGIN generated:{name} -->", f"<!-- END generated:{name} -->"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    if not pattern.search(text):
        raise SystemExit(f"no {begin} ... {end} block")
    body = "\n".join([begin, "<!-- python scripts/engine_docs.py regenerates this block -->", *lines, end])
    return pattern.sub(lambda m: body, text)


def main(check: bool) -> int:
    stale = []
    for rel, blocks in BLOCKS.items():
        path = REPO / rel
        text = path.read_text()
        new = text
        for name, make in blocks.items():
            new = refresh(new, name, make())
        if new != text:
            stale.append(rel)
            if not check:
                path.write_text(new)
    if check and stale:
        print("stale: " + ", ".join(stale) + " (run: python scripts/engine_docs.py)", file=sys.stderr)
        return 1
    return 0


envs.help_text = lambda eng: HELP[eng.name]  # the recorded --help, not an install on this machine

if __name__ == "__main__":
    raise SystemExit(main("--check" in sys.argv))
