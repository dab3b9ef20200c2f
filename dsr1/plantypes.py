"""The deployment plan's types, a leaf module: dsr1.plan makes a Plan from Overrides, the engine
modules (dsr1.engines.*) turn it into each node's NodeCommand. Nothing here imports the rest of dsr1,
so planning, sizing, doctor and the engines import these types without importing each other.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class NodeCommand:
    """What one node runs. `setup` commands run first and return (e.g. `ray start --head`);
    `argv` is the long-running process. `env` is added to the inherited environment."""

    rank: int
    role: str  # "head" | "worker"
    argv: tuple[str, ...]
    env: dict[str, str] = field(default_factory=dict)
    setup: tuple[tuple[str, ...], ...] = ()


@dataclass(frozen=True)
class Overrides:
    """The user's flags; None = not given (then DSR1_* environment, profile, default)."""

    engine: str = "auto"
    engine_python: str | None = None
    precision: str | None = None
    tensor_parallel: int | None = None
    pipeline_parallel: int | None = None
    data_parallel: int | None = None
    max_model_len: int | None = None
    max_concurrent: int | None = None
    memory_utilization: float | None = None
    max_batched_tokens: int | None = None  # prompt tokens per engine step (vLLM, SGLang, llama-server)
    threads: int | None = None  # CPU threads (llama-server -t); None = one per physical core
    served_name: str | None = None
    host: str = "127.0.0.1"  # dsr1's front
    port: int = 8000
    engine_port: int = 0  # 0 = pick a free one
    nodes: int = 1
    node_rank: int = 0
    head: str | None = None  # HOST:PORT of node 0's rendezvous
    device_map: str | None = None  # embedded: "cpu" plans without the GPUs
    expect_model: str | None = None  # multi-node: the fingerprint every node's copy must have
    lora: tuple[tuple[str, str], ...] = ()  # --lora NAME=ADAPTER (a directory or a stored adapter)
    max_queue: int | None = None  # embedded: requests waiting before 429 (default 4x max-concurrent)
    prefix_cache_mb: int | None = None  # embedded: None = a quarter of the KV cache; 0 = off
    fast_path: bool = True  # embedded: the lean Llama/Qwen2 forward when the model takes it
    engine_why: str | None = None  # why --engine holds this value when not typed (a tuned profile's measurement)
    given: tuple[tuple[str, object], ...] = ()  # (setting, value) the user gave: dsr1.honoured checks them
    reasoning_parser: str = "auto"  # auto | deepseek_r1 | none: reaches every engine that splits reasoning
    tool_call_parser: str = "auto"  # auto | none | an engine's parser name (dsr1.toolcalls)
    dtype: str = "auto"  # auto | bf16 | fp16 | fp32: the compute dtype every engine is given
    compile: str | None = None  # auto | on | off: the embedded engine's compiled decode step


@dataclass(frozen=True)
class Plan:
    """Everything that will run. Frozen: one object every command reads."""

    model: str  # as given
    model_kind: str  # catalog | store | dir | gguf | hub
    model_path: str  # what the engine loads: a local directory or .gguf, else the hub repo id
    needs_pull: bool  # not in the store yet: serve pulls `model` first
    catalog_name: str | None
    architecture: str | None  # llama | qwen2 | deepseek_v3 | ... (None: unknown until pulled)
    served_name: str
    profile: str
    profile_source: str  # requested | selected | virtual (a requested profile's hardware, not this machine's)
    engine: str
    engine_reason: str
    engine_version: str | None
    checked_against: str | None  # "vllm 0.32.0 --help"; None = generated from documented flags, unchecked
    device: str  # cuda | cpu
    gpus_per_node: int
    gpu_name: str | None
    precision: str
    quant: str  # what `dsr1 pull` quantizes to (bitsandbytes; embedded engine only): none | int8 | nf4
    quantization: str | None  # the engine's --quantization value; never fp8 for checkpoints that ship FP8
    dtype: str  # compute dtype
    tensor_parallel: int
    pipeline_parallel: int
    data_parallel: int
    dp_attention: int  # SGLang data-parallel attention groups (1 = off)
    expert_parallel: bool
    max_model_len: int
    max_num_seqs: int
    profile_context: int  # the profile's context_length (the embedded engine caps it by measured memory)
    kv_bytes_per_token: float  # per device
    kv_budget_bytes: int  # per device, after weights and overhead
    kv_capacity_tokens: int  # per device
    sequences_at_full_context: int
    weights_bytes_per_device: int
    memory_utilization: float
    memory_utilization_reason: str
    mem_fraction_static: float | None  # SGLang: weights + KV share (activations and CUDA graphs outside)
    offload: str
    threads: int | None  # CPU threads (llama-server -t); None = the engine's choice
    reasoning_parser: str  # deepseek_r1 | none
    host: str  # dsr1's front
    port: int
    engine_host: str
    engine_port: int
    health_path: str
    nodes_count: int
    node_rank: int
    head: str | None
    env: dict[str, str]  # common to every node (NCCL, vLLM CPU, ...)
    nodes: tuple[NodeCommand, ...] = ()
    # Multi-node: what identifies the model's files here (dsr1.modelref.fingerprint); every node
    # checks its copy against it before launching (dsr1.preflight, `--expect-model`).
    model_fingerprint: str | None = None
    # tokens one engine step may take (vLLM --max-num-batched-tokens, SGLang --chunked-prefill-size,
    # llama-server -b); None = the engine's own default. The embedded engine's is --prefill-chunk.
    max_batched_tokens: int | None = None
    # LoRA adapters served beside the base model: (name, directory); the engine gets its own flags
    lora: tuple[tuple[str, str], ...] = ()
    lora_max_rank: int = 0
    # The checkpoint that gives `precision` (dsr1/data/checkpoints.toml, or the model's own repo);
    # model_path is it (its hub id until it is pulled). checkpoint_gb: its size on disk (0: quantized on load).
    checkpoint: str | None = None
    checkpoint_format: str | None = None
    checkpoint_gb: float = 0.0
    # The embedded engine, decided here like every engine's flags (dsr1.serve.decide); the server runs
    # them and reports what it measured instead where a measurement was needed (its start report).
    dtype_reason: str = ""
    compile: bool = False
    compile_reason: str = ""
    fast_path_reason: str | None = None  # why the lean forward is not used (None: it is)
    weights: str | None = None  # int8 | int4: packed weight-only by the fast path at load (CPU; dsr1.serve.wquant)
    prefix_cache_bytes: int = 0
    max_queue: int = 0
    # llama-server: the GGUF's quantization and where its parts go (dsr1.gguf_place.Placement as a
    # dict: layers per GPU, experts in RAM, KV cache, host RAM needed), with the speed people measured
    # for that placement (tok/s range, single stream) and where the figures come from.
    gguf_quant: str | None = None
    placement: dict | None = None
    expected_tok_s: tuple[float, float] | None = None
    expected_source: str | None = None
    # the engine's tool-call parser (vLLM/SGLang --tool-call-parser; "" none: tools are refused) and why
    tool_parser: str = ""
    tool_parser_reason: str = ""
    notes: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()

    @property
    def max_concurrent(self) -> int:
        return self.max_num_seqs

    @property
    def local(self) -> NodeCommand | None:
        """This node's command (rank `node_rank`)."""
        return next((n for n in self.nodes if n.rank == self.node_rank), None)

    def serve_command(self, *, explicit_engine: bool = False) -> str:
        """The `dsr1 serve` line that reproduces this plan (what doctor prints as Next)."""
        parts = ["dsr1", "serve", self.catalog_name or self.model]
        if self.profile_source != "selected":  # asked for: the same profile again
            parts += ["--profile", self.profile]
        if explicit_engine:
            parts += ["--engine", self.engine]
        return " ".join(parts)
