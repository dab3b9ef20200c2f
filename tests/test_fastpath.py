"""The embedded engine's fast path, prefix cache and speculative decoding leave greedy output unchanged.

Everything runs on the real demo model in fp32 (bf16 rounding could legitimately flip a near-tie,
fp32 must not): the transformers forward is the reference; the lean forward, its compiled form,
multi-token verify, prefix-cache loads and n-gram speculation must give the same tokens. The
server tests run real `dsr1 serve` processes and the official openai client.
"""

from __future__ import annotations

import concurrent.futures as cf
import re

import httpx
import openai
import pytest
import torch

from tests.serve_util import ServerProc

PROMPTS = ["The capital of France is", "def fibonacci(n):\n    ", "Once upon a time, in a land far away,"]


@pytest.fixture(scope="module")
def fp32_models(demo_model_dir):
    from dsr1.serve.engine import EmbeddedModel

    ref = EmbeddedModel(demo_model_dir, dtype=torch.float32, fast_path=False)
    fast = EmbeddedModel(demo_model_dir, dtype=torch.float32)
    return ref, fast


def _greedy(model, cache, prompts, steps):
    logits = model.prefill_rows(cache, 0, prompts)
    out = [[t] for t in logits.argmax(-1).tolist()]
    lens = [len(p) for p in prompts]
    for i in range(steps):
        step = model.decode(cache, [o[-1] for o in out], [n + i for n in lens])
        for o, t in zip(out, step.argmax(-1).tolist()):
            o.append(t)
    return out


def test_fast_forward_matches_transformers_token_for_token(fp32_models):
    ref, fast = fp32_models
    prompts = [ref.tokenizer(p)["input_ids"] for p in PROMPTS]
    want = _greedy(ref, ref.make_cache(3, 256), prompts, 40)
    cache = fast.make_cache(3, 256)
    assert ref.path == "transformers" and fast.path == "fast"
    assert _greedy(fast, cache, prompts, 40) == want
    # a prompt in two chunks (the path long prompts and prefix-cache hits take) gives the same logits
    p = prompts[2]
    a = ref.prefill(ref.make_cache(1, 256), 0, p, 0)
    fast.prefill(cache, 0, p[:5], 0)
    b = fast.prefill(cache, 0, p[5:], 5)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_verify_gives_the_greedy_choice_at_every_drafted_position(fp32_models):
    ref, fast = fp32_models
    prompts = [ref.tokenizer(p)["input_ids"] for p in PROMPTS]
    want = _greedy(ref, ref.make_cache(3, 256), prompts, 12)
    cache = fast.make_cache(3, 256)
    fast.prefill_rows(cache, 0, prompts)
    # rows of different lengths: the true continuation as the draft (row 1 only 2 of it)
    rows = [want[0][:6], want[1][:3], want[2][:6]]
    logits = fast.verify(cache, rows, [len(p) for p in prompts])
    best = logits.argmax(-1).tolist()
    for r, row in enumerate(rows):
        assert best[r][: len(row)] == want[r][1 : len(row) + 1]


def test_compiled_decode_matches_transformers(demo_model_dir, fp32_models, tmp_path, monkeypatch):
    from dsr1.serve.engine import EmbeddedModel

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    ref, _ = fp32_models
    m = EmbeddedModel(demo_model_dir, dtype=torch.float32)
    cache = m.make_cache(3, 256)
    m.fast.enable_compile()
    m.fast.warm_up(cache)
    assert m.path == "compiled" and m.fast.compile_seconds > 0
    prompts = [ref.tokenizer(p)["input_ids"] for p in PROMPTS]
    want = _greedy(ref, ref.make_cache(3, 256), prompts, 24)
    assert _greedy(m, cache, prompts, 24) == want
    assert _greedy(m, m.make_cache(1, 256), prompts[:1], 24) == want[:1]  # batch 1: its own variant


def test_prefix_cache_blocks_round_trip(fp32_models):
    """Blocks stored from one row load into another and give the same next-token logits as
    computing the prompt; a changed token in a block stops the match there."""
    from dsr1.serve.prefixcache import PrefixCache

    _, fast = fp32_models
    cache = fast.make_cache(2, 512)
    pc = PrefixCache(fast.layers, fast.kv_heads, fast.head_dim, fast.dtype, fast._layer_devices(),
                     budget_bytes=64 * 2**20, block=16)
    prompt = fast.tokenizer("You are a careful assistant. " * 12)["input_ids"][:100]
    want = fast.prefill(cache, 0, prompt, 0)
    pc.store(cache, 0, prompt)
    hits = pc.match(prompt)
    assert len(hits) == (len(prompt) - 1) // 16  # at least one token left to compute
    n = pc.load(cache, 1, hits, len(prompt))
    got = fast.prefill(cache, 1, prompt[n:], n)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    changed = prompt[:40] + [prompt[40] + 1] + prompt[41:]
    assert len(pc.match(changed)) == 40 // 16
    assert pc.hit_rate() == n / len(prompt)


def test_ngram_proposer_drafts_what_followed_the_last_occurrence():
    from dsr1.serve.speculative import NgramProposer

    class R:
        prompt_ids = [1, 2, 3, 4, 5, 9, 9, 2, 3]
        out_ids: list[int] = []
        spec_state = None

    r = R()
    p = NgramProposer(k=3)
    assert p.propose(r, 10) == [4, 5, 9]  # "2 3" was followed by 4 5 9
    r.out_ids = [4]
    assert p.propose(r, 2) == [5, 9]  # "2 3 4" -> 5 9, limited to 2
    r.out_ids = [4, 7]
    assert p.propose(r, 10) == []  # "7" never seen before


def client(srv: ServerProc) -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=300)


def _metric(url: str, name: str) -> float:
    text = httpx.get(url + "/metrics").text
    m = re.search(rf"^{name} ([0-9.e+-]+)$", text, re.M)
    assert m, f"{name} not in /metrics"
    return float(m.group(1))


SYSTEM = ("Answer briefly. Repeat the key facts of the question in your answer. " * 8).strip()
QUESTIONS = ["What is the capital of France? The capital of France is", "List three colours: red, green,",
             "Count: one, two, three, four,", "Water boils at"]


def _common(model_dir) -> list[str]:
    return [str(model_dir), "--dtype", "fp32", "--max-concurrent", "4", "--max-model-len", "1024"]


def _run(srv, sampled: bool = False) -> list[str]:
    """Greedy completions: four at once, then one at a time (each after the first hits the
    prefix). `sampled`: a seeded sampling request runs beside the concurrent ones, so greedy
    rows share their batch with a row that is not drafted for."""
    c = client(srv)
    out = []
    name = c.models.list().data[0].id

    def ask(q):
        r = c.completions.create(model=name, prompt=f"{SYSTEM}\n{q}", max_tokens=40, temperature=0)
        return r.choices[0].text

    def sample():
        return c.completions.create(model=name, prompt="Tell me a story.", max_tokens=30, temperature=0.8,
                                    seed=7).choices[0].finish_reason

    with cf.ThreadPoolExecutor(5) as ex:
        side = ex.submit(sample) if sampled else None
        out += list(ex.map(ask, QUESTIONS))
        if side is not None:
            assert side.result() in ("stop", "length")
    out += [ask(q) for q in QUESTIONS]
    return out


@pytest.fixture(scope="module")
def reference_outputs(demo_model_dir, tmp_path_factory) -> list[str]:
    """What the transformers forward with nothing extra answers."""
    ref = ServerProc([*_common(demo_model_dir), "--no-fast-path", "--compile", "off", "--prefix-cache-mb", "0"],
                     tmp_path_factory.mktemp("ref"))
    try:
        return _run(ref)
    finally:
        assert ref.stop() == 0


def test_serve_options_leave_greedy_output_unchanged(demo_model_dir, reference_outputs, tmp_path):
    """A server with every option on (fast path, compiled decode, prefix cache, n-gram
    speculation) gives the reference's greedy text for concurrent requests and for requests
    sharing a long prefix; the hit rate and the acceptance rate are on /metrics."""
    common = _common(demo_model_dir)
    run, want = _run, reference_outputs
    fast = ServerProc([*common, "--compile", "on", "--prefix-cache-mb", "64", "--speculative", "ngram"],
                      tmp_path / "b", timeout=600)
    try:
        assert any("forward    compiled" in line for line in fast.lines), "".join(fast.lines)
        # inductor's autotune tables (written to stderr while compiling) stay off the console
        assert not any(line.startswith(("AUTOTUNE", "SingleProcess AUTOTUNE")) for line in fast.lines), \
            "".join(fast.lines)
        got = run(fast)
        assert got == want
        assert _metric(fast.url, "dsr1_kv_cache_hit_rate") > 0.3  # 4 misses arriving together, then 4 hits
        assert _metric(fast.url, "dsr1_spec_decode_draft_tokens_total") > 0
        assert 0 < _metric(fast.url, "dsr1_spec_decode_acceptance_rate") <= 1
    finally:
        assert fast.stop() == 0


def test_draft_model_speculation_is_greedy_exact(demo_model_dir, demo_draft_dir, reference_outputs, tmp_path):
    """`--speculative draft` with a 6-layer draft of the demo model: the reference's greedy text,
    with a sampled request sharing the batch (not drafted for) and rows finishing at different
    times (the draft's cache moves with the target's rows); acceptance on /metrics."""
    srv = ServerProc([*_common(demo_model_dir), "--speculative", "draft", "--draft-model", str(demo_draft_dir),
                      "--num-speculative-tokens", "3"], tmp_path / "d")
    try:
        assert any("speculative" in line and "draft" in line for line in srv.lines), "".join(srv.lines)
        assert _run(srv, sampled=True) == reference_outputs
        assert _metric(srv.url, "dsr1_spec_decode_draft_tokens_total") > 0
        assert 0 < _metric(srv.url, "dsr1_spec_decode_acceptance_rate") <= 1
    finally:
        assert srv.stop() == 0


def test_draft_model_errors_are_actionable(demo_model_dir, tmp_path):
    import os
    import subprocess
    import sys

    env = {**os.environ, "DSR1_HOME": str(tmp_path)}

    def serve(*args):
        return subprocess.run([sys.executable, "-m", "dsr1", "serve", str(demo_model_dir), *args], capture_output=True,
                              text=True, env=env, timeout=120)

    r = serve("--speculative", "draft")
    assert r.returncode == 2 and "--draft-model" in r.stderr, r.stderr
    r = serve("--draft-model", str(demo_model_dir))
    assert r.returncode == 2 and "--speculative draft" in r.stderr, r.stderr


def test_draft_proposer_drafts_at_most_k_tokens_and_tracks_its_cache(fp32_models, demo_draft_dir):
    """The scheduler passes the room each request has left (up to max_tokens); the draft model must
    still propose at most k tokens, and only catch up on what was accepted since (no re-prefill)."""
    from types import SimpleNamespace

    from dsr1.serve.engine import EmbeddedModel
    from dsr1.serve.speculative import DraftProposer

    _, target = fp32_models
    target.make_cache(1, 256)
    draft = EmbeddedModel(demo_draft_dir, dtype=torch.float32)
    prop = DraftProposer(draft, target, 1, 256, k=3)
    ids = target.tokenizer(PROMPTS[0])["input_ids"]
    r = SimpleNamespace(prompt_ids=ids, out_ids=[7], spec_state=None, slot=0)
    d = prop.propose_batch([r], [200])[0]
    assert 1 <= len(d) <= 3 and r.spec_state == len(ids) + 1
    r.out_ids += d[:1] + [9]  # one drafted token accepted, then the target's own
    assert len(prop.propose_batch([r], [2])[0]) == 2 and r.spec_state == len(ids) + 3
    assert prop.propose_batch([r], [0])[0] == []
