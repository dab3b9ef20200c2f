"""Every `dsr1 serve` setting, declared once: name, type, default, flags, help, the engines that honour it,
and whether a tuned profile may hold it.

What reads this table: `dsr1 serve`'s command-line options are generated from it
(dsr1.commands.serve), `dsr1.Deployer.serve` and `dsr1.launch.settings` accept exactly these names,
a tuned profile's settings are checked against it (dsr1.tuned), `dsr1 bench tune`'s knobs name
settings from it (tests/test_bench_tune.py checks), and a setting the planned engine cannot honour is
refused from its `engines` (dsr1.honoured). Adding a setting touches this table and the engines that
honour it. No torch, no typer at import: doctor and the plan read it too.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

ALL = ("embedded", "vllm", "sglang", "llamacpp")


@dataclass(frozen=True)
class Setting:
    name: str  # the Python name: ServeOptions / Overrides field, tuned-profile key, Deployer keyword
    type: Any  # its annotation (Optional[int], bool, Path, ...)
    default: Any
    flags: tuple[str, ...]  # command-line spellings, the first the canonical one ("--x/--no-x" for booleans)
    help: str
    engines: tuple[str, ...] = ALL  # the engines that honour it (guards and the audit log are the front's:
    # every engine; the system prompt policy is still the embedded engine's own prompt rendering)
    envvar: str | None = None  # an environment variable typer reads it from
    tunable: bool = False  # a tuned profile may hold it
    choices: tuple[str, ...] | None = None  # the values a tuned profile may give it

    @property
    def flag(self) -> str:
        return self.flags[0].split("/")[0]

    @property
    def base_type(self) -> type:
        """int for Optional[int], etc."""
        args = [a for a in getattr(self.type, "__args__", ()) if a is not type(None)]
        return args[0] if args else self.type


SETTINGS: tuple[Setting, ...] = (
    Setting('host', str, '127.0.0.1', ('--host',), 'Address to bind. Anything but loopback needs --api-key.'),
    Setting('port', int, 8000, ('--port',), 'Port (0 picks a free one; the URL is printed).'),
    Setting('max_concurrent', Optional[int], None, ('--max-concurrent', '--max-num-seqs'), 'Requests decoded together (profile default; --max-num-seqs as vLLM names it).', tunable=True),
    Setting('max_queue', Optional[int], None, ('--max-queue',), 'Requests waiting for a slot before 429 (default 4x max-concurrent).'),
    Setting('max_model_len', Optional[int], None, ('--max-model-len',), 'Context per request, prompt + output (profile/model default, capped by memory).'),
    Setting('dtype', str, 'auto', ('--dtype',), 'auto, bf16, fp16 or fp32 (auto: by hardware and batch).', tunable=True, choices=('auto', 'bf16', 'fp16', 'fp32')),
    Setting('device_map', Optional[str], None, ('--device-map',), 'auto, cpu or cuda (default: auto with a GPU, else cpu).', engines=('embedded',)),
    Setting('max_memory', Optional[str], None, ('--max-memory',), 'Per-device weight limits, e.g. 0=20GiB,cpu=60GiB.', engines=('embedded',)),
    Setting('offload_dir', Optional[Path], None, ('--offload-dir',), 'Folder for weights offloaded to disk.', engines=('embedded',)),
    Setting('stream_interval', int, 1, ('--stream-interval',), 'Tokens per streamed chunk.', engines=('embedded',), tunable=True),
    Setting('prefill_chunk', int, 256, ('--prefill-chunk',), 'Prompt tokens processed between decode steps (bounds stalls).', engines=('embedded',), tunable=True),
    Setting('threads', Optional[int], None, ('--threads',), "CPU threads: torch's (embedded), llama-server's -t (default: torch's choice; one per physical core for llama-server).", engines=('embedded', 'llamacpp'), tunable=True),
    Setting('max_batched_tokens', Optional[int], None, ('--max-batched-tokens', '--max-num-batched-tokens'), "Tokens one engine step may take: vLLM --max-num-batched-tokens, SGLang --chunked-prefill-size, llama-server -b (default: the engine's). The embedded engine's is --prefill-chunk.", engines=('vllm', 'sglang', 'llamacpp'), tunable=True),
    Setting('served_model_name', Optional[str], None, ('--served-model-name',), 'Name clients pass as `model`.'),
    Setting('reasoning_parser', str, 'auto', ('--reasoning-parser',), 'deepseek_r1 (text before </think> is reasoning), none (no split); auto: deepseek_r1 if the tokenizer has </think>.'),
    Setting('reasoning_field', str, 'both', ('--reasoning-field',), 'reasoning_content (DeepSeek), reasoning (vLLM 0.11+) or both.'),
    Setting('tool_call_parser', str, 'auto', ('--tool-call-parser',), "The engine's tool-call parser: auto (the model's format: deepseek_v3 for R1, hermes for the Qwen distills, llama3_json for the Llama distills, else the chat template's), none (tools refused), or a vLLM/SGLang parser name. llama-server reads the format off the chat template.", engines=('vllm', 'sglang')),
    Setting('system_prompt', str, 'auto', ('--system-prompt',), "keep, merge (into the first user turn, DeepSeek's R1 advice), drop; auto: merge for R1.", engines=('embedded',)),
    Setting('audit_log', Optional[Path], None, ('--audit-log',), 'Append a JSONL line per request (no keys, no text).'),
    Setting('audit_content', bool, False, ('--audit-content',), 'Also record prompts and outputs in --audit-log.'),
    Setting('audit_max_mb', float, 0, ('--audit-max-mb',), 'Rotate --audit-log when it passes this size (MiB; 0: never; logrotate also works, the file is reopened per line).'),
    Setting('audit_backups', int, 5, ('--audit-backups',), 'Rotated audit logs kept (audit.jsonl.1 ... .N).'),
    Setting('guard', Optional[Path], None, ('--guard',), 'Input/output policy (TOML): blocked patterns and topics, prompt size, PII block/mask/log; docs/guards.md.'),
    Setting('guard_plugin', Optional[str], None, ('--guard-plugin',), "module:function classifier run on inputs (and non-streamed outputs) off the event loop, with the policy's timeout and fail mode."),
    Setting('grace', float, 30.0, ('--grace',), 'Seconds running requests get to finish after SIGTERM/SIGINT.'),
    Setting('fast_path', bool, True, ('--fast-path/--no-fast-path',), 'Embedded engine: the lean Llama/Qwen2 forward (fused projections, no per-module overhead) when the model takes it.', engines=('embedded',)),
    Setting('compile', Optional[str], None, ('--compile',), 'Embedded engine: torch.compile the whole decode step with frozen, packed weights (auto, on, off, or DSR1_COMPILE; auto: on a CPU, on where the compiled step, estimated from four compiled layers and the LM head, timed at least 1.1x faster than eager at start (~30-90 s once per CPU and model shape, cached in DSR1_HOME/cache), then compiled or eager per batch size as measured; off on a GPU). Compiling takes ~1.5-3 min at the first start on 2 cores; on a CPU the compiled step is kept in DSR1_HOME/cache/compiled and later starts of the same model load it in seconds. Keeps a packed copy of the weights.', engines=('embedded',), tunable=True, choices=('auto', 'on', 'off')),
    Setting('prefix_cache_mb', Optional[int], None, ('--prefix-cache-mb',), 'Embedded engine: memory for reusing the KV of shared prompt beginnings (0: off; default a quarter of the KV cache).', engines=('embedded',)),
    Setting('speculative', str, 'off', ('--speculative',), "Embedded engine: off, ngram (prompt-lookup drafts) or draft (a smaller model's drafts, --draft-model); greedy requests only, output unchanged.", engines=('embedded',), tunable=True, choices=('off', 'ngram')),
    Setting('draft_model', Optional[str], None, ('--draft-model',), 'With --speculative draft: a smaller model of the same tokenizer (directory or stored name).', engines=('embedded',)),
    Setting('num_speculative_tokens', int, 4, ('--num-speculative-tokens',), 'Draft tokens checked per step with --speculative.', engines=('embedded',), tunable=True),
    Setting('engine', str, 'auto', ('--engine',), 'auto, embedded, vllm, sglang or llamacpp (auto: see docs/engines.md).', tunable=True, choices=('embedded', 'vllm', 'sglang', 'llamacpp')),
    Setting('engine_python', Optional[str], None, ('--engine-python',), 'Python of an environment with vLLM or SGLang, used as is (or DSR1_ENGINE_PYTHON).', engines=('vllm', 'sglang'), envvar='DSR1_ENGINE_PYTHON'),
    Setting('precision', Optional[str], None, ('--precision',), 'Weights precision (bf16, fp8, int8, nf4, int4, ...; default: the best that fits).', tunable=True),
    Setting('memory_utilization', Optional[float], None, ('--memory-utilization', '--gpu-memory-utilization'), 'Share of each GPU (or of RAM) the engine may use (profile default; --gpu-memory-utilization as vLLM names it).', tunable=True),
    Setting('tensor_parallel', Optional[int], None, ('--tensor-parallel', '--tensor-parallel-size'), 'Tensor-parallel size (default: the smallest that fits).', engines=('vllm', 'sglang')),
    Setting('pipeline_parallel', Optional[int], None, ('--pipeline-parallel', '--pipeline-parallel-size'), 'Pipeline-parallel size (default 1; nodes with vLLM).', engines=('vllm', 'sglang')),
    Setting('data_parallel', Optional[int], None, ('--data-parallel', '--data-parallel-size'), 'Data-parallel replicas (default: GPUs left over).', engines=('vllm', 'sglang')),
    Setting('engine_port', int, 0, ('--engine-port',), 'Private port of an external engine on 127.0.0.1 (0 picks a free one).', engines=('vllm', 'sglang', 'llamacpp')),
    Setting('nodes', int, 1, ('--nodes',), 'Nodes the deployment spans (vLLM or SGLang).', engines=('vllm', 'sglang')),
    Setting('node_rank', int, 0, ('--node-rank',), "This node's rank, 0 being the head.", engines=('vllm', 'sglang')),
    Setting('node_metrics_port', int, 8101, ('--node-metrics-port',), "Multi-node: port of each node's metrics agent (GPUs, latency toward the head) on the NCCL interface; 0: off.", engines=('vllm', 'sglang')),
    Setting('head', Optional[str], None, ('--head',), "HOST:PORT of node 0's rendezvous, reachable from every node.", engines=('vllm', 'sglang')),
    Setting('expect_model', Optional[str], None, ('--expect-model',), "Multi-node: refuse to start unless this node's copy of MODEL has this fingerprint (the plan's model_fingerprint; --emit writes it).", engines=('vllm', 'sglang')),
    Setting('lora', Optional[list[str]], None, ('--lora',), 'NAME=ADAPTER (a peft LoRA directory, a stored adapter, or for llama-server a GGUF LoRA file; peft adapters are converted for it), repeatable: served as model NAME beside the base model (docs/lora.md).'),
)
BY_NAME = {s.name: s for s in SETTINGS}


def get(name: str) -> Setting:
    return BY_NAME[name]


def parameters() -> list[inspect.Parameter]:
    """The settings as keyword parameters with typer options as defaults (what `dsr1 serve` takes)."""
    import typer

    out = []
    for s in SETTINGS:
        option = typer.Option(s.default, *s.flags, help=s.help, envvar=s.envvar)
        out.append(inspect.Parameter(s.name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=s.type))
    return out


__all__ = ["Setting", "SETTINGS", "BY_NAME", "get", "parameters"]
