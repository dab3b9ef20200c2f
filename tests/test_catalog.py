import pytest

from dsr1 import catalog
from dsr1.errors import ConfigError, NotFoundError

R1_FAMILY = {"r1", "r1-0528", "r1-distill-qwen-1.5b", "r1-distill-qwen-7b", "r1-distill-qwen-14b",
             "r1-distill-qwen-32b", "r1-distill-llama-8b", "r1-distill-llama-70b", "smollm2-135m"}


def test_catalog_has_every_r1_model():
    assert {m.name for m in catalog.models()} == R1_FAMILY


@pytest.mark.parametrize("spec", catalog.models(), ids=lambda s: s.name)
def test_derived_params_match_published_count(spec):
    # Published counts come from model cards; the derivation from config.json must agree within 1%.
    assert spec.total_params() / 1e9 == pytest.approx(spec.params_b, rel=0.01)
    if spec.params_total_b:
        assert spec.total_params(include_mtp=True) / 1e9 == pytest.approx(spec.params_total_b, rel=0.01)


@pytest.mark.parametrize("spec", catalog.models(), ids=lambda s: s.name)
def test_hub_size_matches_native_weights(spec):
    from dsr1 import fit

    precision = "fp8" if spec.native_dtype == "fp8" else "bf16"
    w = fit.weight_bytes(spec, precision, include_mtp=True).total
    assert w / 1e9 == pytest.approx(spec.hub_size_gb, rel=0.02)


def test_published_kv_figures():
    # R1 MLA: 61 x (512 + 64) x 2 B = 70,272 B/token (vLLM's layout); distills from the anchors table.
    assert catalog.get("r1").kv_bytes_per_token(2) == 70272
    assert catalog.get("r1-distill-qwen-1.5b").kv_bytes_per_token(2) == 28 * 1024
    assert catalog.get("r1-distill-qwen-7b").kv_bytes_per_token(2) == 56 * 1024
    assert catalog.get("r1-distill-qwen-14b").kv_bytes_per_token(2) == 192 * 1024
    assert catalog.get("r1-distill-qwen-32b").kv_bytes_per_token(2) == 256 * 1024
    assert catalog.get("r1-distill-llama-8b").kv_bytes_per_token(2) == 128 * 1024
    assert catalog.get("r1-distill-llama-70b").kv_bytes_per_token(2) == 320 * 1024


def test_kv_split_over_tensor_parallel():
    spec = catalog.get("r1-distill-qwen-1.5b")  # 2 KV heads
    assert spec.kv_bytes_per_token(2, tp=2) == spec.kv_bytes_per_token(2) / 2
    assert spec.kv_bytes_per_token(2, tp=4) == spec.kv_bytes_per_token(2, tp=2)  # replicated past 2 ranks
    r1 = catalog.get("r1")
    assert r1.kv_bytes_per_token(2, tp=8) == r1.kv_bytes_per_token(2)  # MLA latent replicated


def test_lookup_by_alias_and_repo():
    assert catalog.get("deepseek-r1").name == "r1"
    assert catalog.get("deepseek-ai/DeepSeek-R1-Distill-Qwen-7B").name == "r1-distill-qwen-7b"
    assert catalog.get("demo").name == "smollm2-135m"


def test_unknown_model_suggests_close_names():
    with pytest.raises(NotFoundError) as err:
        catalog.get("r1-distill-qwen-7")
    assert "r1-distill-qwen-7b" in err.value.hint


def test_unknown_key_in_catalog_file_is_named(tmp_path):
    bad = tmp_path / "models.toml"
    bad.write_text(catalog.CATALOG_PATH.read_text().replace('name = "r1"\n', 'name = "r1"\nlayerz = 3\n', 1))
    with pytest.raises(ConfigError, match=r"layerz.*valid keys"):
        catalog._load(bad)
