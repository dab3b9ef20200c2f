"""dsr1's Python face: plan a deployment, then serve it. The same plan `dsr1 serve` makes.

    from dsr1 import Deployer

    d = Deployer("r1-distill-qwen-7b", precision="bf16", device_map="auto")
    print(d.plan().engine, d.plan().max_model_len)
    d.serve(port=8000, max_concurrent=16, stream_interval=1)  # until SIGTERM / Ctrl-C

Importing `dsr1` stays light: `dsr1.Deployer` imports this module on first use, and this
module imports torch only when `serve` starts the embedded engine.
"""

from __future__ import annotations

import dataclasses
import sys
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
        # what the caller chose: a tuned profile fills only the rest, as with `dsr1 serve`'s flags
        self._given = {k for k, v in dict(engine=None if engine == "auto" else engine, engine_python=engine_python,
                                          precision=precision, device_map=device_map, max_model_len=max_model_len,
                                          tensor_parallel=tensor_parallel, pipeline_parallel=pipeline_parallel,
                                          data_parallel=data_parallel,
                                          memory_utilization=memory_utilization).items() if v is not None}
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
              on_ready: Callable[[str], None] | None = None, use_tuned: bool = True, **options: Any) -> None:
        """Serve the OpenAI API on host:port until SIGTERM/SIGINT, then drain and return: the same
        launch as `dsr1 serve` (dsr1.launch), tuned profile, guards and quantize-on-load included.

        `options` are further serve settings by their `dsr1 serve` names (max_queue, grace,
        reasoning_field, system_prompt, audit_log, guard, compile, ...). `on_ready(url)` is called once
        the server answers. A model not in the store is pulled first."""
        from dsr1 import launch, servesettings, settings
        from dsr1.output import Output

        declared = {launch.RENAMES.get(s.name, s.name) for s in servesettings.SETTINGS}
        values = {**{k: v for k, v in dataclasses.asdict(self.overrides).items() if v is not None and k in declared},
                  **options, "host": host, "port": port, "max_concurrent": max_concurrent,
                  "stream_interval": stream_interval, "served_name": served_name, "api_key": settings.api_key(api_key)}
        given = self._given | set(options) | {k for k, v in (("max_concurrent", max_concurrent),
                                                              ("served_name", served_name)) if v is not None}
        values = {k: v for k, v in values.items() if v is not None or k in ("max_concurrent", "served_name")}
        opts, overrides, note = launch.settings(self.model, self.profile, values, given=given, use_tuned=use_tuned)
        out = Output(quiet=True)
        if note:
            print(f"dsr1: {note}", file=sys.stderr)
        launch.check_start(opts)
        plan = make_plan(self.model, self.profile, overrides)
        launch.run(plan, opts, overrides, out, on_ready=on_ready)
