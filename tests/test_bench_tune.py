"""`dsr1 bench tune`: real `dsr1 serve` processes on the demo model, a real search under a budget,
a tuned profile that serve then uses, and an interrupted tune that resumes."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dsr1.errors import ConfigError, UsageError
from tests import interrupt

REPO = Path(__file__).resolve().parent.parent
SLO = "ttft_p99=5s,tpot_p99=400ms"  # loose: a busy 2-core CI machine must still meet it at low load
SMALL = ["--input-len", "32", "--output-len", "8", "--requests", "4"]


def dsr1(args: list[str], home: Path, timeout: float = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "DSR1_HOME": str(home)}
    env.pop("DSR1_API_KEY", None)
    return subprocess.run([sys.executable, "-m", "dsr1", *args], capture_output=True, text=True, env=env,
                          timeout=timeout)


def test_slo_and_budget_parsing():
    from dsr1.bench.tune import parse_budget, parse_slo

    assert parse_slo("ttft_p99=2s,tpot_p99=100ms") == {"ttft": (99, 2000.0), "tpot": (99, 100.0)}
    assert parse_slo("ttft_answer_p90=1.5s,e2el=10000") == {"ttft_answer": (90, 1500.0), "e2el": (99, 10000.0)}
    assert parse_budget("1h30m") == 5400 and parse_budget("90s") == 90 and parse_budget("120") == 120
    for bad in ("ttft_p98=2s", "latency=2s", "ttft_p99=fast", "tpot_p99=-1ms", ""):
        with pytest.raises(UsageError):
            parse_slo(bad)
    with pytest.raises(UsageError):
        parse_budget("soon")


def test_tuned_profile_validation_and_profiles_ignore_it(tmp_path, monkeypatch):
    from dsr1 import profiles, tuned

    monkeypatch.setenv("DSR1_HOME", str(tmp_path))
    t = tuned.Tuned(model="m", hardware="hw", settings={"engine": "embedded", "max_concurrent": 8})
    path = tuned.write(t, tuned.path_for("m", "hw"))
    assert tuned.load(path).settings == {"engine": "embedded", "max_concurrent": 8}
    assert tuned.find("m", "hw").path == str(path)
    assert "tuned-m-hw" not in profiles.load_all()  # not a hardware profile
    for settings, why in (({"engine": "ollama"}, "engine"), ({"max_concurrent": 0}, "at least 1"),
                          ({"max_concurrent": "8"}, "must be a int"), ({"batch": 4}, "not a setting")):
        path.write_text('model = "m"\nhardware = "hw"\n[settings]\n' +
                        "".join(f"{k} = {json.dumps(v)}\n" for k, v in settings.items()))
        with pytest.raises(ConfigError, match=why):
            tuned.load(path)


def test_a_candidates_cost_is_estimated_from_its_own_kind():
    """dsr1.bench.tune.estimate: the same engine and --compile; an unseen kind at the dearest so far."""
    from dsr1.bench.tune import Candidate, Result, estimate

    def done(c: Candidate, s: float) -> Result:
        return Result(c, 1.0, 1, [], s)

    emb, vllm = Candidate("embedded"), Candidate("vllm")
    compiled = emb.with_("compile", "on")
    assert estimate(emb, []) == 0.0  # nothing measured yet: the first candidate always starts
    history = [done(emb, 10.0), done(emb.with_("max_concurrent", 8), 14.0), done(vllm, 90.0)]
    assert estimate(emb.with_("prefill_chunk", 512), history) == 12.0  # not (10 + 14 + 90) / 3
    assert estimate(emb.with_("compile", "off"), history) == 12.0
    assert estimate(vllm.with_("max_concurrent", 8), history) == 90.0
    assert estimate(compiled, history) == 90.0  # not seen: the dearest so far
    assert estimate(compiled.with_("max_concurrent", 8), history + [done(compiled, 120.0)]) == 120.0
    assert estimate(Candidate("llamacpp"), history[:2]) == 14.0


def _engines_home() -> Path | None:
    home = os.environ.get("DSR1_TEST_ENGINES_HOME")
    return Path(home) if home and (Path(home) / "engines" / "vllm").is_dir() else None


@pytest.mark.slow
def test_tune_keeps_the_best_and_serve_uses_it(demo_model_dir, tmp_path):
    """Tuning the embedded engine (and vLLM's CPU build when the engine tests have it) under a small
    budget: the winner's goodput is at least every engine's defaults', the search skipped what did
    not fit the budget and said so, the tuned profile validates, and `dsr1 serve` applies it."""
    engines = ["embedded"]
    home = tmp_path / "home"
    home.mkdir()
    if _engines_home() and os.environ.get("DSR1_TEST_ENGINES"):
        (home / "engines").symlink_to(_engines_home() / "engines")  # installed engines, a private profiles dir
        engines.append("vllm")
    # an embedded candidate costs ~10-15 s on 2 cores, vLLM's defaults 70-130 s (its first start here
    # compiles): 180 s leaves room for both defaults and an embedded candidate or more, and --compile on
    # (guessed at the dearest so far) is skipped
    budget = 120 if engines == ["embedded"] else 180
    r = dsr1(["bench", "tune", str(demo_model_dir), "--slo", SLO, "--engine", ",".join(engines), "--budget", f"{budget}s",
              "--max-load", "4", *SMALL, "--json"], home)
    assert r.returncode == 0, r.stderr[-3000:]
    doc = json.loads(r.stdout)
    by_key = {x["key"]: x for x in doc["results"]}
    for e in engines:
        assert e in by_key, f"{e} at its defaults was not measured: {list(by_key)}"
        assert by_key[e]["score"] > 0, by_key[e]
        assert doc["best"]["score"] >= by_key[e]["score"]
    assert len(doc["results"]) >= len(engines) + 1  # at least one setting beyond the defaults was tried
    assert doc["skipped"] and all("budget" in s["why"] for s in doc["skipped"])
    # every candidate was started only where its kind's cost fitted: no overrun by more than noise
    assert doc["seconds"] <= budget * 1.15, (doc["seconds"], [(x["key"], x["seconds"]) for x in doc["results"]])
    assert all(lv["percentiles"]["ttft"] is not None for x in doc["results"] for lv in x["levels"])
    profile = Path(doc["tuned_profile"])
    assert profile.is_file() and profile.parent == home / "profiles"
    files = doc["files"]
    assert Path(files["report"]).read_text().count("|") > 10 and Path(files["plot"]).stat().st_size > 1000
    assert doc["command"].startswith(f"dsr1 serve {demo_model_dir} --engine {doc['best']['engine']}")

    from dsr1 import tuned

    t = tuned.load(profile)
    assert t.settings["engine"] == doc["best"]["engine"] and t.goodput == pytest.approx(doc["best"]["score"], 1e-3)
    plan = dsr1(["serve", str(demo_model_dir), "--dry-run", "--json"], home)
    assert plan.returncode == 0, plan.stderr
    shown = dsr1(["serve", str(demo_model_dir), "--dry-run"], home)  # --json keeps stderr quiet
    assert "tuned profile" in shown.stderr, shown.stderr
    dep = json.loads(plan.stdout)
    assert dep["engine"] == t.settings["engine"]
    assert dep["engine_reason"].startswith("tuned profile:") and "measured best" in dep["engine_reason"]
    if "max_concurrent" in t.settings:
        assert dep["max_num_seqs"] == t.settings["max_concurrent"]
    # a flag given on the command line wins, and --no-tuned ignores the profile
    mine = dsr1(["serve", str(demo_model_dir), "--dry-run", "--json", "--max-concurrent", "3", "--engine", "embedded"],
                home)
    assert json.loads(mine.stdout)["max_num_seqs"] == 3
    off = dsr1(["serve", str(demo_model_dir), "--dry-run", "--no-tuned"], home)
    assert off.returncode == 0 and "tuned profile" not in off.stderr


@pytest.mark.slow
def test_interrupted_tune_resumes(demo_model_dir, tmp_path):
    home = tmp_path / "home"
    out = tmp_path / "tune"
    args = [sys.executable, "-m", "dsr1", "bench", "tune", str(demo_model_dir), "--slo", SLO, "--engine", "embedded",
            "--budget", "10m", "--max-load", "2", *SMALL, "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "DSR1_HOME": str(home)}
    proc = interrupt.popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    state = out / "state.json"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if state.is_file() and len(json.loads(state.read_text())["results"]) >= 1:
            break
        time.sleep(0.5)
    assert proc.poll() is None, proc.communicate()[1][-3000:]
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    assert "run the same command again to resume" in err, err[-3000:]
    kept = json.loads(state.read_text())["results"]
    assert kept and kept[0]["key"] == "embedded"
    # the interrupted candidate's server is gone (the tune stopped it on its way out)
    again = dsr1(["bench", "tune", str(demo_model_dir), "--slo", SLO, "--engine", "embedded", "--budget", "45s",
                  "--max-load", "2", *SMALL, "--out", str(out)], home)  # not --json: it keeps stderr quiet
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resuming: {len(kept)} candidate(s)" in again.stderr, again.stderr[-3000:]
    assert not re.search(r"#\d+ embedded: starting", again.stderr)  # the defaults were not measured again
    after = json.loads(state.read_text())["results"]
    assert after[0] == kept[0] and after[0]["score"] > 0


def test_every_knob_is_a_declared_setting_its_engine_honours():
    """bench tune, tuned profiles and `dsr1 serve` read one declared set (dsr1.servesettings)."""
    from dsr1 import servesettings, tuned
    from dsr1.bench import tune

    for table in (tune.KNOBS, tune.CPU_KNOBS, tune.CUDA_KNOBS):
        for engine, knobs in table.items():
            for name, flag, values in knobs:
                s = servesettings.get(name)
                assert flag == s.flag and engine in s.engines and s.tunable, (engine, name)
                assert tuned.SETTINGS[name] is s.base_type
                assert all(v in s.choices for v in values) if s.choices else True


def test_serve_and_deployer_take_exactly_the_declared_settings():
    import inspect

    from dsr1 import launch, servesettings
    from dsr1.commands.serve import serve

    params = inspect.signature(serve).parameters
    for s in servesettings.SETTINGS:
        option = params[s.name].default
        assert option.default == s.default and option.help == s.help and params[s.name].annotation == s.type
    with pytest.raises(UsageError, match="unknown serve setting.*max_tokenz"):
        launch.settings("smollm2-135m", None, {"max_tokenz": 3}, use_tuned=False)
