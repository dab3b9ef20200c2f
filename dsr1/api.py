"""dsr1's Python face: plan a deployment, then serve it. The same plan `dsr1 serve` makes.

    from dsr1 import Deployer

    d = Deployer("r1-distill-qwen-7b", precision="bf16", device_map="auto")
    print(d.plan().engine, d.plan().max_model_len)
    d.serve(port=8000, max_concurrent=16, stream_interval=1)  # until SIGTERM / Ctrl-C

Importing `dsr1` stays light: `dsr1.Deployer` imports this module on first use, and this
module imports torch only when `serve` starts the embedded engine.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

from dsr1.plan import Overrides, Plan, make_plan


class Deployer:
    """A model and how to deploy it; `plan()` says what would run, `serve()` runs it.

    Args:
        model: catalog name (`dsr1 models`), stored name (`dsr1 list`), model directory,
            .gguf file, or hub repo id.
        profile: profile name or .toml path (default: the one `dsr1 doctor` picks).
        engine: auto, embedded, vllm, sglang or llamacpp (docs/engines.md).
        precision: bf16, fp16, fp32, fp8, int8, nf4, int4 ... (default: the best that fits).
        device_map: embedded engine placement: auto, cpu or cuda (default: auto with a GPU).
        engine_python: interpreter of an environment with vLLM or SGLang, used as is.
        max_model_len, tensor_parallel, pipeline_parallel, data_parallel, memory_utilization:
            as the `dsr1 serve` flags of the same names.
    """

    def __init__(self, model: str | Path, *, profile: str | None = None, engine: str = "auto",
                 precision: str | None = None, device_map: str | None = None, engine_python: str | None = None,
                 max_model_len: int | None = None, tensor_parallel: int | None = None,
                 pipeline_parallel: int | None = None, data_parallel: int | None = None,
                 memory_utilization: float | None = None):
        self.model = str(model)
        self.profile = profile
        self.overrides = Overrides(engine=engine, engine_python=engine_python, precision=precision,
                                   tensor_parallel=tensor_parallel, pipeline_parallel=pipeline_parallel,
                                   data_parallel=data_parallel, max_model_len=max_model_len,
                                   memory_utilization=memory_utilization, device_map=device_map)

    def plan(self, *, host: str = "127.0.0.1", port: int = 8000, max_concurrent: int | None = None,
             served_name: str | None = None) -> Plan:
        """The deployment plan: engine, precision, parallel sizes, context, memory, each node's
        command. Runs nothing (`dsr1 serve MODEL --dry-run` prints the same)."""
        o = replace(self.overrides, host=host, port=port, max_concurrent=max_concurrent, served_name=served_name)
        return make_plan(self.model, self.profile, o)

    def serve(self, *, host: str = "127.0.0.1", port: int = 8000, max_concurrent: int | None = None,
              stream_interval: int = 1, api_key: str | None = None, served_name: str | None = None,
              on_ready: Callable[[str], None] | None = None, **options: Any) -> None:
        """Serve the OpenAI API on host:port until SIGTERM/SIGINT, then drain and return.

        `options` are further `dsr1.serve.server.ServeOptions` fields (max_queue, grace,
        reasoning_field, system_prompt, audit_log, ...). `on_ready(url)` is called once the
        server answers. A model not in the store is pulled first."""
        from dsr1 import settings
        from dsr1.output import Output
        from dsr1.serve import server

        p = self.plan(host=host, port=port, max_concurrent=max_concurrent, served_name=served_name)
        o = self.overrides
        dtype = o.precision if o.precision in ("bf16", "fp16", "fp32") else "auto"
        opts = server.ServeOptions(model=self.model, profile=self.profile, host=host, port=port,
                                   api_key=settings.api_key(api_key), max_concurrent=max_concurrent,
                                   max_model_len=o.max_model_len, dtype=dtype, device_map=o.device_map,
                                   stream_interval=stream_interval, served_name=served_name, engine=o.engine,
                                   engine_python=o.engine_python, **options)
        if p.needs_pull:
            from dsr1.pull import pull

            pull(self.model, profile=self.profile, quant=p.quant)
            p = self.plan(host=host, port=port, max_concurrent=max_concurrent, served_name=served_name)
        ready = on_ready or (lambda url: print(f"dsr1 serve: ready on {url}", flush=True))
        if p.engine != "embedded":
            from dsr1.serve.external import serve_external

            serve_external(p, opts, Output(quiet=True))
            return
        sp, sched, cfg, metrics = server.plan(opts, deployment=p)
        server.run(opts, sp, sched, cfg, metrics, ready)
