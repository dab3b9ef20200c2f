"""SGLang: `python -m sglang.launch_server`, R1's recommended engine (DeepSeek, and SGLang's
docs/basic_usage/deepseek_v3.md @ f6af149).

Flags checked against SGLang 0.5.23's argument definitions (tests/data/sglang-0.5.23-flags.json,
read from sglang/srt/arg_groups/fields/*.py and server_args.py). `--tp-size` is the flag the
docs' `--tp` abbreviates (argparse prefix matching). Data-parallel attention: 0.5.23 names it
`--attn-dp-size N` and keeps `--dp-size N --enable-dp-attention` as a deprecated spelling,
which older versions need: the installed version's help decides.
Multi-node: `--nnodes --node-rank --dist-init-addr HOST:PORT` on every node.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Sequence

from dsr1.engines import base
from dsr1.engines.base import NodeCommand

if TYPE_CHECKING:
    from dsr1.engines.envs import InstalledEngine
    from dsr1.plantypes import Plan

REFERENCE = "0.5.23"
SINCE = {"--attn-dp-size": "0.5.23"}


class SglangEngine:
    name = "sglang"
    label = "SGLang"
    health_path = "/health"

    def engine_args(self, plan: "Plan", flags: base.Flags) -> list[str]:
        a = ["--model-path", plan.model_path, "--served-model-name", plan.served_name,
             "--tp-size", str(plan.tensor_parallel)]
        if plan.pipeline_parallel > 1:
            a += ["--pp-size", str(plan.pipeline_parallel)]
        if plan.data_parallel > 1:
            a += ["--dp-size", str(plan.data_parallel)]
        if plan.dp_attention > 1:
            if flags.has("--attn-dp-size"):
                a += ["--attn-dp-size", str(plan.dp_attention)]
            else:
                a += ["--dp-size", str(plan.dp_attention), "--enable-dp-attention"]
        a += ["--context-length", str(plan.max_model_len), "--max-running-requests", str(plan.max_num_seqs)]
        if plan.max_batched_tokens:
            a += ["--chunked-prefill-size", str(plan.max_batched_tokens)]
        if plan.mem_fraction_static is not None:
            a += ["--mem-fraction-static", f"{plan.mem_fraction_static:g}"]
        a += ["--dtype", {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[plan.dtype]]
        if plan.quantization:  # never for R1: "The official DeepSeek V3 is already in FP8 format"
            a += ["--quantization", plan.quantization]
        if plan.tool_parser:  # dsr1.toolcalls
            a += ["--tool-call-parser", plan.tool_parser]
        if plan.reasoning_parser == "deepseek_r1":
            a += ["--reasoning-parser", "deepseek-r1"]
        if plan.lora:
            a += ["--enable-lora", "--lora-paths", *(f"{n}={p}" for n, p in plan.lora),
                  "--max-lora-rank", str(plan.lora_max_rank), "--max-loras-per-batch", str(max(8, len(plan.lora)))]
        if plan.architecture == "deepseek_v3":
            a += ["--trust-remote-code"]  # as every DeepSeek command in SGLang's docs passes it
        return a

    def commands(self, plan: "Plan", installed: "InstalledEngine | None") -> tuple[NodeCommand, ...]:
        flags = base.flags_for(self.name, self.label, installed, since=SINCE, reference=REFERENCE)
        if installed is not None and installed.python:
            launcher = [installed.python, "-m", "sglang.launch_server"]
        else:
            launcher = ["python3", "-m", "sglang.launch_server"]
        args = self.engine_args(plan, flags) + ["--host", plan.engine_host, "--port", str(plan.engine_port)]
        env = base.env_dict(plan.env)
        if plan.nodes_count == 1:
            flags.check(args)
            return (NodeCommand(0, "head", tuple(launcher + args), env),)
        nodes = []
        for rank in range(plan.nodes_count):
            multi = ["--nnodes", str(plan.nodes_count), "--node-rank", str(rank), "--dist-init-addr", plan.head or ""]
            flags.check(args + multi)
            nodes.append(NodeCommand(rank, "head" if rank == 0 else "worker", tuple(launcher + args + multi), env))
        return tuple(nodes)

    def diagnose(self, log_tail: Sequence[str], plan: "Plan | None" = None) -> str | None:
        text = "\n".join(log_tail)
        if re.search(r"Not enough memory|out of memory|OutOfMemoryError", text, re.I):
            if plan is None:
                return "SGLang ran out of memory at start: lower --max-model-len or --max-concurrent"
            ctx = max(1024, plan.max_model_len * 3 // 4 // 256 * 256)
            frac = plan.mem_fraction_static or 0.8
            return (f"SGLang ran out of memory at start (planned {plan.kv_capacity_tokens} KV tokens per GPU, "
                    f"--mem-fraction-static {frac:g}): try --max-model-len {ctx}, --max-concurrent "
                    f"{max(1, plan.max_num_seqs // 2)}, or --memory-utilization {max(0.5, plan.memory_utilization - 0.05):g}")
        return base.diagnose_common(text, plan, self.label)


ENGINE = SglangEngine()
