"""LoRA adapters end to end: adapters made with peft for the real demo model (random but fixed
weights, large enough to change greedy output), served by a real `dsr1 serve` beside the base
model, compared with peft's own generation; pull, merge and a wrong-base refusal."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest

from tests.serve_util import ServerProc

REPO = Path(__file__).resolve().parent.parent
PROMPTS = ["The capital of France is", "def fibonacci(n):"]
TOKENS = 16


def _make_adapter(base: Path, out: Path, seed: int, targets: list[str], r: int = 8) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    pm = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, lora_dropout=0.0))
    g = torch.Generator().manual_seed(seed)
    for name, p in pm.named_parameters():
        if "lora_" in name:  # peft starts B at zero (no change); these change greedy output
            p.data = torch.randn(p.shape, generator=g) * 0.05
    pm.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def adapters(demo_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    a = _make_adapter(demo_model_dir, root / "a", 1, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                       "up_proj", "down_proj"])
    b = _make_adapter(demo_model_dir, root / "b", 2, ["q_proj", "v_proj", "down_proj"], r=4)
    return {"a": a, "b": b}


def _peft_texts(base: Path, adapter: Path | None) -> list[str]:
    """Greedy continuations by transformers + peft in fp32: what the served adapter must match."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
    out = []
    with torch.no_grad():
        for p in PROMPTS:
            ids = tok(p, return_tensors="pt").input_ids
            gen = model.generate(input_ids=ids, max_new_tokens=TOKENS, do_sample=False)
            out.append(tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True))
    return out


def _dsr1(*args, home: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "DSR1_HOME": str(home)}
    return subprocess.run([sys.executable, "-m", "dsr1", *map(str, args)], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=600)


@pytest.mark.slow
def test_adapters_match_peft_and_share_batches_with_the_base_model(demo_model_dir, adapters, tmp_path):
    home = tmp_path / "home"
    # b goes through the store, as a user keeps adapters: pulled, checked against the base, served by name
    r = _dsr1("pull", adapters["b"], "--base", demo_model_dir, "--name", "adapter-b", "--json", home=home)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["kind"] == "lora"
    srv = ServerProc([str(demo_model_dir), "--served-model-name", "demo", "--dtype", "fp32", "--max-concurrent", "8",
                      "--lora", f"a={adapters['a']}", "--lora", "b=adapter-b"], home)
    try:
        c = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0)
        models = {m.id: m for m in c.models.list().data}
        assert set(models) == {"demo", "a", "b"}
        assert models["a"].model_extra["parent"] == "demo"

        def complete(model: str, prompt: str) -> str:
            resp = c.completions.create(model=model, prompt=prompt, max_tokens=TOKENS, temperature=0)
            assert resp.model == model
            return resp.choices[0].text

        jobs = [(m, p) for m in ("demo", "a", "b") for p in PROMPTS]
        alone = {job: complete(*job) for job in jobs}
        with ThreadPoolExecutor(len(jobs) * 2) as pool:  # every job twice, all at once: mixed batches
            together = list(pool.map(lambda job: (job, complete(*job)), jobs + jobs))
        for job, text in together:
            assert text == alone[job], f"{job} differs in a mixed batch"
        expected = {"demo": _peft_texts(demo_model_dir, None), "a": _peft_texts(demo_model_dir, adapters["a"]),
                    "b": _peft_texts(demo_model_dir, adapters["b"])}
        for (m, p), text in alone.items():
            assert text == expected[m][PROMPTS.index(p)], (m, p)
        assert alone[("a", PROMPTS[0])] != alone[("demo", PROMPTS[0])] != alone[("b", PROMPTS[0])]
        with pytest.raises(openai.NotFoundError) as e:
            complete("c", PROMPTS[0])
        assert "'a'" in str(e.value) and "'b'" in str(e.value)
    finally:
        srv.stop()


@pytest.mark.slow
def test_adapters_ride_in_the_compiled_step(tiny_model_factory, tmp_path, monkeypatch):
    """Adapters loaded before the step is compiled ahead of time (dsr1.serve.aotstep) are frozen into the
    package with each row's adapter id as its input: a batch of any mix of adapters, and its prompts, take
    the compiled step and give the eager forward's logits. bf16, where the CPU's GEMM template packs
    every matrix (the adapters' included) and torch's constant names collided: rows with an adapter then
    read the q/k/v weight as their adapter (aotstep._unique_constant_names). A tiny random Llama: the
    check is compiled against eager on the same weights, and a package compiled in ~30 s."""
    import torch

    from dsr1 import lora
    from dsr1.serve.engine import EmbeddedModel

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    base = tiny_model_factory("llama")
    a = _make_adapter(base, tmp_path / "a", 1, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                "down_proj"])
    b = _make_adapter(base, tmp_path / "b", 2, ["q_proj", "v_proj", "down_proj"], r=4)
    m = EmbeddedModel(base, dtype=torch.bfloat16)
    for x in (a, b):
        m.load_adapter(lora.read(x))
    cache = m.make_cache(3, 64)
    m.fast.enable_compile(store=tmp_path / "compiled")
    with pytest.raises(ValueError, match="before the decode step is compiled"):
        m.fast.add_adapter(m.adapters[0])
    m.fast.warm_up(cache)
    assert m.fast.lora_compiled
    calls = []
    package = m.fast._aot
    m.fast._aot = lambda *args: calls.append(args[-1].tolist()) or package(*args)  # the rows' adapter ids

    def compiled_and_eager(run):
        m.fast.row_timings, m.fast.compiled_rows, m.fast.prompt_compiled = {}, 3, True
        compiled = run()
        m.fast.compiled_rows, m.fast.prompt_compiled = 0, False
        return compiled, run()

    prompts, adapters = [[5, 6, 7, 8, 9], [10, 11, 12], [13, 14, 15, 16]], [0, 1, 2]
    for run in (lambda: m.prefill_rows(cache, 0, prompts, adapters),
                lambda: m.decode(cache, [17, 18, 19], [len(p) for p in prompts], adapters),
                lambda: m.decode(cache, [19, 17, 18], [len(p) for p in prompts], [2, 0, 1])):
        compiled, eager = compiled_and_eager(run)
        off = (compiled - eager).abs().max()
        assert off <= 0.02 * eager.abs().max(), off
    # what the adapters change is far more than compiled and eager differ by
    base_rows = m.decode(cache, [19, 17, 18], [len(p) for p in prompts], [0, 0, 0])
    assert (base_rows - eager)[[0, 2]].abs().amax(-1).min() > 5 * off
    assert (base_rows - eager)[1].abs().max() <= 0.02 * eager.abs().max()  # row 1 is the base model's
    assert calls == [[0, 1, 2], [0, 1, 2], [2, 0, 1]]


def test_an_adapter_for_another_base_is_refused(demo_model_dir, tiny_model_factory, tmp_path):
    wrong = _make_adapter(tiny_model_factory("llama"), tmp_path / "wrong", 3, ["q_proj", "v_proj"])
    r = _dsr1("pull", wrong, "--base", demo_model_dir, home=tmp_path / "home")
    assert r.returncode == 3, r.stderr
    assert "does not fit base model" in r.stderr and "fix:" in r.stderr
    assert not (tmp_path / "home" / "models" / "wrong" / "manifest.json").exists()
    r = _dsr1("serve", demo_model_dir, "--lora", f"w={wrong}", "--port", "0", home=tmp_path / "home")
    assert r.returncode == 3 and "does not fit base model" in r.stderr, r.stderr
    r = _dsr1("serve", demo_model_dir, "--lora", "nonsense", "--port", "0", home=tmp_path / "home")
    assert r.returncode == 2 and "NAME=ADAPTER" in r.stderr


@pytest.mark.slow
def test_merge_lora_writes_a_model_that_generates_like_the_adapter(demo_model_dir, adapters, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    r = _dsr1("pull", adapters["a"], "--base", demo_model_dir, "--merge-lora", "--name", "merged", "--json",
              home=tmp_path / "home")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["kind"] == "model"
    merged_dir = Path(out["model_dir"])
    assert not list(merged_dir.glob("adapter_*")) and list(merged_dir.glob("*.safetensors"))
    tok = AutoTokenizer.from_pretrained(merged_dir)
    ids = tok(PROMPTS[0], return_tensors="pt").input_ids
    with torch.no_grad():
        merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32)(ids).logits[0, -1]
        base = AutoModelForCausalLM.from_pretrained(demo_model_dir, dtype=torch.float32)
        plain = base(ids).logits[0, -1]
        adapted = PeftModel.from_pretrained(base, adapters["a"])(ids).logits[0, -1]
    # the merged weights are stored in the base's bf16: the output is the adapter's, up to that rounding
    assert merged.argmax() == adapted.argmax() != plain.argmax()
    assert (merged - adapted).abs().max() < 0.1 * (adapted - plain).abs().max()

def test_vllm_and_sglang_get_their_own_lora_flags(demo_model_dir, demo_gguf, adapters, tmp_path):
    # SGLang runs on CUDA only: planned for the `pro` profile's GPUs (a virtual plan)
    for engine, extra, flags in (("vllm", [], ["--enable-lora", "--lora-modules", f"a={adapters['a']}",
                                               "--max-lora-rank", "8", "--max-loras", "1"]),
                                 ("sglang", ["--profile", "pro"], ["--enable-lora", "--lora-paths", f"a={adapters['a']}",
                                                                   "--max-lora-rank", "8"])):
        r = _dsr1("serve", demo_model_dir, "--engine", engine, *extra, "--lora", f"a={adapters['a']}", "--dry-run",
                  "--json", home=tmp_path / "home")
        assert r.returncode == 0, r.stderr
        argv = json.loads(r.stdout)["nodes"][0]["argv"]
        i = argv.index(flags[0])
        assert argv[i : i + len(flags)] == flags, argv
    # llama-server: the peft adapter as the GGUF llama.cpp's converter makes of it at start, loaded at scale 0
    r = _dsr1("serve", demo_gguf, "--engine", "llamacpp", "--lora", f"a={adapters['a']}", "--dry-run", "--json",
              home=tmp_path / "home")
    assert r.returncode == 0, r.stderr
    argv = json.loads(r.stdout)["nodes"][0]["argv"]
    gguf = argv[argv.index("--lora") + 1]
    assert gguf.startswith(str(tmp_path / "home" / "cache" / "lora-gguf")) and gguf.endswith(".gguf")
    assert "--lora-init-without-apply" in argv
    # a file that is not a GGUF adapter, and a peft adapter whose base config is nowhere, are refused
    (tmp_path / "x.gguf").write_bytes(b"GGUF" + bytes(60))
    r = _dsr1("serve", demo_gguf, "--engine", "llamacpp", "--lora", f"a={tmp_path / 'x.gguf'}", "--dry-run",
              home=tmp_path / "home")
    assert r.returncode == 2 and "not a GGUF LoRA adapter" in r.stderr, r.stderr
    orphan = tmp_path / "orphan"
    shutil.copytree(adapters["a"], orphan)
    cfg = json.loads((orphan / "adapter_config.json").read_text())
    (orphan / "adapter_config.json").write_text(json.dumps({**cfg, "base_model_name_or_path": "/nowhere/base"}))
    r = _dsr1("serve", demo_gguf, "--engine", "llamacpp", "--lora", f"a={orphan}", "--dry-run",
              home=tmp_path / "home")
    assert r.returncode == 2 and "base model's config.json" in r.stderr, r.stderr


def test_pull_an_adapter_from_the_hub(demo_model_dir, adapters, tmp_path, monkeypatch):
    """The hub path (tests/fakehub.py, the real huggingface_hub client on 127.0.0.1): the adapter's
    files are downloaded, verified, checked against the base and stored as an adapter."""
    from tests.fakehub import FakeHub

    hub = FakeHub().start()
    try:
        files = {p.name: p.read_bytes() for p in adapters["b"].iterdir() if p.is_file()}
        files["README.md"] = b"# an adapter"
        hub.add_repo("someone/sql-lora", files)
        home = tmp_path / "home"
        monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
        monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
        r = _dsr1("pull", "someone/sql-lora", "--base", demo_model_dir, "--json", home=home)
        assert r.returncode == 0, r.stderr
        out = json.loads(r.stdout)
        assert out["kind"] == "lora" and out["name"] == "sql-lora"
        m = json.loads((home / "models" / "sql-lora" / "manifest.json").read_text())
        assert sorted(f["path"] for f in m["files"]) == ["adapter_config.json", "adapter_model.safetensors"]
        assert m["lora_base"] == str(demo_model_dir) and m["repo_id"] == "someone/sql-lora"
        assert _dsr1("verify", "sql-lora", home=home).returncode == 0
    finally:
        hub.stop()
