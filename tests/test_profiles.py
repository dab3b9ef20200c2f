import pytest

from dsr1 import catalog, fit, profiles
from dsr1.errors import ConfigError, NotFoundError

SHIPPED = sorted(p.name for p in profiles.shipped_dir().glob("*.toml"))


@pytest.mark.parametrize("path", sorted(profiles.shipped_dir().glob("*.toml")), ids=lambda p: p.stem)
def test_every_shipped_profile_loads(path):
    p = profiles.load_file(path)
    assert p.name == path.stem
    assert catalog.find(p.settings.default_model)


@pytest.mark.parametrize("name", ["cpu", "small-gpu", "single-gpu", "base", "pro", "enterprise"])
def test_required_profiles_exist(name):
    assert profiles.get(name).name == name


@pytest.mark.parametrize("name", ["small-gpu", "single-gpu", "base", "pro", "enterprise"])
def test_profile_default_fits_its_own_minimum_hardware(name):
    # The data must be honest: what a profile proposes fits the weakest machine it accepts.
    p = profiles.get(name)
    r = p.requires
    target = fit.Target(kind="cuda", count=r.gpus, memory_bytes=int(r.gpu_memory_gb * 1e9 * 0.98),
                        utilization=p.settings.memory_utilization, engine=p.settings.engine,
                        supports_fp8=r.compute_capability >= 8.9)
    f = fit.estimate(catalog.get(p.settings.default_model), p.settings.precision, target, tp=p.settings.tensor_parallel)
    assert f.fits, f.reason
    assert f.max_context >= min(p.settings.context_length, catalog.get(p.settings.default_model).max_context)


def test_cpu_profile_default_fits_8gb():
    p = profiles.get("cpu")
    f = fit.estimate(catalog.get(p.settings.default_model), "bf16", fit.Target(kind="cpu", count=1, memory_bytes=8 * 10**9,
                                                                                 utilization=p.settings.memory_utilization))
    assert f.fits


def test_unknown_key_is_named_with_file(tmp_path):
    bad = tmp_path / "mine.toml"
    bad.write_text((profiles.shipped_dir() / "cpu.toml").read_text().replace("[settings]", "[settings]\nturbo = true"))
    with pytest.raises(ConfigError) as err:
        profiles.load_file(bad)
    assert str(bad) in str(err.value) and "turbo" in str(err.value) and "valid keys" in str(err.value)


def test_wrong_type_is_named(tmp_path):
    bad = tmp_path / "mine.toml"
    bad.write_text((profiles.shipped_dir() / "cpu.toml").read_text().replace("max_concurrent = 16", 'max_concurrent = "lots"'))
    with pytest.raises(ConfigError, match="max_concurrent.*integer"):
        profiles.load_file(bad)


def test_missing_field_is_named(tmp_path):
    bad = tmp_path / "mine.toml"
    bad.write_text((profiles.shipped_dir() / "cpu.toml").read_text().replace('engine = "embedded"\n', ""))
    with pytest.raises(ConfigError, match="missing required key 'engine'"):
        profiles.load_file(bad)


def test_user_profile_directory_is_loaded(isolated_home):
    d = isolated_home / "profiles"
    d.mkdir(parents=True)
    (d / "lab.toml").write_text((profiles.shipped_dir() / "cpu.toml").read_text().replace('name = "cpu"', 'name = "lab"').replace("rank = 0", "rank = 5"))
    assert "lab" in profiles.load_all()
    assert profiles.get("lab").rank == 5


def test_profile_by_path_and_unknown_name(tmp_path):
    assert profiles.get(str(profiles.shipped_dir() / "pro.toml")).name == "pro"
    with pytest.raises(NotFoundError, match="unknown profile"):
        profiles.get("platinum")


def test_selection_explains_higher_profiles():
    m = profiles.Machine(gpus=2, gpu_memory_gb=85.9, compute_capability=8.0, nvlink_gbps=600, infiniband=False, ram_gb=128)
    sel = profiles.select(m)
    assert sel.profile.name == "base"
    why = dict(sel.rejected)
    assert "needs 8 GPUs; found 2" in why["enterprise"]
    assert any("needs 4 GPUs" in g for g in why["pro"])
