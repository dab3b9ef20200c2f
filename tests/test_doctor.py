"""Doctor driven by recorded hardware snapshots (through FakeNvml, the one seam),
and for real on this machine (no GPU)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
from rich.console import Console

from dsr1 import doctor
from dsr1.commands.doctor import render
from dsr1.output import to_jsonable
from dsr1.probe.gpu import probe_gpus
from tests.fake_nvml import FakeNvml, load_snapshot
from tests.hardware import probes_for

REPO = Path(__file__).resolve().parent.parent
SCHEMA = json.loads((REPO / "dsr1/schemas/doctor.schema.json").read_text())


def run_snapshot(name, tmp_path, profile=None, snapshot=None):
    gpus, host, sw = probes_for(name, tmp_path, snapshot)
    return doctor.run(profile, gpus=gpus, host=host, software=sw)


def rec(report, model):
    return next(r for r in report.recommendations if r.model == model)


def text_of(report) -> str:
    c = Console(record=True, width=140)
    render(c, report)
    return c.export_text()


@pytest.mark.parametrize("name,profile", [("a100x2-sxm", "base"), ("h100x4-sxm", "pro"), ("h100x8-ib", "enterprise"),
                                          ("rtx4090", "single-gpu"), ("driver-missing", "cpu")])
def test_snapshot_picks_profile_and_validates(name, profile, tmp_path):
    report = run_snapshot(name, tmp_path)
    assert report.profile == profile
    jsonschema.validate(to_jsonable(report), SCHEMA)
    assert report.can_serve and report.next_command


def test_nvml_fields_read_through_the_seam(tmp_path):
    gpus = probe_gpus(nvml=FakeNvml(load_snapshot("h100x8-ib")))
    g = gpus.gpus[3]
    assert gpus.driver_version == "550.90.07" and gpus.cuda_driver_version == "12.4"
    assert g.compute_capability == "9.0" and g.pcie_gen_max == 5 and g.pcie_width_current == 16
    assert g.nvlink_active_links == 18 and g.nvlink_bandwidth_gbps == 900  # 18 x 25 GB/s x 2 directions
    assert g.fabric_state == "completed" and g.ecc_enabled and g.ecc_uncorrected_errors == 0
    assert g.power_w == 70 and g.power_limit_w == 700
    a100 = probe_gpus(nvml=FakeNvml(load_snapshot("a100x2-sxm"))).gpus[0]
    assert a100.nvlink_bandwidth_gbps == 600  # 12 links x 25 GB/s x 2


def test_enterprise_recommends_quantized_r1_not_fp8(tmp_path):
    report = run_snapshot("h100x8-ib", tmp_path)
    r1 = rec(report, "r1")
    assert r1.fits and r1.precision == "int4" and r1.tensor_parallel == 8
    # Next is dsr1's own front door; the SGLang command it runs is the plan's (tests/test_plan.py).
    assert report.next_command == "dsr1 serve r1"
    assert any("does NOT fit one 8x H100 node" in n for n in report.notes)
    assert report.machine.infiniband and len(report.host.infiniband) == 8
    assert report.host.infiniband[0].rate_gbps == 400


def test_base_explains_why_not_pro(tmp_path):
    report = run_snapshot("a100x2-sxm", tmp_path)
    why = {r["profile"]: r["unmet"] for r in report.rejected_profiles}
    assert "needs 4 GPUs; found 2" in why["pro"]
    assert "needs 8 GPUs; found 2" in why["enterprise"]
    # R1 671B: not at FP8 or 4 bits; as the largest dynamic-quant GGUF that fits, with llama.cpp
    r1 = rec(report, "r1")
    assert r1.fits and r1.engine == "llamacpp" and r1.repo == "unsloth/DeepSeek-R1-GGUF:UD-Q2_K_XL"
    assert rec(report, "r1-distill-qwen-32b").fits and rec(report, "r1-distill-qwen-32b").precision == "bf16"
    out = text_of(report)
    assert "not pro: needs 4 GPUs; found 2" in out and "Next:" in out


def test_rtx4090_warns_about_busy_gpu_and_quantizes_14b(tmp_path):
    report = run_snapshot("rtx4090", tmp_path)
    assert any(c.level == "warn" and "already hold 1.1 GB" in c.message for c in report.checks)
    assert rec(report, "r1-distill-qwen-7b").precision == "bf16"
    assert rec(report, "r1-distill-qwen-14b").precision in ("fp8", "int8", "nf4")
    assert not rec(report, "r1-distill-llama-70b").fits


def test_driver_missing_is_a_finding_with_a_fix_not_a_crash(tmp_path):
    report = run_snapshot("driver-missing", tmp_path)
    f = next(c for c in report.checks if c.check == "nvml")
    assert f.level == "fail" and "not loaded" in f.message and "modprobe" in f.fix
    assert report.profile == "cpu"


@pytest.mark.parametrize("code,words", [(12, "not found"), (18, "do not match"), (4, "no permission"), (15, "lost")])
def test_every_nvml_init_failure_has_a_fix(code, words):
    gpus = probe_gpus(nvml=FakeNvml({"nvml": {"init_error": code}}))
    assert not gpus.available and words in gpus.findings[0].message and gpus.findings[0].fix


def test_fabric_manager_missing_fails(tmp_path):
    snap = load_snapshot("h100x8-ib")
    for g in snap["nvml"]["gpus"]:
        g["fabric_state"] = 1
    report = run_snapshot("h100x8-ib", tmp_path, snapshot=snap)
    assert any(c.level == "fail" and "fabricmanager" in c.fix for c in report.checks)


def test_infiniband_down_port_warns(tmp_path):
    snap = load_snapshot("h100x8-ib")
    snap["host"]["infiniband"][0]["state"] = "1: DOWN"
    report = run_snapshot("h100x8-ib", tmp_path, snapshot=snap)
    assert any(c.check == "infiniband" and "DOWN" in c.message for c in report.checks)


def test_requested_profile_for_other_hardware_is_planned_on_that_hardware(tmp_path):
    """--profile enterprise on 2xA100: the gaps are said, and the rows are the plans `dsr1 serve MODEL
    --profile enterprise --dry-run` makes for the profile's 8 GPUs; Next repeats the profile."""
    report = run_snapshot("a100x2-sxm", tmp_path, profile="enterprise")
    assert report.profile == "enterprise" and report.profile_source == "virtual"
    assert any(c.check == "profile" and "needs 8 GPUs" in c.message and c.level == "info" for c in report.checks)
    assert report.can_serve and report.next_command == "dsr1 serve r1 --profile enterprise"
    r1 = rec(report, "r1")
    assert (r1.fits, r1.precision, r1.repo, r1.engine, r1.tensor_parallel) == \
        (True, "int4", "cognitivecomputations/DeepSeek-R1-AWQ", "sglang", 8)
    jsonschema.validate(to_jsonable(report), SCHEMA)


@pytest.mark.parametrize("snapshot", ["a100x2-sxm", "h100x4-sxm", "h100x8-ib", "rtx4090", "driver-missing"])
def test_every_row_is_the_plan_serve_makes(snapshot, tmp_path):
    from dsr1 import catalog, plan

    report = run_snapshot(snapshot, tmp_path)
    gpus, host, _ = probes_for(snapshot, tmp_path)
    for spec in catalog.models():
        r = rec(report, spec.name)
        try:
            p = plan.make_plan(spec.name, None, plan.Overrides(engine_port=1), gpus=gpus, host=host)
        except Exception as exc:  # the row says it does not fit, with the same message
            assert not r.fits and str(exc) in r.reason, (spec.name, r.reason)
            continue
        assert (r.engine, r.precision, r.tensor_parallel, r.pipeline_parallel, r.data_parallel, r.context,
                r.max_sequences, r.sequences_at_full_context) == \
            (p.engine, p.gguf_quant or p.precision, p.tensor_parallel, p.pipeline_parallel, p.data_parallel, p.max_model_len,
             p.max_num_seqs, p.sequences_at_full_context), spec.name
        assert r.repo == (p.checkpoint or p.model_path)


def _dsr1(*args, env=None):
    e = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run([sys.executable, "-m", "dsr1", *args], capture_output=True, text=True, env=e, timeout=120)


def test_doctor_on_this_machine_picks_cpu():
    res = _dsr1("doctor", "--json")
    assert res.returncode == 0, res.stderr
    data = json.loads(res.stdout)
    jsonschema.validate(data, SCHEMA)
    assert data["profile"] == "cpu" and data["machine"]["gpus"] == 0
    fits = {r["model"] for r in data["recommendations"] if r["fits"]}
    assert "r1-distill-qwen-1.5b" in fits and "r1" not in fits
    assert data["next_command"] == "dsr1 serve r1-distill-qwen-1.5b"  # serve pulls what is not stored yet


def test_doctor_human_report_names_distills_and_next_command():
    res = _dsr1("doctor", env={"COLUMNS": "160"})
    assert res.returncode == 0, res.stderr
    assert "Profile  cpu" in res.stdout and "r1-distill-qwen-1.5b" in res.stdout and "Next:" in res.stdout


def test_doctor_into_a_pipe_is_wide_enough_for_one_line_rows():
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    res = subprocess.run([sys.executable, "-m", "dsr1", "doctor"], capture_output=True, text=True, timeout=120,
                         env={**env, "PYTHONPATH": str(REPO)})
    assert res.returncode == 0, res.stderr
    rows = [line for line in res.stdout.splitlines() if "r1-distill-qwen-1.5b" in line and "│" in line]
    assert rows and "GB" in rows[0]  # the memory column is not folded onto a second line
    assert max(len(line) for line in res.stdout.splitlines()) <= 120


def test_doctor_exit_code_when_nothing_fits(isolated_home):
    # A CPU profile demanding more RAM than this machine has: doctor says so and exits 5.
    (isolated_home / "profiles").mkdir(parents=True, exist_ok=True)
    (isolated_home / "profiles" / "bigcpu.toml").write_text(
        (REPO / "profiles" / "cpu.toml").read_text().replace('name = "cpu"', 'name = "bigcpu"')
        .replace("ram_gb = 8", "ram_gb = 100000"))
    res = _dsr1("doctor", "--profile", "bigcpu", "--json")
    assert res.returncode == 5, res.stderr
    data = json.loads(res.stdout)
    assert data["can_serve"] is False and data["profile_source"] == "requested"
    assert any(c["check"] == "profile" and c["level"] == "fail" for c in data["checks"])


def test_doctor_rows_equal_serve_dry_run_on_this_machine():
    """doctor = serve, end to end through both commands on this machine."""
    doc = _dsr1("doctor", "--json")
    assert doc.returncode == 0, doc.stderr
    for row in json.loads(doc.stdout)["recommendations"]:
        res = _dsr1("serve", row["model"], "--dry-run", "--json")
        if not row["fits"]:
            assert res.returncode != 0 or "does not fit" in res.stdout, row["model"]
            continue
        assert res.returncode == 0, res.stderr
        p = json.loads(res.stdout)
        assert (row["engine"], row["precision"], row["tensor_parallel"], row["data_parallel"], row["context"],
                row["max_sequences"]) == (p["engine"], p["precision"], p["tensor_parallel"], p["data_parallel"],
                                          p["max_model_len"], p["max_num_seqs"]), row["model"]


def test_models_json_lists_catalog_with_fit():
    res = _dsr1("models", "--json")
    assert res.returncode == 0, res.stderr
    data = json.loads(res.stdout)
    names = {m["name"] for m in data["models"]}
    assert "r1-distill-llama-70b" in names
    r1 = next(m for m in data["models"] if m["name"] == "r1")
    assert r1["kv_bytes_per_token_bf16"] == 70272 and r1["fit"]["fits"] is False


@pytest.mark.parametrize("v2", [True, False])
def test_available_ram_is_bounded_by_the_cgroup(tmp_path, v2):
    """`dsr1 serve` sizes its CPU KV cache from this: inside a container psutil shows the
    host's free RAM, the cgroup what this process may still take (a /sys tree as files)."""
    import psutil

    from dsr1.probe.host import available_ram

    assert available_ram(tmp_path) == pytest.approx(psutil.virtual_memory().available, rel=0.05)  # no cgroup files
    d = tmp_path / ("sys/fs/cgroup" if v2 else "sys/fs/cgroup/memory")
    d.mkdir(parents=True)
    (d / ("memory.max" if v2 else "memory.limit_in_bytes")).write_text(f"{2 * 2**30}\n")
    (d / ("memory.current" if v2 else "memory.usage_in_bytes")).write_text(f"{2**30 + 2**29}\n")
    assert available_ram(tmp_path) == 2**29


def test_h100x8_next_line_is_a_runnable_plan(tmp_path):
    """The enterprise node's Next line is `dsr1 serve r1`, and the plan behind it loads a checkpoint that fits
    8x 80 GB (the 340 GB AWQ one, with SGLang's moe_wna16 flag), not the 688 GB FP8 repository."""
    from dsr1 import plan

    report = run_snapshot("h100x8-ib", tmp_path)
    assert report.next_command == "dsr1 serve r1"
    gpus, host, _ = probes_for("h100x8-ib", tmp_path)
    p = plan.make_plan("r1", None, plan.Overrides(engine_port=1), gpus=gpus, host=host)
    assert (p.engine, p.precision, p.checkpoint, p.quantization) == \
        ("sglang", "int4", "cognitivecomputations/DeepSeek-R1-AWQ", "moe_wna16")
    assert p.weights_bytes_per_device * p.tensor_parallel >= 340e9
    r1 = rec(report, "r1")
    assert (r1.engine, r1.precision, r1.repo) == (p.engine, p.precision, p.checkpoint)
