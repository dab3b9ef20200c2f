"""llama.cpp's `llama-server` for a GGUF served as GGUF.

Continuous batching over `-np` slots; `-c` is the KV size all slots share, so the plan
asks for max_model_len x slots; `--jinja` applies the GGUF's chat template;
`--reasoning-format deepseek` splits R1's thinking into `reasoning_content`.
(`llama-cpp-python`'s own server serves one request at a time and ignores `ignore_eos`:
anchors/engines.md.) Health: `/health` answers 200 once the model is loaded.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Sequence

from dsr1.engines import base
from dsr1.engines.base import NodeCommand

if TYPE_CHECKING:
    from dsr1.engines.envs import InstalledEngine
    from dsr1.plantypes import Plan

REFERENCE = ""  # no llama-server --help recorded yet: a missing flag asks for a newer build
SINCE: dict[str, str] = {}


class LlamaCppEngine:
    name = "llamacpp"
    label = "llama.cpp"
    health_path = "/health"

    def commands(self, plan: "Plan", installed: "InstalledEngine | None") -> tuple[NodeCommand, ...]:
        if plan.nodes_count > 1:
            from dsr1.errors import UsageError

            raise UsageError("llama-server runs on one machine", hint="drop --nodes, or use --engine vllm or sglang")
        flags = base.flags_for(self.name, self.label, installed, since=SINCE, reference=REFERENCE)
        slots = plan.max_num_seqs
        args = ["-m", plan.model_path, "-a", plan.served_name, "-np", str(slots),
                "-c", str(plan.max_model_len * slots), "--jinja"]
        if plan.threads:
            args += ["-t", str(plan.threads)]
        if plan.max_batched_tokens:
            args += ["-b", str(plan.max_batched_tokens)]  # logical batch: prompt tokens per decode call
        if plan.placement is not None:  # dsr1.gguf_place: layers per GPU, experts in RAM, KV type, --fit off
            from dsr1 import gguf_place

            offered = {f for f in ("--n-cpu-moe", "--fit") if flags.has(f)}
            args += gguf_place.flags(gguf_place.Placement(**{k: v for k, v in plan.placement.items()
                                                             if k in gguf_place.Placement.__dataclass_fields__}),
                                     plan.placement["n_layer"], plan.gpus_per_node if plan.device == "cuda" else 0,
                                     has=offered)
        elif plan.device == "cuda":
            args += ["-ngl", "999"]  # every layer on the GPUs
        if plan.reasoning_parser == "deepseek_r1":
            args += ["--reasoning-format", "deepseek"]
        if plan.lora:  # loaded at scale 0; dsr1's front sets this request's adapter to 1 (the "lora" field)
            args += ["--lora", ",".join(p for _, p in plan.lora), "--lora-init-without-apply"]
        args += ["--host", plan.engine_host, "--port", str(plan.engine_port), "--metrics"]
        flags.check(args)
        binary = (installed.binary if installed is not None else None) or "llama-server"
        return (NodeCommand(0, "head", (binary, *args), base.env_dict(plan.env)),)

    def start_fallback(self, code: int, log_tail: Sequence[str], argv: list[str]):
        """Two crashes of llama.cpp b11434 built with GGML_NATIVE on a Xeon with AMX come from its CPU
        "extra buffer types" (repacked and AMX weight layouts), and the same files load with --no-repack:
        - a segfault while repacking Q4_1 weights (exit -11 right after "llama threadpool init");
        - an abort while reserving the compute graph, `GGML_ASSERT(*cur_backend_id != -1)` in
          ggml_backend_sched_split_graph (exit -6): a DeepSeek-V3 (deepseek2) GGUF, with or without
          --n-cpu-moe, where weights put in the AMX buffer type are used by an op the AMX backend
          refuses and the CPU backend cannot read them (llama.cpp's AMX buffer is not a host buffer).
        Such a crash is retried once without repacking: slower prompt processing for quantized weights
        beats no server."""
        text = "\n".join(log_tail)
        # Called only for an exit before the health check passed. Not "load_model" in the tail as the
        # sign of loading: with --lora, llama-server prints a line per adapted tensor (~200 for the demo
        # model) between that line and the crash.
        if "--no-repack" in argv or "model loaded" in text:
            return None
        if code in (-11, 139):
            return [*argv, "--no-repack"], ("llama-server crashed (SIGSEGV) while loading the weights, as llama.cpp "
                                             "does when repacking some quantized types on AVX512/AMX CPUs")
        if code in (-6, 134) and "cur_backend_id != -1" in text:
            return [*argv, "--no-repack"], ("llama-server aborted placing its compute graph (GGML_ASSERT "
                                             "cur_backend_id != -1), as llama.cpp does with some weights in its AMX "
                                             "buffer type")
        return None

    def diagnose(self, log_tail: Sequence[str], plan: "Plan | None" = None) -> str | None:
        text = "\n".join(log_tail)
        if re.search(r"failed to allocate|unable to allocate|out of memory", text, re.I):
            seqs = max(1, plan.max_num_seqs // 2) if plan else 1
            return (f"llama-server could not allocate its KV cache: lower --max-model-len or --max-concurrent "
                    f"(e.g. {seqs} slots)")
        if "couldn't bind" in text or "bind" in text and "failed" in text.lower():
            return base.diagnose_common("address already in use", plan, self.label)
        if re.search(r"failed to (load|open) (model|gguf)|invalid magic", text, re.I):
            return "llama-server could not read the GGUF: check the file is whole (`dsr1 pull FILE` verifies a GGUF)"
        return base.diagnose_common(text, plan, self.label)


ENGINE = LlamaCppEngine()
