import pytest

from dsr1 import catalog, fit
from dsr1.errors import UsageError

GiB = fit.GiB
H100 = dict(kind="cuda", memory_bytes=80 * GiB, supports_fp8=True)


def test_r1_fp8_weights_are_about_688_gb():
    w = fit.weight_bytes(catalog.get("r1"), "fp8", include_mtp=True)
    assert w.total / 1e9 == pytest.approx(688, rel=0.01)


def test_full_r1_fp8_does_not_fit_one_8xh100_node_but_int4_does():
    node = fit.Target(count=8, engine="sglang", **H100)
    assert not fit.estimate(catalog.get("r1"), "fp8", node).fits
    int4 = fit.estimate(catalog.get("r1"), "int4", node)
    assert int4.fits and int4.max_context >= 32768


def test_full_r1_fp8_fits_8xh200():
    node = fit.Target(kind="cuda", count=8, memory_bytes=141 * 10**9, supports_fp8=True, engine="sglang")
    f = fit.estimate(catalog.get("r1"), "fp8", node)
    assert f.fits and f.max_sequences(32768) >= 1


def test_nf4_and_dq_bytes_per_weight():
    assert fit.LINEAR_BYTES["nf4"] * 8 == pytest.approx(4.5)
    assert fit.LINEAR_BYTES["nf4-dq"] * 8 == pytest.approx(4.127, abs=0.01)


def test_quantization_leaves_embeddings_in_16_bit():
    spec = catalog.get("r1-distill-qwen-1.5b")
    nf4 = fit.weight_bytes(spec, "nf4")
    assert nf4.embedding == spec.embedding_params() * 2
    assert nf4.linear == pytest.approx(spec.linear_params() * 0.5625)


def test_max_context_and_sequences_are_consistent():
    spec = catalog.get("r1-distill-qwen-7b")
    f = fit.estimate(spec, "bf16", fit.Target(count=1, **H100))
    assert f.fits
    n = f.max_sequences(8192)
    assert n >= 1
    # n sequences fit in the per-device budget, n + 1 do not
    assert f.memory_at(8192, n) <= f.budget_per_device < f.memory_at(8192, n + 1)


def test_tensor_parallel_halves_weights_per_device():
    spec = catalog.get("r1-distill-llama-70b")
    one = fit.estimate(spec, "bf16", fit.Target(count=4, **H100), tp=1)
    four = fit.estimate(spec, "bf16", fit.Target(count=4, **H100), tp=4)
    assert four.weights_per_device == pytest.approx(one.weights_per_device / 4)
    assert not one.fits and four.fits
    assert "weights need" in one.reason


def test_fp8_on_cpu_is_refused_with_reason():
    f = fit.estimate(catalog.get("r1-distill-qwen-1.5b"), "fp8", fit.Target(kind="cpu", count=1, memory_bytes=64 * GiB))
    assert not f.fits and "GPU" in f.reason


def test_unknown_precision_is_a_usage_error():
    with pytest.raises(UsageError, match="unknown precision"):
        fit.estimate(catalog.get("r1"), "int3", fit.Target(count=1, **H100))


def test_more_memory_never_fits_less():
    spec = catalog.get("r1-distill-qwen-14b")
    ctx = [fit.estimate(spec, "bf16", fit.Target(kind="cuda", count=1, memory_bytes=m * GiB)).max_context
           for m in (24, 40, 48, 80, 141)]
    assert ctx == sorted(ctx)
