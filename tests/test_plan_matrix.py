"""Every recorded GPU snapshot and every GPU profile x every R1 catalog model x vLLM and SGLang: an
explicit table of what the plan must be (or that it refuses, with advice that converges), and for
every plan the checks that make it runnable:

- the precision is the checkpoint's own, or the command carries the on-load flag that makes it;
- weights per GPU come from the checkpoint's real size on disk (dsr1/data/checkpoints.toml), and
  weights + KV budget + overhead fit the usable memory of one GPU;
- the R1 settings are there (reasoning parser, SGLang's trust-remote-code for DeepseekV3, DP attention
  where planned), and a CPU build of the engine installed here is never what a GPU plan launches;
- every vLLM command parses with vLLM's own argument parser (the engine installed by
  `dsr1 engine install vllm`, tests/test_engine_envs.py's DSR1_TEST_ENGINES_HOME), and every SGLang
  command with SGLang's own `ServerArgs` parser (a throwaway environment, scripts/sglang_parser.sh,
  which scripts/engines.sh makes in DSR1_TEST_ENGINES_HOME/sglang-parser).

EXPECTED holds the GPU engines on the seed's tiers and the recorded GPU machines; EXPECTED_OTHER the
embedded engine and llama-server (which refuses a catalog model: it serves GGUF files, and the
catalog's R1 GGUFs are [12/14]'s; the demo GGUF's command is checked against the real llama-server's
--help on every machine); EXPECTED_MORE vLLM and SGLang everywhere else (the CPU machine and profiles,
the small GPU profiles, the demo model). A row that stops fitting, or starts to, fails here: no
try/skip inside the matrix.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest

from dsr1 import plan
from dsr1.engines import envs
from dsr1.engines.envs import InstalledEngine
from dsr1.errors import HardwareError
from tests.hardware import probes_for
from tests.test_engine_commands import HEAD, HELP, ITFS

GiB = 1024**3
ENGINES_HOME = os.environ.get("DSR1_TEST_ENGINES_HOME")

# (snapshot or profile, model, engine, precision or None = refused, checkpoint or the advice, TP, DP, context)
EXPECTED = [
    ("a100x2-sxm", "r1", "vllm", None, "nodes 3", 0, 0, 0),
    ("a100x2-sxm", "r1", "sglang", None, "nodes 4", 0, 0, 0),
    ("a100x2-sxm", "r1-0528", "vllm", None, "nodes 3", 0, 0, 0),
    ("a100x2-sxm", "r1-0528", "sglang", None, "nodes 4", 0, 0, 0),
    ("a100x2-sxm", "r1-distill-qwen-1.5b", "vllm", "bf16", "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B", 1, 2, 32768),
    ("a100x2-sxm", "r1-distill-qwen-1.5b", "sglang", "bf16", "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B", 1, 2, 32768),
    ("a100x2-sxm", "r1-distill-qwen-7b", "vllm", "bf16", "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B", 1, 2, 32768),
    ("a100x2-sxm", "r1-distill-qwen-7b", "sglang", "bf16", "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B", 1, 2, 32768),
    ("a100x2-sxm", "r1-distill-qwen-14b", "vllm", "bf16", "deepseek-ai/DeepSeek-R1-Distill-Qwen-14B", 1, 2, 32768),
    ("a100x2-sxm", "r1-distill-qwen-14b", "sglang", "bf16", "deepseek-ai/DeepSeek-R1-Distill-Qwen-14B", 1, 2, 32768),
    ("a100x2-sxm", "r1-distill-qwen-32b", "vllm", "bf16", "deepseek-ai/DeepSeek-R1-Distill-Qwen-32B", 2, 1, 32768),
    ("a100x2-sxm", "r1-distill-qwen-32b", "sglang", "bf16", "deepseek-ai/DeepSeek-R1-Distill-Qwen-32B", 2, 1, 32768),
    ("a100x2-sxm", "r1-distill-llama-8b", "vllm", "bf16", "deepseek-ai/DeepSeek-R1-Distill-Llama-8B", 1, 2, 32768),
    ("a100x2-sxm", "r1-distill-llama-8b", "sglang", "bf16", "deepseek-ai/DeepSeek-R1-Distill-Llama-8B", 1, 2, 32768),
    ("a100x2-sxm", "r1-distill-llama-70b", "vllm", "int4", "casperhansen/deepseek-r1-distill-llama-70b-awq", 1, 2, 32768),
    ("a100x2-sxm", "r1-distill-llama-70b", "sglang", "int4", "casperhansen/deepseek-r1-distill-llama-70b-awq", 1, 2, 32768),
    ("h100x4-sxm", "r1", "vllm", None, "nodes 2", 0, 0, 0),
    ("h100x4-sxm", "r1", "sglang", None, "nodes 2", 0, 0, 0),
    ("h100x4-sxm", "r1-0528", "vllm", None, "nodes 2", 0, 0, 0),
    ("h100x4-sxm", "r1-0528", "sglang", None, "nodes 2", 0, 0, 0),
    ("h100x4-sxm", "r1-distill-qwen-1.5b", "vllm", "bf16", "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B", 1, 4, 65536),
    ("h100x4-sxm", "r1-distill-qwen-1.5b", "sglang", "bf16", "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B", 1, 4, 65536),
    ("h100x4-sxm", "r1-distill-qwen-7b", "vllm", "bf16", "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B", 1, 4, 65536),
    ("h100x4-sxm", "r1-distill-qwen-7b", "sglang", "bf16", "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B", 1, 4, 65536),
    ("h100x4-sxm", "r1-distill-qwen-14b", "vllm", "bf16", "deepseek-ai/DeepSeek-R1-Distill-Qwen-14B", 1, 4, 65536),
    ("h100x4-sxm", "r1-distill-qwen-14b", "sglang", "bf16", "deepseek-ai/DeepSeek-R1-Distill-Qwen-14B", 1, 4, 65536),
    ("h100x4-sxm", "r1-distill-qwen-32b", "vllm", "bf16", "deepseek-ai/DeepSeek-R1-Distill-Qwen-32B", 2, 2, 65536),
    ("h100x4-sxm", "r1-distill-qwen-32b", "sglang", "bf16", "deepseek-ai/DeepSeek-R1-Distill-Qwen-32B", 2, 2, 65536),
    ("h100x4-sxm", "r1-distill-llama-8b", "vllm", "bf16", "deepseek-ai/DeepSeek-R1-Distill-Llama-8B", 1, 4, 65536),
    ("h100x4-sxm", "r1-distill-llama-8b", "sglang", "bf16", "deepseek-ai/DeepSeek-R1-Distill-Llama-8B", 1, 4, 65536),
    ("h100x4-sxm", "r1-distill-llama-70b", "vllm", "bf16", "deepseek-ai/DeepSeek-R1-Distill-Llama-70B", 4, 1, 65536),
    ("h100x4-sxm", "r1-distill-llama-70b", "sglang", "bf16", "deepseek-ai/DeepSeek-R1-Distill-Llama-70B", 4, 1, 65536),
    ("h100x8-ib", "r1", "vllm", "int4", "cognitivecomputations/DeepSeek-R1-AWQ", 8, 1, 32768),
    ("h100x8-ib", "r1", "sglang", "int4", "cognitivecomputations/DeepSeek-R1-AWQ", 8, 1, 32768),
    ("h100x8-ib", "r1-0528", "vllm", "int4", "RedHatAI/DeepSeek-R1-0528-quantized.w4a16", 8, 1, 32768),
    ("h100x8-ib", "r1-0528", "sglang", "int4", "RedHatAI/DeepSeek-R1-0528-quantized.w4a16", 8, 1, 32768),
    ("h100x8-ib", "r1-distill-qwen-1.5b", "vllm", "bf16", "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B", 1, 8, 32768),
    ("h100x8-ib", "r1-distill-qwen-1.5b", "sglang", "bf16", "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B", 1, 8, 32768),
    ("h100x8-ib", "r1-distill-qwen-7b", "vllm", "bf16", "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B", 1, 8, 32768),
    ("h100x8-ib", "r1-distill-qwen-7b", "sglang", "bf16", "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B", 1, 8, 32768),
    ("h100x8-ib", "r1-distill-qwen-14b", "vllm", "bf16", "deepseek-ai/DeepSeek-R1-Distill-Qwen-14B", 1, 8, 32768),
    ("h100x8-ib", "r1-distill-qwen-14b", "sglang", "bf16", "deepseek-ai/DeepSeek-R1-Distill-Qwen-14B", 1, 8, 32768),
    ("h100x8-ib", "r1-distill-qwen-32b", "vllm", "bf16", "deepseek-ai/DeepSeek-R1-Distill-Qwen-32B", 2, 4, 32768),
    ("h100x8-ib", "r1-distill-qwen-32b", "sglang", "bf16", "deepseek-ai/DeepSeek-R1-Distill-Qwen-32B", 2, 4, 32768),
    ("h100x8-ib", "r1-distill-llama-8b", "vllm", "bf16", "deepseek-ai/DeepSeek-R1-Distill-Llama-8B", 1, 8, 32768),
    ("h100x8-ib", "r1-distill-llama-8b", "sglang", "bf16", "deepseek-ai/DeepSeek-R1-Distill-Llama-8B", 1, 8, 32768),
    ("h100x8-ib", "r1-distill-llama-70b", "vllm", "bf16", "deepseek-ai/DeepSeek-R1-Distill-Llama-70B", 4, 2, 32768),
    ("h100x8-ib", "r1-distill-llama-70b", "sglang", "bf16", "deepseek-ai/DeepSeek-R1-Distill-Llama-70B", 4, 2, 32768),
    ("rtx4090", "r1", "vllm", None, "largest", 0, 0, 0),
    ("rtx4090", "r1", "sglang", None, "largest", 0, 0, 0),
    ("rtx4090", "r1-0528", "vllm", None, "largest", 0, 0, 0),
    ("rtx4090", "r1-0528", "sglang", None, "largest", 0, 0, 0),
    ("rtx4090", "r1-distill-qwen-1.5b", "vllm", "bf16", "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B", 1, 1, 16384),
    ("rtx4090", "r1-distill-qwen-1.5b", "sglang", "bf16", "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B", 1, 1, 16384),
    ("rtx4090", "r1-distill-qwen-7b", "vllm", "bf16", "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B", 1, 1, 16384),
    ("rtx4090", "r1-distill-qwen-7b", "sglang", "bf16", "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B", 1, 1, 16384),
    ("rtx4090", "r1-distill-qwen-14b", "vllm", "int4", "casperhansen/deepseek-r1-distill-qwen-14b-awq", 1, 1, 16384),
    ("rtx4090", "r1-distill-qwen-14b", "sglang", "int4", "casperhansen/deepseek-r1-distill-qwen-14b-awq", 1, 1, 16384),
    ("rtx4090", "r1-distill-qwen-32b", "vllm", None, "nodes 2", 0, 0, 0),
    ("rtx4090", "r1-distill-qwen-32b", "sglang", None, "nodes 2", 0, 0, 0),
    ("rtx4090", "r1-distill-llama-8b", "vllm", "fp8", "deepseek-ai/DeepSeek-R1-Distill-Llama-8B", 1, 1, 16384),
    ("rtx4090", "r1-distill-llama-8b", "sglang", "fp8", "deepseek-ai/DeepSeek-R1-Distill-Llama-8B", 1, 1, 16384),
    ("rtx4090", "r1-distill-llama-70b", "vllm", None, "nodes 3", 0, 0, 0),
    ("rtx4090", "r1-distill-llama-70b", "sglang", None, "nodes 4", 0, 0, 0),
    ("base", "r1", "vllm", None, "nodes 3", 0, 0, 0),
    ("base", "r1", "sglang", None, "nodes 4", 0, 0, 0),
    ("base", "r1-0528", "vllm", None, "nodes 3", 0, 0, 0),
    ("base", "r1-0528", "sglang", None, "nodes 4", 0, 0, 0),
    ("base", "r1-distill-qwen-1.5b", "vllm", "bf16", "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B", 1, 2, 32768),
    ("base", "r1-distill-qwen-1.5b", "sglang", "bf16", "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B", 1, 2, 32768),
    ("base", "r1-distill-qwen-7b", "vllm", "bf16", "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B", 1, 2, 32768),
    ("base", "r1-distill-qwen-7b", "sglang", "bf16", "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B", 1, 2, 32768),
    ("base", "r1-distill-qwen-14b", "vllm", "bf16", "deepseek-ai/DeepSeek-R1-Distill-Qwen-14B", 1, 2, 32768),
    ("base", "r1-distill-qwen-14b", "sglang", "bf16", "deepseek-ai/DeepSeek-R1-Distill-Qwen-14B", 1, 2, 32768),
    ("base", "r1-distill-qwen-32b", "vllm", "bf16", "deepseek-ai/DeepSeek-R1-Distill-Qwen-32B", 2, 1, 32768),
    ("base", "r1-distill-qwen-32b", "sglang", "bf16", "deepseek-ai/DeepSeek-R1-Distill-Qwen-32B", 2, 1, 32768),
    ("base", "r1-distill-llama-8b", "vllm", "bf16", "deepseek-ai/DeepSeek-R1-Distill-Llama-8B", 1, 2, 32768),
    ("base", "r1-distill-llama-8b", "sglang", "bf16", "deepseek-ai/DeepSeek-R1-Distill-Llama-8B", 1, 2, 32768),
    ("base", "r1-distill-llama-70b", "vllm", "int4", "casperhansen/deepseek-r1-distill-llama-70b-awq", 1, 2, 32768),
    ("base", "r1-distill-llama-70b", "sglang", "int4", "casperhansen/deepseek-r1-distill-llama-70b-awq", 1, 2, 32768),
    ("pro", "r1", "vllm", None, "nodes 2", 0, 0, 0),
    ("pro", "r1", "sglang", None, "nodes 2", 0, 0, 0),
    ("pro", "r1-0528", "vllm", None, "nodes 2", 0, 0, 0),
    ("pro", "r1-0528", "sglang", None, "nodes 2", 0, 0, 0),
    ("pro", "r1-distill-qwen-1.5b", "vllm", "bf16", "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B", 1, 4, 65536),
    ("pro", "r1-distill-qwen-1.5b", "sglang", "bf16", "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B", 1, 4, 65536),
    ("pro", "r1-distill-qwen-7b", "vllm", "bf16", "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B", 1, 4, 65536),
    ("pro", "r1-distill-qwen-7b", "sglang", "bf16", "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B", 1, 4, 65536),
    ("pro", "r1-distill-qwen-14b", "vllm", "bf16", "deepseek-ai/DeepSeek-R1-Distill-Qwen-14B", 1, 4, 65536),
    ("pro", "r1-distill-qwen-14b", "sglang", "bf16", "deepseek-ai/DeepSeek-R1-Distill-Qwen-14B", 1, 4, 65536),
    ("pro", "r1-distill-qwen-32b", "vllm", "bf16", "deepseek-ai/DeepSeek-R1-Distill-Qwen-32B", 2, 2, 65536),
    ("pro", "r1-distill-qwen-32b", "sglang", "bf16", "deepseek-ai/DeepSeek-R1-Distill-Qwen-32B", 2, 2, 65536),
    ("pro", "r1-distill-llama-8b", "vllm", "bf16", "deepseek-ai/DeepSeek-R1-Distill-Llama-8B", 1, 4, 65536),
    ("pro", "r1-distill-llama-8b", "sglang", "bf16", "deepseek-ai/DeepSeek-R1-Distill-Llama-8B", 1, 4, 65536),
    ("pro", "r1-distill-llama-70b", "vllm", "bf16", "deepseek-ai/DeepSeek-R1-Distill-Llama-70B", 4, 1, 65536),
    ("pro", "r1-distill-llama-70b", "sglang", "bf16", "deepseek-ai/DeepSeek-R1-Distill-Llama-70B", 4, 1, 65536),
    ("enterprise", "r1", "vllm", "int4", "cognitivecomputations/DeepSeek-R1-AWQ", 8, 1, 32768),
    ("enterprise", "r1", "sglang", "int4", "cognitivecomputations/DeepSeek-R1-AWQ", 8, 1, 32768),
    ("enterprise", "r1-0528", "vllm", "int4", "RedHatAI/DeepSeek-R1-0528-quantized.w4a16", 8, 1, 32768),
    ("enterprise", "r1-0528", "sglang", "int4", "RedHatAI/DeepSeek-R1-0528-quantized.w4a16", 8, 1, 32768),
    ("enterprise", "r1-distill-qwen-1.5b", "vllm", "bf16", "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B", 1, 8, 32768),
    ("enterprise", "r1-distill-qwen-1.5b", "sglang", "bf16", "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B", 1, 8, 32768),
    ("enterprise", "r1-distill-qwen-7b", "vllm", "bf16", "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B", 1, 8, 32768),
    ("enterprise", "r1-distill-qwen-7b", "sglang", "bf16", "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B", 1, 8, 32768),
    ("enterprise", "r1-distill-qwen-14b", "vllm", "bf16", "deepseek-ai/DeepSeek-R1-Distill-Qwen-14B", 1, 8, 32768),
    ("enterprise", "r1-distill-qwen-14b", "sglang", "bf16", "deepseek-ai/DeepSeek-R1-Distill-Qwen-14B", 1, 8, 32768),
    ("enterprise", "r1-distill-qwen-32b", "vllm", "bf16", "deepseek-ai/DeepSeek-R1-Distill-Qwen-32B", 2, 4, 32768),
    ("enterprise", "r1-distill-qwen-32b", "sglang", "bf16", "deepseek-ai/DeepSeek-R1-Distill-Qwen-32B", 2, 4, 32768),
    ("enterprise", "r1-distill-llama-8b", "vllm", "bf16", "deepseek-ai/DeepSeek-R1-Distill-Llama-8B", 1, 8, 32768),
    ("enterprise", "r1-distill-llama-8b", "sglang", "bf16", "deepseek-ai/DeepSeek-R1-Distill-Llama-8B", 1, 8, 32768),
    ("enterprise", "r1-distill-llama-70b", "vllm", "bf16", "deepseek-ai/DeepSeek-R1-Distill-Llama-70B", 4, 2, 32768),
    ("enterprise", "r1-distill-llama-70b", "sglang", "bf16", "deepseek-ai/DeepSeek-R1-Distill-Llama-70B", 4, 2, 32768),
]
PROFILES = ("base", "pro", "enterprise")
VLLM_ARGVS: list[list[str]] = []
SGLANG_ARGVS: list[list[str]] = []
GPU_BYTES: dict[str, int] = {}


def _cpu_build(name: str) -> InstalledEngine:
    """This machine's CPU build of the engine, as `dsr1 engine install NAME --device cpu` leaves it."""
    return InstalledEngine(name, "0.32.0", python=f"/cpu-home/engines/{name}/venv/bin/python", binary=None,
                           location=f"/cpu-home/engines/{name}", origin="dsr1", build=f"{name}-cpu")


def _plan(where: str, model: str, engine: str, tmp_path: Path, **kw) -> plan.Plan:
    snapshot, profile = ("driver-missing", where) if where in PROFILES + ALL_PROFILES else (where, None)
    gpus, host, _ = probes_for(snapshot, tmp_path)
    if profile and plan.profiles.get(profile).requires.gpus:
        gpus = plan._virtual_gpus(plan.profiles.get(profile))
    GPU_BYTES[where] = min((g.memory_total for g in gpus.gpus), default=0)
    return plan.make_plan(model, profile, plan.Overrides(engine=engine, engine_port=8100, **kw), gpus=gpus, host=host,
                          installed={engine: _cpu_build(engine)}, interfaces=ITFS)


@pytest.fixture(autouse=True)
def _recorded_help(monkeypatch):
    monkeypatch.setattr(envs, "help_text", lambda eng: HELP[eng.name])


def _arg(argv, flag: str) -> str:
    return argv[list(argv).index(flag) + 1]


@pytest.mark.parametrize("where,model,engine,precision,checkpoint,tp,dp,ctx", EXPECTED,
                         ids=[f"{r[0]}-{r[1]}-{r[2]}" for r in EXPECTED])
def test_plan_matrix(where, model, engine, precision, checkpoint, tp, dp, ctx, tmp_path):
    if precision is None:
        with pytest.raises(HardwareError) as err:
            _plan(where, model, engine, tmp_path)
        hint = err.value.hint or ""
        if checkpoint == "largest":
            assert "the largest model that fits here is" in hint, hint
            return
        n = int(checkpoint.split()[1])
        assert f"--nodes {n} " in hint, hint
        # the advice converges: that many nodes plan, at the precision it names
        p = _plan(where, model, engine, tmp_path, nodes=n, head=HEAD)
        assert p.nodes_count == n and f"at {p.precision} ({p.checkpoint})" in hint, (hint, p.precision, p.checkpoint)
        assert len(p.nodes) == n
        _check_runnable(p, GPU_BYTES[where])
        return
    p = _plan(where, model, engine, tmp_path)
    assert (p.precision, p.checkpoint, p.tensor_parallel, p.data_parallel, p.max_model_len) == \
        (precision, checkpoint, tp, dp, ctx)
    _check_runnable(p, GPU_BYTES[where])


def _check_runnable(p: plan.Plan, gpu_bytes: int) -> None:
    from dsr1 import catalog, checkpoints

    spec = catalog.get(p.catalog_name)
    ck = next(c for c in checkpoints.for_model(spec) if c.repo == p.checkpoint)
    argv = p.nodes[0].argv
    if ck.precision != p.precision and {ck.precision, p.precision} != {"bf16", "fp16"}:
        # made while loading (bf16 <-> fp16 is only the dtype the engine computes in): the engine must be told
        assert p.quantization and _arg(argv, "--quantization") == p.quantization
        assert p.checkpoint_gb == 0
    else:
        assert p.checkpoint_gb == ck.size_gb
        assert p.weights_bytes_per_device >= ck.size_bytes / (p.tensor_parallel * p.pipeline_parallel) * 0.999
        if ck.quantization(p.engine):
            assert _arg(argv, "--quantization") == ck.quantization(p.engine)
        else:
            assert "--quantization" not in argv
    model_flag = "--model-path" if p.engine == "sglang" else None
    loaded = _arg(argv, model_flag) if model_flag else argv[argv.index("serve") + 1]
    assert loaded == p.checkpoint == p.model_path
    # weights + KV + overhead within the usable share of one GPU
    assert p.weights_bytes_per_device + p.kv_budget_bytes <= gpu_bytes * p.memory_utilization
    assert p.max_model_len * p.kv_bytes_per_token <= p.kv_budget_bytes
    # R1 settings (the demo model has no reasoning to split)
    if spec.reasoning:
        assert p.reasoning_parser == "deepseek_r1"
        assert _arg(argv, "--reasoning-parser") == ("deepseek-r1" if p.engine == "sglang" else "deepseek_r1")
    else:
        assert p.reasoning_parser == "none" and "--reasoning-parser" not in argv
    if p.engine == "sglang" and spec.architecture == "deepseek_v3":
        assert "--trust-remote-code" in argv
    if p.dp_attention > 1:
        assert "--attn-dp-size" in argv or "--enable-dp-attention" in argv
    # never this machine's CPU build on GPUs; the install the nodes need is named
    for n in p.nodes:
        assert not any("/cpu-home/" in a for a in n.argv)
    assert p.checked_against is None and any("--device cuda" in w for w in p.warnings)
    assert _arg(argv, "--dtype") == {"bf16": "bfloat16", "fp16": "float16"}[p.dtype]
    for n in p.nodes:
        if p.engine == "vllm":
            VLLM_ARGVS.append(list(n.argv[n.argv.index("serve") + 1:]))
        else:
            SGLANG_ARGVS.append(list(n.argv[n.argv.index("sglang.launch_server") + 1:]))


# The two engines not in EXPECTED: the embedded engine (planned on every machine; bitsandbytes on load for
# int8/nf4) and llama-server, which serves GGUF files only: a catalog model is refused with the fix.
# (where, model, engine, precision or None = refused, device or the error's type, context)
EXPECTED_OTHER = [
    ("a100x2-sxm", "r1", "embedded", "nf4", "cuda", 32768),
    ("a100x2-sxm", "r1", "llamacpp", "gguf", "cuda", 8192),
    ("a100x2-sxm", "r1-0528", "embedded", "nf4", "cuda", 32768),
    ("a100x2-sxm", "r1-0528", "llamacpp", None, "UsageError", 0),
    ("a100x2-sxm", "r1-distill-qwen-1.5b", "embedded", "bf16", "cuda", 32768),
    ("a100x2-sxm", "r1-distill-qwen-1.5b", "llamacpp", None, "UsageError", 0),
    ("a100x2-sxm", "r1-distill-qwen-7b", "embedded", "bf16", "cuda", 32768),
    ("a100x2-sxm", "r1-distill-qwen-7b", "llamacpp", None, "UsageError", 0),
    ("a100x2-sxm", "r1-distill-qwen-14b", "embedded", "bf16", "cuda", 9472),
    ("a100x2-sxm", "r1-distill-qwen-14b", "llamacpp", None, "UsageError", 0),
    ("a100x2-sxm", "r1-distill-qwen-32b", "embedded", "bf16", "cuda", 4864),
    ("a100x2-sxm", "r1-distill-qwen-32b", "llamacpp", None, "UsageError", 0),
    ("a100x2-sxm", "r1-distill-llama-8b", "embedded", "bf16", "cuda", 16128),
    ("a100x2-sxm", "r1-distill-llama-8b", "llamacpp", None, "UsageError", 0),
    ("a100x2-sxm", "r1-distill-llama-70b", "embedded", "int8", "cuda", 3584),
    ("a100x2-sxm", "r1-distill-llama-70b", "llamacpp", None, "UsageError", 0),
    ("a100x2-sxm", "smollm2-135m", "embedded", "bf16", "cuda", 8192),
    ("a100x2-sxm", "smollm2-135m", "llamacpp", None, "UsageError", 0),
    ("h100x4-sxm", "r1", "embedded", "nf4", "cuda", 65536),
    ("h100x4-sxm", "r1", "llamacpp", "gguf", "cuda", 8192),
    ("h100x4-sxm", "r1-0528", "embedded", "nf4", "cuda", 65536),
    ("h100x4-sxm", "r1-0528", "llamacpp", None, "UsageError", 0),
    ("h100x4-sxm", "r1-distill-qwen-1.5b", "embedded", "bf16", "cuda", 65536),
    ("h100x4-sxm", "r1-distill-qwen-1.5b", "llamacpp", None, "UsageError", 0),
    ("h100x4-sxm", "r1-distill-qwen-7b", "embedded", "bf16", "cuda", 39168),
    ("h100x4-sxm", "r1-distill-qwen-7b", "llamacpp", None, "UsageError", 0),
    ("h100x4-sxm", "r1-distill-qwen-14b", "embedded", "bf16", "cuda", 10752),
    ("h100x4-sxm", "r1-distill-qwen-14b", "llamacpp", None, "UsageError", 0),
    ("h100x4-sxm", "r1-distill-qwen-32b", "embedded", "bf16", "cuda", 6912),
    ("h100x4-sxm", "r1-distill-qwen-32b", "llamacpp", None, "UsageError", 0),
    ("h100x4-sxm", "r1-distill-llama-8b", "embedded", "bf16", "cuda", 16896),
    ("h100x4-sxm", "r1-distill-llama-8b", "llamacpp", None, "UsageError", 0),
    ("h100x4-sxm", "r1-distill-llama-70b", "embedded", "bf16", "cuda", 3584),
    ("h100x4-sxm", "r1-distill-llama-70b", "llamacpp", None, "UsageError", 0),
    ("h100x4-sxm", "smollm2-135m", "embedded", "bf16", "cuda", 8192),
    ("h100x4-sxm", "smollm2-135m", "llamacpp", None, "UsageError", 0),
    ("h100x8-ib", "r1", "embedded", "nf4", "cuda", 12288),
    ("h100x8-ib", "r1", "llamacpp", "gguf", "cuda", 8192),
    ("h100x8-ib", "r1-0528", "embedded", "nf4", "cuda", 12288),
    ("h100x8-ib", "r1-0528", "llamacpp", None, "UsageError", 0),
    ("h100x8-ib", "r1-distill-qwen-1.5b", "embedded", "bf16", "cuda", 32768),
    ("h100x8-ib", "r1-distill-qwen-1.5b", "llamacpp", None, "UsageError", 0),
    ("h100x8-ib", "r1-distill-qwen-7b", "embedded", "bf16", "cuda", 32768),
    ("h100x8-ib", "r1-distill-qwen-7b", "llamacpp", None, "UsageError", 0),
    ("h100x8-ib", "r1-distill-qwen-14b", "embedded", "bf16", "cuda", 11264),
    ("h100x8-ib", "r1-distill-qwen-14b", "llamacpp", None, "UsageError", 0),
    ("h100x8-ib", "r1-distill-qwen-32b", "embedded", "bf16", "cuda", 7936),
    ("h100x8-ib", "r1-distill-qwen-32b", "llamacpp", None, "UsageError", 0),
    ("h100x8-ib", "r1-distill-llama-8b", "embedded", "bf16", "cuda", 17408),
    ("h100x8-ib", "r1-distill-llama-8b", "llamacpp", None, "UsageError", 0),
    ("h100x8-ib", "r1-distill-llama-70b", "embedded", "bf16", "cuda", 5376),
    ("h100x8-ib", "r1-distill-llama-70b", "llamacpp", None, "UsageError", 0),
    ("h100x8-ib", "smollm2-135m", "embedded", "bf16", "cuda", 8192),
    ("h100x8-ib", "smollm2-135m", "llamacpp", None, "UsageError", 0),
    ("rtx4090", "r1", "embedded", "nf4", "cuda", 16384),
    ("rtx4090", "r1", "llamacpp", None, "HardwareError", 0),
    ("rtx4090", "r1-0528", "embedded", "nf4", "cuda", 16384),
    ("rtx4090", "r1-0528", "llamacpp", None, "UsageError", 0),
    ("rtx4090", "r1-distill-qwen-1.5b", "embedded", "bf16", "cuda", 16384),
    ("rtx4090", "r1-distill-qwen-1.5b", "llamacpp", None, "UsageError", 0),
    ("rtx4090", "r1-distill-qwen-7b", "embedded", "bf16", "cuda", 3328),
    ("rtx4090", "r1-distill-qwen-7b", "llamacpp", None, "UsageError", 0),
    ("rtx4090", "r1-distill-qwen-14b", "embedded", "int8", "cuda", 768),
    ("rtx4090", "r1-distill-qwen-14b", "llamacpp", None, "UsageError", 0),
    ("rtx4090", "r1-distill-qwen-32b", "embedded", "nf4", "cuda", 32),
    ("rtx4090", "r1-distill-qwen-32b", "llamacpp", None, "UsageError", 0),
    ("rtx4090", "r1-distill-llama-8b", "embedded", "bf16", "cuda", 1024),
    ("rtx4090", "r1-distill-llama-8b", "llamacpp", None, "UsageError", 0),
    ("rtx4090", "r1-distill-llama-70b", "embedded", "nf4", "cuda", 16384),
    ("rtx4090", "r1-distill-llama-70b", "llamacpp", None, "UsageError", 0),
    ("rtx4090", "smollm2-135m", "embedded", "bf16", "cuda", 8192),
    ("rtx4090", "smollm2-135m", "llamacpp", None, "UsageError", 0),
    ("driver-missing", "r1", "embedded", "nf4", "cpu", 8192),
    ("driver-missing", "r1", "llamacpp", None, "HardwareError", 0),
    ("driver-missing", "r1-0528", "embedded", "nf4", "cpu", 8192),
    ("driver-missing", "r1-0528", "llamacpp", None, "UsageError", 0),
    ("driver-missing", "r1-distill-qwen-1.5b", "embedded", "fp32", "cpu", 8192),
    ("driver-missing", "r1-distill-qwen-1.5b", "llamacpp", None, "UsageError", 0),
    ("driver-missing", "r1-distill-qwen-7b", "embedded", "fp32", "cpu", 8192),
    ("driver-missing", "r1-distill-qwen-7b", "llamacpp", None, "UsageError", 0),
    ("driver-missing", "r1-distill-qwen-14b", "embedded", "int8", "cpu", 4608),
    ("driver-missing", "r1-distill-qwen-14b", "llamacpp", None, "UsageError", 0),
    ("driver-missing", "r1-distill-qwen-32b", "embedded", "int8", "cpu", 1280),
    ("driver-missing", "r1-distill-qwen-32b", "llamacpp", None, "UsageError", 0),
    ("driver-missing", "r1-distill-llama-8b", "embedded", "fp32", "cpu", 4096),
    ("driver-missing", "r1-distill-llama-8b", "llamacpp", None, "UsageError", 0),
    ("driver-missing", "r1-distill-llama-70b", "embedded", "nf4", "cpu", 176),
    ("driver-missing", "r1-distill-llama-70b", "llamacpp", None, "UsageError", 0),
    ("driver-missing", "smollm2-135m", "embedded", "fp32", "cpu", 8192),
    ("driver-missing", "smollm2-135m", "llamacpp", None, "UsageError", 0),
    ("base", "r1", "embedded", "nf4", "cuda", 32768),
    ("base", "r1", "llamacpp", "gguf", "cuda", 8192),
    ("base", "r1-0528", "embedded", "nf4", "cuda", 32768),
    ("base", "r1-0528", "llamacpp", None, "UsageError", 0),
    ("base", "r1-distill-qwen-1.5b", "embedded", "bf16", "cuda", 32768),
    ("base", "r1-distill-qwen-1.5b", "llamacpp", None, "UsageError", 0),
    ("base", "r1-distill-qwen-7b", "embedded", "bf16", "cuda", 32768),
    ("base", "r1-distill-qwen-7b", "llamacpp", None, "UsageError", 0),
    ("base", "r1-distill-qwen-14b", "embedded", "bf16", "cuda", 9472),
    ("base", "r1-distill-qwen-14b", "llamacpp", None, "UsageError", 0),
    ("base", "r1-distill-qwen-32b", "embedded", "bf16", "cuda", 4864),
    ("base", "r1-distill-qwen-32b", "llamacpp", None, "UsageError", 0),
    ("base", "r1-distill-llama-8b", "embedded", "bf16", "cuda", 15872),
    ("base", "r1-distill-llama-8b", "llamacpp", None, "UsageError", 0),
    ("base", "r1-distill-llama-70b", "embedded", "int8", "cuda", 3584),
    ("base", "r1-distill-llama-70b", "llamacpp", None, "UsageError", 0),
    ("base", "smollm2-135m", "embedded", "bf16", "cuda", 8192),
    ("base", "smollm2-135m", "llamacpp", None, "UsageError", 0),
    ("pro", "r1", "embedded", "nf4", "cuda", 65536),
    ("pro", "r1", "llamacpp", "gguf", "cuda", 8192),
    ("pro", "r1-0528", "embedded", "nf4", "cuda", 65536),
    ("pro", "r1-0528", "llamacpp", None, "UsageError", 0),
    ("pro", "r1-distill-qwen-1.5b", "embedded", "bf16", "cuda", 65536),
    ("pro", "r1-distill-qwen-1.5b", "llamacpp", None, "UsageError", 0),
    ("pro", "r1-distill-qwen-7b", "embedded", "bf16", "cuda", 39168),
    ("pro", "r1-distill-qwen-7b", "llamacpp", None, "UsageError", 0),
    ("pro", "r1-distill-qwen-14b", "embedded", "bf16", "cuda", 10752),
    ("pro", "r1-distill-qwen-14b", "llamacpp", None, "UsageError", 0),
    ("pro", "r1-distill-qwen-32b", "embedded", "bf16", "cuda", 6912),
    ("pro", "r1-distill-qwen-32b", "llamacpp", None, "UsageError", 0),
    ("pro", "r1-distill-llama-8b", "embedded", "bf16", "cuda", 16896),
    ("pro", "r1-distill-llama-8b", "llamacpp", None, "UsageError", 0),
    ("pro", "r1-distill-llama-70b", "embedded", "bf16", "cuda", 3840),
    ("pro", "r1-distill-llama-70b", "llamacpp", None, "UsageError", 0),
    ("pro", "smollm2-135m", "embedded", "bf16", "cuda", 8192),
    ("pro", "smollm2-135m", "llamacpp", None, "UsageError", 0),
    ("enterprise", "r1", "embedded", "nf4", "cuda", 12288),
    ("enterprise", "r1", "llamacpp", "gguf", "cuda", 8192),
    ("enterprise", "r1-0528", "embedded", "nf4", "cuda", 12288),
    ("enterprise", "r1-0528", "llamacpp", None, "UsageError", 0),
    ("enterprise", "r1-distill-qwen-1.5b", "embedded", "bf16", "cuda", 32768),
    ("enterprise", "r1-distill-qwen-1.5b", "llamacpp", None, "UsageError", 0),
    ("enterprise", "r1-distill-qwen-7b", "embedded", "bf16", "cuda", 32768),
    ("enterprise", "r1-distill-qwen-7b", "llamacpp", None, "UsageError", 0),
    ("enterprise", "r1-distill-qwen-14b", "embedded", "bf16", "cuda", 11264),
    ("enterprise", "r1-distill-qwen-14b", "llamacpp", None, "UsageError", 0),
    ("enterprise", "r1-distill-qwen-32b", "embedded", "bf16", "cuda", 7936),
    ("enterprise", "r1-distill-qwen-32b", "llamacpp", None, "UsageError", 0),
    ("enterprise", "r1-distill-llama-8b", "embedded", "bf16", "cuda", 17408),
    ("enterprise", "r1-distill-llama-8b", "llamacpp", None, "UsageError", 0),
    ("enterprise", "r1-distill-llama-70b", "embedded", "bf16", "cuda", 5376),
    ("enterprise", "r1-distill-llama-70b", "llamacpp", None, "UsageError", 0),
    ("enterprise", "smollm2-135m", "embedded", "bf16", "cuda", 8192),
    ("enterprise", "smollm2-135m", "llamacpp", None, "UsageError", 0),
    ("small-gpu", "r1", "embedded", "nf4", "cuda", 16384),
    ("small-gpu", "r1", "llamacpp", None, "HardwareError", 0),
    ("small-gpu", "r1-0528", "embedded", "nf4", "cuda", 16384),
    ("small-gpu", "r1-0528", "llamacpp", None, "UsageError", 0),
    ("small-gpu", "r1-distill-qwen-1.5b", "embedded", "fp16", "cuda", 5888),
    ("small-gpu", "r1-distill-qwen-1.5b", "llamacpp", None, "UsageError", 0),
    ("small-gpu", "r1-distill-qwen-7b", "embedded", "nf4", "cuda", 16),
    ("small-gpu", "r1-distill-qwen-7b", "llamacpp", None, "UsageError", 0),
    ("small-gpu", "r1-distill-qwen-14b", "embedded", "nf4", "cuda", 16384),
    ("small-gpu", "r1-distill-qwen-14b", "llamacpp", None, "UsageError", 0),
    ("small-gpu", "r1-distill-qwen-32b", "embedded", "nf4", "cuda", 16384),
    ("small-gpu", "r1-distill-qwen-32b", "llamacpp", None, "UsageError", 0),
    ("small-gpu", "r1-distill-llama-8b", "embedded", "nf4", "cuda", 16384),
    ("small-gpu", "r1-distill-llama-8b", "llamacpp", None, "UsageError", 0),
    ("small-gpu", "r1-distill-llama-70b", "embedded", "nf4", "cuda", 16384),
    ("small-gpu", "r1-distill-llama-70b", "llamacpp", None, "UsageError", 0),
    ("small-gpu", "smollm2-135m", "embedded", "fp16", "cuda", 8192),
    ("small-gpu", "smollm2-135m", "llamacpp", None, "UsageError", 0),
    ("single-gpu", "r1", "embedded", "nf4", "cuda", 16384),
    ("single-gpu", "r1", "llamacpp", None, "HardwareError", 0),
    ("single-gpu", "r1-0528", "embedded", "nf4", "cuda", 16384),
    ("single-gpu", "r1-0528", "llamacpp", None, "UsageError", 0),
    ("single-gpu", "r1-distill-qwen-1.5b", "embedded", "fp16", "cuda", 16384),
    ("single-gpu", "r1-distill-qwen-1.5b", "llamacpp", None, "UsageError", 0),
    ("single-gpu", "r1-distill-qwen-7b", "embedded", "fp16", "cuda", 3072),
    ("single-gpu", "r1-distill-qwen-7b", "llamacpp", None, "UsageError", 0),
    ("single-gpu", "r1-distill-qwen-14b", "embedded", "int8", "cuda", 752),
    ("single-gpu", "r1-distill-qwen-14b", "llamacpp", None, "UsageError", 0),
    ("single-gpu", "r1-distill-qwen-32b", "embedded", "nf4", "cuda", 32),
    ("single-gpu", "r1-distill-qwen-32b", "llamacpp", None, "UsageError", 0),
    ("single-gpu", "r1-distill-llama-8b", "embedded", "fp16", "cuda", 1024),
    ("single-gpu", "r1-distill-llama-8b", "llamacpp", None, "UsageError", 0),
    ("single-gpu", "r1-distill-llama-70b", "embedded", "nf4", "cuda", 16384),
    ("single-gpu", "r1-distill-llama-70b", "llamacpp", None, "UsageError", 0),
    ("single-gpu", "smollm2-135m", "embedded", "fp16", "cuda", 8192),
    ("single-gpu", "smollm2-135m", "llamacpp", None, "UsageError", 0),
    ("cpu", "r1", "embedded", "nf4", "cpu", 8192),
    ("cpu", "r1", "llamacpp", None, "HardwareError", 0),
    ("cpu", "r1-0528", "embedded", "nf4", "cpu", 8192),
    ("cpu", "r1-0528", "llamacpp", None, "UsageError", 0),
    ("cpu", "r1-distill-qwen-1.5b", "embedded", "fp32", "cpu", 8192),
    ("cpu", "r1-distill-qwen-1.5b", "llamacpp", None, "UsageError", 0),
    ("cpu", "r1-distill-qwen-7b", "embedded", "fp32", "cpu", 8192),
    ("cpu", "r1-distill-qwen-7b", "llamacpp", None, "UsageError", 0),
    ("cpu", "r1-distill-qwen-14b", "embedded", "int8", "cpu", 4608),
    ("cpu", "r1-distill-qwen-14b", "llamacpp", None, "UsageError", 0),
    ("cpu", "r1-distill-qwen-32b", "embedded", "int8", "cpu", 1280),
    ("cpu", "r1-distill-qwen-32b", "llamacpp", None, "UsageError", 0),
    ("cpu", "r1-distill-llama-8b", "embedded", "fp32", "cpu", 4096),
    ("cpu", "r1-distill-llama-8b", "llamacpp", None, "UsageError", 0),
    ("cpu", "r1-distill-llama-70b", "embedded", "nf4", "cpu", 176),
    ("cpu", "r1-distill-llama-70b", "llamacpp", None, "UsageError", 0),
    ("cpu", "smollm2-135m", "embedded", "fp32", "cpu", 8192),
    ("cpu", "smollm2-135m", "llamacpp", None, "UsageError", 0),
]
ALL_PROFILES = ("base", "pro", "enterprise", "small-gpu", "single-gpu", "cpu")


@pytest.mark.parametrize("where,model,engine,precision,device,ctx", EXPECTED_OTHER,
                         ids=[f"{r[0]}-{r[1]}-{r[2]}" for r in EXPECTED_OTHER])
def test_plan_matrix_embedded_and_llamacpp(where, model, engine, precision, device, ctx, tmp_path):
    from dsr1 import catalog, errors

    snapshot, profile = ("driver-missing", where) if where in ALL_PROFILES else (where, None)
    gpus, host, _ = probes_for(snapshot, tmp_path)
    make = lambda: plan.make_plan(model, profile, plan.Overrides(engine=engine, engine_port=8100), gpus=gpus,  # noqa: E731
                                  host=host, installed={}, interfaces=ITFS)
    if precision is None:
        with pytest.raises(getattr(errors, device)) as err:
            make()
        assert err.value.hint, str(err.value)
        if engine == "llamacpp" and device == "UsageError":
            assert "serves GGUF files" in str(err.value)
        if engine == "llamacpp" and device == "HardwareError":  # R1 671B's GGUFs: says what RAM it needs
            assert "host RAM" in str(err.value) and "UD-IQ1_S" in str(err.value)
        return
    p = make()
    if precision == "gguf":
        _check_gguf_plan(p, gpus, host, profile)
        assert (p.device, p.max_model_len) == (device, ctx)
        return
    assert (p.precision, p.device, p.max_model_len) == (precision, device, ctx)
    spec = catalog.get(model)
    assert p.reasoning_parser == ("deepseek_r1" if spec.reasoning else "none")
    assert p.checkpoint == spec.repo and p.model_path == spec.repo and p.needs_pull
    if device == "cpu" and p.precision in ("int8", "int4") and p.fast_path_reason is None:
        # the fast path packs the bf16/fp32 checkpoint itself (dsr1.serve.wquant): no bitsandbytes, nothing quantized
        assert (p.quant, p.weights, p.compile) == ("none", p.precision, False)
    else:  # bitsandbytes while pulling/loading
        assert p.quant == {"int8": "int8", "nf4": "nf4"}.get(p.precision, "none") and p.weights is None
    if not any("does not fit" in w for w in p.warnings):
        assert p.max_model_len * p.kv_bytes_per_token * p.max_num_seqs <= p.kv_budget_bytes
    assert p.dtype in ("bf16", "fp16", "fp32", "measure") and p.dtype_reason


def _check_gguf_plan(p, gpus, host, profile) -> None:
    """R1 671B as a dynamic-quant GGUF (dsr1.gguf_place): every GPU's share within its memory, the host
    RAM within the machine's (a profile's, when planned for one), and flags that place exactly the
    layers the plan assigned (llama.cpp maps -ts ratios to layers by cumulative fraction)."""
    from dsr1 import profiles

    pl = p.placement
    assert p.engine == "llamacpp" and p.precision == "gguf" and p.checkpoint.startswith("unsloth/DeepSeek-R1-GGUF:")
    assert p.checkpoint_format == "gguf" and p.needs_pull and p.model_path == p.checkpoint
    assert all(used <= cap for used, cap in zip(pl["gpu_bytes"], pl["gpu_usable"]))
    if profile:  # planned for the profile's hardware
        prof = profiles.get(profile)
        assert len(pl["gpu_usable"]) == prof.requires.gpus
        ram = prof.requires.ram_gb * 1e9
    else:
        assert list(pl["gpu_usable"]) == [g.memory_total for g in gpus.gpus]
        ram = host.usable_ram
    assert pl["host_bytes"] <= ram
    argv = p.nodes[0].argv
    if pl["where"] == "layers_in_ram":  # the last -ngl layers on the GPUs, the output head in RAM
        assert argv[argv.index("-ngl") + 1] == str(pl["n_gpu_layers"]) == str(sum(pl["tensor_split"]))
    else:
        assert argv[argv.index("-ngl") + 1] == "999" and sum(pl["tensor_split"]) == pl["n_layer"] + 1
    if len(gpus.gpus) > 1:
        assert argv[argv.index("--tensor-split") + 1] == ",".join(map(str, pl["tensor_split"]))
    if pl["n_cpu_moe"]:
        assert argv[argv.index("--n-cpu-moe") + 1] == str(pl["n_cpu_moe"])
    assert argv[argv.index("-c") + 1] == str(p.max_model_len) and argv[argv.index("--fit") + 1] == "off"
    assert p.expected_tok_s and p.expected_source


# vLLM and SGLang on the rest: the CPU machine and profiles (vLLM's CPU build; SGLang refused), the
# single- and small-GPU profiles, and the demo model everywhere. (where, model, engine, precision or
# None = refused, device or the error's type, context)
EXPECTED_MORE = [
    ("a100x2-sxm", "smollm2-135m", "vllm", "bf16", "cuda", 8192),
    ("a100x2-sxm", "smollm2-135m", "sglang", "bf16", "cuda", 8192),
    ("h100x4-sxm", "smollm2-135m", "vllm", "bf16", "cuda", 8192),
    ("h100x4-sxm", "smollm2-135m", "sglang", "bf16", "cuda", 8192),
    ("h100x8-ib", "smollm2-135m", "vllm", "bf16", "cuda", 8192),
    ("h100x8-ib", "smollm2-135m", "sglang", "bf16", "cuda", 8192),
    ("rtx4090", "smollm2-135m", "vllm", "bf16", "cuda", 8192),
    ("rtx4090", "smollm2-135m", "sglang", "bf16", "cuda", 8192),
    ("driver-missing", "r1", "vllm", None, "HardwareError", 0),
    ("driver-missing", "r1", "sglang", None, "UsageError", 0),
    ("driver-missing", "r1-0528", "vllm", None, "HardwareError", 0),
    ("driver-missing", "r1-0528", "sglang", None, "UsageError", 0),
    ("driver-missing", "r1-distill-qwen-1.5b", "vllm", "fp32", "cpu", 8192),
    ("driver-missing", "r1-distill-qwen-1.5b", "sglang", None, "UsageError", 0),
    ("driver-missing", "r1-distill-qwen-7b", "vllm", "fp32", "cpu", 8192),
    ("driver-missing", "r1-distill-qwen-7b", "sglang", None, "UsageError", 0),
    ("driver-missing", "r1-distill-qwen-14b", "vllm", None, "HardwareError", 0),
    ("driver-missing", "r1-distill-qwen-14b", "sglang", None, "UsageError", 0),
    ("driver-missing", "r1-distill-qwen-32b", "vllm", None, "HardwareError", 0),
    ("driver-missing", "r1-distill-qwen-32b", "sglang", None, "UsageError", 0),
    ("driver-missing", "r1-distill-llama-8b", "vllm", "fp32", "cpu", 8192),
    ("driver-missing", "r1-distill-llama-8b", "sglang", None, "UsageError", 0),
    ("driver-missing", "r1-distill-llama-70b", "vllm", None, "HardwareError", 0),
    ("driver-missing", "r1-distill-llama-70b", "sglang", None, "UsageError", 0),
    ("driver-missing", "smollm2-135m", "vllm", "fp32", "cpu", 8192),
    ("driver-missing", "smollm2-135m", "sglang", None, "UsageError", 0),
    ("base", "smollm2-135m", "vllm", "bf16", "cuda", 8192),
    ("base", "smollm2-135m", "sglang", "bf16", "cuda", 8192),
    ("pro", "smollm2-135m", "vllm", "bf16", "cuda", 8192),
    ("pro", "smollm2-135m", "sglang", "bf16", "cuda", 8192),
    ("enterprise", "smollm2-135m", "vllm", "bf16", "cuda", 8192),
    ("enterprise", "smollm2-135m", "sglang", "bf16", "cuda", 8192),
    ("small-gpu", "r1", "vllm", None, "HardwareError", 0),
    ("small-gpu", "r1", "sglang", None, "HardwareError", 0),
    ("small-gpu", "r1-0528", "vllm", None, "HardwareError", 0),
    ("small-gpu", "r1-0528", "sglang", None, "HardwareError", 0),
    ("small-gpu", "r1-distill-qwen-1.5b", "vllm", "int4", "cuda", 12800),
    ("small-gpu", "r1-distill-qwen-1.5b", "sglang", "int4", "cuda", 12800),
    ("small-gpu", "r1-distill-qwen-7b", "vllm", None, "HardwareError", 0),
    ("small-gpu", "r1-distill-qwen-7b", "sglang", None, "HardwareError", 0),
    ("small-gpu", "r1-distill-qwen-14b", "vllm", None, "HardwareError", 0),
    ("small-gpu", "r1-distill-qwen-14b", "sglang", None, "HardwareError", 0),
    ("small-gpu", "r1-distill-qwen-32b", "vllm", None, "HardwareError", 0),
    ("small-gpu", "r1-distill-qwen-32b", "sglang", None, "HardwareError", 0),
    ("small-gpu", "r1-distill-llama-8b", "vllm", None, "HardwareError", 0),
    ("small-gpu", "r1-distill-llama-8b", "sglang", None, "HardwareError", 0),
    ("small-gpu", "r1-distill-llama-70b", "vllm", None, "HardwareError", 0),
    ("small-gpu", "r1-distill-llama-70b", "sglang", None, "HardwareError", 0),
    ("small-gpu", "smollm2-135m", "vllm", "fp16", "cuda", 8192),
    ("small-gpu", "smollm2-135m", "sglang", "fp16", "cuda", 8192),
    ("single-gpu", "r1", "vllm", None, "HardwareError", 0),
    ("single-gpu", "r1", "sglang", None, "HardwareError", 0),
    ("single-gpu", "r1-0528", "vllm", None, "HardwareError", 0),
    ("single-gpu", "r1-0528", "sglang", None, "HardwareError", 0),
    ("single-gpu", "r1-distill-qwen-1.5b", "vllm", "fp16", "cuda", 16384),
    ("single-gpu", "r1-distill-qwen-1.5b", "sglang", "fp16", "cuda", 16384),
    ("single-gpu", "r1-distill-qwen-7b", "vllm", "fp16", "cuda", 16384),
    ("single-gpu", "r1-distill-qwen-7b", "sglang", "fp16", "cuda", 16384),
    ("single-gpu", "r1-distill-qwen-14b", "vllm", "int4", "cuda", 16384),
    ("single-gpu", "r1-distill-qwen-14b", "sglang", "int4", "cuda", 16384),
    ("single-gpu", "r1-distill-qwen-32b", "vllm", None, "HardwareError", 0),
    ("single-gpu", "r1-distill-qwen-32b", "sglang", None, "HardwareError", 0),
    ("single-gpu", "r1-distill-llama-8b", "vllm", "int4", "cuda", 16384),
    ("single-gpu", "r1-distill-llama-8b", "sglang", "int4", "cuda", 16384),
    ("single-gpu", "r1-distill-llama-70b", "vllm", None, "HardwareError", 0),
    ("single-gpu", "r1-distill-llama-70b", "sglang", None, "HardwareError", 0),
    ("single-gpu", "smollm2-135m", "vllm", "fp16", "cuda", 8192),
    ("single-gpu", "smollm2-135m", "sglang", "fp16", "cuda", 8192),
    ("cpu", "r1", "vllm", None, "HardwareError", 0),
    ("cpu", "r1", "sglang", None, "UsageError", 0),
    ("cpu", "r1-0528", "vllm", None, "HardwareError", 0),
    ("cpu", "r1-0528", "sglang", None, "UsageError", 0),
    ("cpu", "r1-distill-qwen-1.5b", "vllm", "fp32", "cpu", 8192),
    ("cpu", "r1-distill-qwen-1.5b", "sglang", None, "UsageError", 0),
    ("cpu", "r1-distill-qwen-7b", "vllm", "fp32", "cpu", 8192),
    ("cpu", "r1-distill-qwen-7b", "sglang", None, "UsageError", 0),
    ("cpu", "r1-distill-qwen-14b", "vllm", None, "HardwareError", 0),
    ("cpu", "r1-distill-qwen-14b", "sglang", None, "UsageError", 0),
    ("cpu", "r1-distill-qwen-32b", "vllm", None, "HardwareError", 0),
    ("cpu", "r1-distill-qwen-32b", "sglang", None, "UsageError", 0),
    ("cpu", "r1-distill-llama-8b", "vllm", "fp32", "cpu", 8192),
    ("cpu", "r1-distill-llama-8b", "sglang", None, "UsageError", 0),
    ("cpu", "r1-distill-llama-70b", "vllm", None, "HardwareError", 0),
    ("cpu", "r1-distill-llama-70b", "sglang", None, "UsageError", 0),
    ("cpu", "smollm2-135m", "vllm", "fp32", "cpu", 8192),
    ("cpu", "smollm2-135m", "sglang", None, "UsageError", 0),
]


@pytest.mark.parametrize("where,model,engine,precision,device,ctx", EXPECTED_MORE,
                         ids=[f"{r[0]}-{r[1]}-{r[2]}" for r in EXPECTED_MORE])
def test_plan_matrix_gpu_engines_everywhere_else(where, model, engine, precision, device, ctx, tmp_path):
    from dsr1 import errors

    snapshot, profile = ("driver-missing", where) if where in ALL_PROFILES else (where, None)
    gpus, host, _ = probes_for(snapshot, tmp_path)
    if profile and plan.profiles.get(profile).requires.gpus:
        gpus = plan._virtual_gpus(plan.profiles.get(profile))
    GPU_BYTES[where] = min((g.memory_total for g in gpus.gpus), default=0)
    make = lambda: _plan(where, model, engine, tmp_path)  # noqa: E731
    if precision is None:
        with pytest.raises(getattr(errors, device)) as err:
            make()
        assert err.value.hint, str(err.value)
        return
    p = make()
    assert (p.precision, p.device, p.max_model_len) == (precision, device, ctx)
    if device == "cuda":
        _check_runnable(p, GPU_BYTES[where])
        return
    # vLLM's CPU build on a CPU machine: that build is the right one here, its command checked against it
    (node,) = p.nodes
    argv = list(node.argv)
    assert argv[0] == "/cpu-home/engines/vllm/venv/bin/python" and p.checked_against == "vllm 0.32.0 --help"
    assert int(node.env["VLLM_CPU_KVCACHE_SPACE"]) * 2**30 >= p.max_model_len * p.kv_bytes_per_token
    assert _arg(argv, "--dtype") == {"bf16": "bfloat16", "fp32": "float32"}[p.dtype]
    assert p.reasoning_parser == ("deepseek_r1" if "r1" in model else "none")
    i = argv.index("--model")
    VLLM_ARGVS.append([argv[i + 1], *argv[argv.index("-m") + 2:i], *argv[i + 2:]])


# --- the engines' own parsers, over every command the matrix above generated (run last) ---

def test_every_vllm_command_parses_with_vllms_own_parser():
    """The commands the matrix generated, through vLLM's make_arg_parser in its own environment."""
    assert VLLM_ARGVS, "run with the matrix (pytest collects it first in this module)"
    if not ENGINES_HOME:
        pytest.skip("set DSR1_TEST_ENGINES_HOME to a DSR1_HOME with vLLM installed (bash scripts/engines.sh)")
    found = envs.own("vllm", {"DSR1_HOME": ENGINES_HOME})
    assert found is not None, f"no vllm installed in DSR1_TEST_ENGINES_HOME={ENGINES_HOME} (bash scripts/engines.sh)"
    code = ("import json, sys\n"
            "from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args\n"
            "from vllm.utils.argparse_utils import FlexibleArgumentParser\n"
            "out = []\n"
            "for argv in json.load(sys.stdin):\n"
            "    p = make_arg_parser(FlexibleArgumentParser())\n"
            "    ns = p.parse_args(['--model', argv[0], *argv[1:]])\n"
            "    validate_parsed_serve_args(ns)\n"
            "    if ns.tool_call_parser:  # the parser class vLLM would run (raises for an unknown name)\n"
            "        from vllm.tool_parsers import ToolParserManager\n"
            "        ToolParserManager.get_tool_parser(ns.tool_call_parser)\n"
            "    out.append([ns.model, ns.tensor_parallel_size, ns.dtype, ns.quantization, ns.reasoning_parser,\n"
            "                ns.tool_call_parser, ns.enable_auto_tool_choice])\n"
            "print('PARSED ' + json.dumps(out))\n")
    res = subprocess.run([found.python, "-c", code], input=json.dumps(VLLM_ARGVS), capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    parsed = json.loads(re.search(r"^PARSED (.*)$", res.stdout, re.M).group(1))
    assert len(parsed) == len(VLLM_ARGVS)
    assert any(t for *_, t, _ in parsed), "some plans run a tool-call parser"
    for argv, (model, tp, dtype, quant, reasoning, tools, auto_tools) in zip(VLLM_ARGVS, parsed):
        assert model == argv[0] and (reasoning or None) == ("deepseek_r1" if "--reasoning-parser" in argv else None)
        assert tools == (_arg(argv, "--tool-call-parser") if "--tool-call-parser" in argv else None)
        assert auto_tools == bool(tools)  # vLLM refuses tool_choice "auto" without it
        assert tp == (int(_arg(argv, "--tensor-parallel-size")) if "--tensor-parallel-size" in argv else 1)
        assert dtype == _arg(argv, "--dtype") and quant == (_arg(argv, "--quantization") if "--quantization" in argv else None)


SGLANG_PARSE = """
import importlib.util, json, sys, types
if importlib.util.find_spec("triton") is None:  # imported by sglang's utils for one attribute; not needed to parse
    from torch.utils._triton import has_triton_package
    has_triton_package()
    sys.modules["triton"] = types.ModuleType("triton")
import argparse
import sglang
from sglang.srt.server_args import ServerArgs
out = []
for argv in json.load(sys.stdin):
    parser = argparse.ArgumentParser(prog="sglang.launch_server", allow_abbrev=False)
    ServerArgs.add_cli_args(parser)
    ns = parser.parse_args(argv)
    args = ServerArgs.from_cli_args(ns)
    out.append([args.model_path, args.tp_size, args.quantization, args.dtype, args.reasoning_parser,
                args.trust_remote_code, args.context_length, args.tool_call_parser])
print("SGLANG " + sglang.__version__ + " " + json.dumps(out))
"""


def test_every_sglang_command_parses_with_sglangs_own_parser():
    """The SGLang commands the matrix generated, through SGLang's ServerArgs parser (no abbreviations:
    every flag dsr1 writes must be one SGLang declares)."""
    assert SGLANG_ARGVS, "run with the matrix (pytest collects it first in this module)"
    env = Path(ENGINES_HOME or "/nonexistent") / "sglang-parser" / "bin" / "python"
    if not ENGINES_HOME:
        pytest.skip("set DSR1_TEST_ENGINES_HOME (bash scripts/engines.sh installs SGLang's parser environment)")
    assert env.is_file(), "no SGLang parser environment: bash scripts/sglang_parser.sh $DSR1_TEST_ENGINES_HOME/sglang-parser"
    res = subprocess.run([str(env), "-c", SGLANG_PARSE], input=json.dumps(SGLANG_ARGVS), capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    version, parsed = re.search(r"^SGLANG (\S+) (.*)$", res.stdout, re.M).groups()
    assert version == "0.5.23"
    parsed = json.loads(parsed)
    assert len(parsed) == len(SGLANG_ARGVS)
    # the tool-call parsers SGLang runs, read from its registry's source (importing it needs CUDA packages)
    source = next(env.parent.parent.glob("lib/python3*/site-packages/sglang/srt/function_call/function_call_parser.py"))
    registry = set(re.findall(r'^\s+"([\w.-]+)": \w+Detector,', source.read_text(), re.M))
    assert {"deepseekv3", "qwen", "llama3"} <= registry, registry
    assert any(p[-1] for p in parsed), "some plans run a tool-call parser"
    for argv, (model, tp, quant, dtype, reasoning, trust, ctx, tools) in zip(SGLANG_ARGVS, parsed):
        assert tools == (_arg(argv, "--tool-call-parser") if "--tool-call-parser" in argv else None)
        assert tools is None or tools in registry
        assert model == _arg(argv, "--model-path") and tp == int(_arg(argv, "--tp-size"))
        assert quant == (_arg(argv, "--quantization") if "--quantization" in argv else None)
        assert dtype == _arg(argv, "--dtype") and ctx == int(_arg(argv, "--context-length"))
        assert reasoning == (_arg(argv, "--reasoning-parser") if "--reasoning-parser" in argv else None)
        assert trust == ("--trust-remote-code" in argv)


@pytest.mark.parametrize("where", ["a100x2-sxm", "h100x4-sxm", "h100x8-ib", "rtx4090", "driver-missing", "base",
                                   "single-gpu", "cpu"])
def test_every_llama_server_command_uses_flags_its_help_lists(where, demo_gguf, tmp_path):
    """The GGUF the catalog has today (the demo's) on every machine: each flag of the llama-server command
    is one the real llama-server (built by `dsr1 engine install llamacpp`) lists in its --help."""
    binary = Path(ENGINES_HOME or "/nonexistent") / "engines" / "llamacpp" / "bin" / "llama-server"
    if not binary.is_file():
        pytest.skip("no llama-server in DSR1_TEST_ENGINES_HOME (bash scripts/engines.sh)")
    helptext = subprocess.run([str(binary), "--help"], capture_output=True, text=True, timeout=60).stdout
    known = set(re.findall(r"(?<![\w-])(--?[a-zA-Z][\w-]*)", helptext))
    snapshot, profile = ("driver-missing", where) if where in ALL_PROFILES else (where, None)
    gpus, host, _ = probes_for(snapshot, tmp_path)
    p = plan.make_plan(str(demo_gguf), profile, plan.Overrides(engine="llamacpp", engine_port=8100), gpus=gpus,
                       host=host, installed={}, interfaces=ITFS)
    (node,) = p.nodes
    flags = {a for a in node.argv[1:] if re.fullmatch(r"--?[a-zA-Z][\w-]*", a)}
    assert flags and flags <= known, flags - known
    assert _arg(node.argv, "-m") == str(demo_gguf) and int(_arg(node.argv, "-c")) >= p.max_model_len


@pytest.mark.parametrize("where", ["a100x2-sxm", "h100x4-sxm", "h100x8-ib", "base", "pro", "enterprise",
                                   "workstation", "cpu-large"])
def test_r1_gguf_plans_use_flags_the_real_llama_server_lists(where, tmp_path):
    """R1 671B as a dynamic-quant GGUF: every flag of the command (layer split, --n-cpu-moe, KV type,
    --fit off) is one the real llama-server lists in its --help, and the placement holds in memory."""
    binary = Path(ENGINES_HOME or "/nonexistent") / "engines" / "llamacpp" / "bin" / "llama-server"
    if not binary.is_file():
        pytest.skip("no llama-server in DSR1_TEST_ENGINES_HOME (bash scripts/engines.sh)")
    helptext = subprocess.run([str(binary), "--help"], capture_output=True, text=True, timeout=60).stdout
    known = set(re.findall(r"(?<![\w-])(--?[a-zA-Z][\w-]*)", helptext))
    snapshot, profile = ("driver-missing", where) if where in (*ALL_PROFILES, "workstation", "cpu-large") else (where, None)
    gpus, host, _ = probes_for(snapshot, tmp_path)
    p = plan.make_plan("r1", profile, plan.Overrides(engine="llamacpp", engine_port=8100), gpus=gpus, host=host,
                       installed={}, interfaces=ITFS)
    assert p.engine == "llamacpp" and p.gguf_quant.startswith("UD-")
    if p.device == "cuda":
        _check_gguf_plan(p, gpus, host, profile)
    flags = {a for a in p.nodes[0].argv[1:] if re.fullmatch(r"--?[a-zA-Z][\w-]*", a)}
    assert flags <= known, flags - known
    assert "--fit" in flags

