"""The embedded engine's fast path, prefix cache and speculative decoding leave greedy output unchanged.

Everything runs on the real demo model in fp32 (bf16 rounding could legitimately flip a near-tie,
fp32 must not): the transformers forward is the reference; the lean forward, its compiled form,
multi-token verify, prefix-cache loads and n-gram speculation must give the same tokens. The
server tests run real `dsr1 serve` processes and the official openai client.
"""

from __future__ import annotations

import concurrent.futures as cf
import re
import shutil
import time

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


def test_compiled_decode_matches_transformers(demo_draft_dir, tmp_path, monkeypatch):
    """The step compiled just in time (torch.compile: no store, or a GPU), both its variants. On the demo's
    first 6 layers with its real weights (the draft model): the graph is the same layer repeated, and
    compiling 6 of them takes half the time of 30 (81 s against 158 s on 2 cores)."""
    from dsr1.serve.engine import EmbeddedModel

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    ref = EmbeddedModel(demo_draft_dir, dtype=torch.float32, fast_path=False)
    m = EmbeddedModel(demo_draft_dir, dtype=torch.float32)
    cache = m.make_cache(3, 256)
    m.fast.enable_compile()
    m.fast.warm_up(cache)
    assert m.path == "compiled" and m.fast.compile_seconds > 0
    prompts = [ref.tokenizer(p)["input_ids"] for p in PROMPTS]
    want = _greedy(ref, ref.make_cache(3, 256), prompts, 24)
    assert _greedy(m, cache, prompts, 24) == want
    assert _greedy(m, m.make_cache(1, 256), prompts[:1], 24) == want[:1]  # batch 1: its own variant


@pytest.fixture(scope="module")
def fp32_package(demo_draft_dir, tmp_path_factory):
    """The demo's first 6 layers (the draft model, real weights) in fp32 with its decode step compiled ahead
    of time into a fresh store: (model, its 3-row cache, the store). Built once per module: the kept-package
    test checks it, the serve-options test's server starts from a copy of the store. (The graph is the same
    layer repeated; the demo's 30 layers took 120-180 s to build on 2 cores.)"""
    from dsr1.serve.engine import EmbeddedModel

    store = tmp_path_factory.mktemp("fp32-package") / "compiled"
    m = EmbeddedModel(demo_draft_dir, dtype=torch.float32)
    cache = m.make_cache(3, 256)
    m.fast.enable_compile(store=store)
    m.fast.warm_up(cache)
    return m, cache, store


def test_compiled_step_is_kept_and_the_next_start_loads_it(fp32_package, demo_draft_dir, tmp_path):
    """The CPU's ahead-of-time compiled step (dsr1.serve.aotstep): compiled once into the store, loaded
    by a second model object in seconds, for another cache shape too (every size is dynamic), and greedy
    output in fp32 stays the transformers forward's, at every batch size."""
    from dsr1.serve import aotstep
    from dsr1.serve.engine import EmbeddedModel
    from dsr1.serve.fastpath import COMPILE_OPTIONS, FrozenStep

    m, cache, store = fp32_package
    ref = EmbeddedModel(demo_draft_dir, dtype=torch.float32, fast_path=False)
    prompts = [ref.tokenizer(p)["input_ids"] for p in PROMPTS]
    want = _greedy(ref, ref.make_cache(3, 256), prompts, 24)

    assert m.path == "compiled" and m.fast.compile_how == "compiled"
    consts = m.fast.package.with_suffix(aotstep.CONSTANTS)  # fp32: says the constants are inside the library
    assert sorted(p.name for p in store.iterdir()) == sorted([m.fast.package.name, consts.name])  # nothing else
    assert _greedy(m, cache, prompts, 24) == want
    assert _greedy(m, cache, prompts[:1], 24) == want[:1]  # one row: the same package
    # prompts through the package too (its token axis is dynamic; measure_rows turns this on where it
    # measured faster): whole prompts padded to one length, and one prompt in chunks into a later row
    m.fast.prompt_compiled = True
    assert _greedy(m, cache, prompts, 24) == want
    a = ref.prefill(ref.make_cache(1, 256), 0, prompts[2], 0)
    m.prefill(cache, 2, prompts[2][:1], 0)  # one token: below the package's smallest span, still right
    m.prefill(cache, 2, prompts[2][1:5], 1)
    torch.testing.assert_close(m.prefill(cache, 2, prompts[2][5:], 5), a, rtol=1e-4, atol=1e-4)
    b = ref.prefill_rows(ref.make_cache(3, 256), 1, prompts[1:])
    torch.testing.assert_close(m.prefill_rows(cache, 1, prompts[1:]), b, rtol=1e-4, atol=1e-4)

    again = EmbeddedModel(demo_draft_dir, dtype=torch.float32)
    other = again.make_cache(2, 128)
    again.fast.enable_compile(store=store)
    seconds = again.fast.warm_up(other)
    assert again.fast.compile_how == "loaded" and again.fast.package == m.fast.package and seconds < 10
    assert _greedy(again, other, prompts[:2], 24) == want[:2]
    # without its constants file a library is not run (one built without its weights would have none):
    # the load fails, and load_or_build compiles again
    consts.rename(tmp_path / "aside")
    with pytest.raises(FileNotFoundError):
        aotstep._load(m.fast.package, FrozenStep(again.fast))
    (tmp_path / "aside").rename(consts)

    # the key follows the weights: one changed value in one matrix makes another package
    key = aotstep.package_key(FrozenStep(again.fast), COMPILE_OPTIONS)
    with torch.no_grad():
        again.fast.layers[3][6].view(-1)[0] += 1.0
    assert aotstep.package_key(FrozenStep(again.fast), COMPILE_OPTIONS) != key

    # a package that serves every batch and every prompt (what the server checks first): the eager
    # weights are released, nearly all of the model's bytes, and the output is still the reference's
    with torch.no_grad():
        again.fast.layers[3][6].view(-1)[0] -= 1.0
    total = sum(p.numel() * p.element_size() for p in again.model.parameters())
    again.fast.prompt_compiled = True
    assert again.fast.release_eager(again.model) > 0.9 * total
    assert max(p.numel() for p in again.model.parameters()) <= 1 << 16
    assert _greedy(again, other, prompts[:2], 24) == want[:2]
    with pytest.raises(ValueError, match="released"):
        again.make_cache(2, 512)  # a longer context would need a new eager forward


def test_rows_for_keeps_the_compiled_step_up_to_the_last_size_it_won():
    from dsr1.serve.fastpath import rows_for

    assert rows_for({1: (0.01, 0.03), 2: (0.02, 0.03), 4: (0.05, 0.04)}, 16) == 2
    assert rows_for({1: (0.01, 0.03), 2: (0.02, 0.03), 4: (0.03, 0.04)}, 4) == 4
    assert rows_for({1: (0.01, 0.03), 2: (0.02, 0.03), 4: (0.03, 0.04)}, 6) == 6  # past the sizes measured
    assert rows_for({1: (0.05, 0.03)}, 8) == 0
    assert rows_for({1: (0.01, 0.03), 2: (0.02, 0.03), 4: (0.05, 0.04)}, 3) == 3  # 4 is past this cache
    # within 5% the package is kept (it lets the eager weights go); past it, eager
    assert rows_for({1: (0.15, 0.22), 8: (0.218, 0.212)}, 16) == 16
    assert rows_for({1: (0.15, 0.22), 8: (0.23, 0.212)}, 16) == 1
    # int4 (inductor's template over a dynamic row count): eager wins at a row or two, compiled from 3 up
    from dsr1.serve.fastpath import compiled_at, compiled_ranges

    int4 = {1: (0.113, 0.083), 2: (0.12, 0.1), 4: (0.12, 0.15), 8: (0.13, 0.2), 16: (0.15, 0.3)}
    assert rows_for(int4, 16) == 16
    assert compiled_ranges(int4, 16) == (["3-16"], ["1-2"])
    assert rows_for(int4, 2) == 0 and compiled_ranges(int4, 2) == ([], ["1-2"])  # a 2-row cache: never compiled
    assert compiled_ranges({1: (0.01, 0.03), 2: (0.05, 0.03)}, 4) == (["1"], ["2-4"])
    assert rows_for({1: (0.2, 0.1), 2: (0.1, 0.2), 4: (0.3, 0.2)}, 16) == 2  # a window: eager, compiled, eager
    assert compiled_ranges({1: (0.2, 0.1), 2: (0.1, 0.2), 4: (0.3, 0.2)}, 16) == (["2"], ["1", "3-16"])
    # ... and int4 with its one-row step: compiled at one row, eager at 2-4, compiled from 5 on
    holed = {1: (0.062, 0.086), 2: (0.112, 0.094), 4: (0.125, 0.11), 8: (0.116, 0.195), 16: (0.12, 0.373)}
    assert [compiled_at(holed, n, 16) for n in (1, 2, 3, 4, 5, 16, 40)] == [True, False, False, False, True, True, True]
    assert compiled_ranges(holed, 16) == (["1", "5-16"], ["2-4"]) and rows_for(holed, 16) == 16
    assert compiled_at({}, 7, 16)


def test_prune_keeps_the_newest_libraries_with_their_files_and_drops_orphans(tmp_path):
    """The store keeps aotstep.KEEP libraries, each with its constants and timings; the files of one
    removed after a failed load (constants without a library) go at the next build."""
    import os

    from dsr1.serve import aotstep

    for i in range(aotstep.KEEP + 1):
        for suffix in (".so", aotstep.CONSTANTS, ".rows.json"):
            (tmp_path / f"step-{i}{suffix}").write_text("x")
        os.utime(tmp_path / f"step-{i}.so", (i, i))  # step-0 the least recently used
    (tmp_path / f"step-orphan{aotstep.CONSTANTS}").write_text("x")
    # a model's one-row library counts with its dynamic one: kept or removed together
    for i in (0, aotstep.KEEP):
        for suffix in (".one.so", f".one{aotstep.CONSTANTS}"):
            (tmp_path / f"step-{i}{suffix}").write_text("x")
        os.utime(tmp_path / f"step-{i}.one.so", (i, i))
    aotstep._prune(tmp_path, keep=tmp_path / f"step-{aotstep.KEEP}.so")
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == sorted([f"step-{i}{s}" for i in range(1, aotstep.KEEP + 1)
                           for s in (".so", aotstep.CONSTANTS, ".rows.json")]
                          + [f"step-{aotstep.KEEP}.one.so", f"step-{aotstep.KEEP}.one{aotstep.CONSTANTS}"])


def test_saved_row_timings_are_reused_only_when_they_cover_the_cache():
    from dsr1.serve.fastpath import covers

    sizes = (1, 2, 4, 8, 16)
    won_to_4 = {1: (0.01, 0.03), 2: (0.02, 0.03), 4: (0.03, 0.04)}
    assert covers(won_to_4, 4, sizes) and covers(won_to_4, 6, sizes)  # 8 is past a 6-row cache
    assert not covers(won_to_4, 16, sizes)  # 8 and 16 rows never measured: measure again
    assert not covers({**won_to_4, 8: (0.09, 0.05)}, 16, sizes)  # lost at 8: 16 may win again (int4)
    assert not covers({}, 1, sizes)
    assert not covers({1: (0.05, 0.03)}, 16, sizes)  # lost at one row only: a larger batch may still win
    assert covers({n: (0.05, 0.03) for n in (1, 2, 4)}, 4, sizes)  # lost everywhere up to this cache


def test_bf16_compiled_step_beside_packed_eager_weights(demo_draft_dir, tmp_path, monkeypatch):
    """bf16 on a CPU, compiled ahead of time: the eager forward beside the package runs on oneDNN-packed
    weights (prompts, and the batch sizes where it measured faster); the batch-size timings are kept
    with the package and read back; compiled and eager rows give the plain bf16 forward's greedy tokens.
    On the demo model's first six layers with their real weights (the draft fixture): compiling 30 layers
    here only took longer (the fp32 package above checks the whole model)."""
    from dsr1.serve import aotstep, fastpath
    from dsr1.serve.engine import EmbeddedModel

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    plain = EmbeddedModel(demo_draft_dir, dtype=torch.bfloat16)
    prompts = [plain.tokenizer(p)["input_ids"] for p in PROMPTS]
    want = _greedy(plain, plain.make_cache(3, 128), prompts, 8)

    m = EmbeddedModel(demo_draft_dir, dtype=torch.bfloat16)
    cache = m.make_cache(3, 128)
    m.fast.enable_compile(store=tmp_path / "compiled")
    m.fast.warm_up(cache)
    # bf16 with AMX: the library without its weights, inductor's packed ones beside it in the constants file
    # (used in place at load, not copied by the runner: aotstep._compile). Without AMX autotune may pick
    # oneDNN's linear, whose opaque packed weights stay inside the library (fastpath.compile_options).
    consts = m.fast.package.with_suffix(aotstep.CONSTANTS)
    assert consts.is_file()
    if fastpath.compile_options(torch.bfloat16, torch.device("cpu"))["max_autotune_gemm_backends"] == "CPP":
        assert m.fast.package.stat().st_size < consts.stat().st_size
    assert m.fast.ahead_of_time and m.pack_weights() and m.fast.quant == "packed"
    saved = m.fast.package.with_suffix(".rows.json")
    rows = m.fast.measure_rows(cache, saved=saved)
    assert saved.is_file() and set(m.fast.row_timings) <= {1, 2} and 0 <= rows <= 3
    # a 256-token prompt timed through the package and eagerly, kept with the rows' timings; the faster serves
    compiled, eager = m.fast.prompt_timing
    assert fastpath.saved_prompt_timing(saved) == (compiled, eager) and m.fast.prompt_compiled != fastpath.loses(compiled, eager)
    m.fast.compiled_rows, m.fast.prompt_compiled = 0, False  # all eager, on the packed weights: the plain tokens
    assert _greedy(m, cache, prompts, 8) == want
    # compiled against eager on the same step: bf16 sums in another order (a near-tie may flip a later
    # greedy token, which is why fp32 is the token-for-token check above); same best token, close logits
    logits = m.prefill_rows(cache, 0, prompts)
    step = ([int(t) for t in logits.argmax(-1)], [len(p) for p in prompts])
    m.fast.row_timings = {}  # no timings: the limit below alone decides
    for limit in (3, 1):
        m.fast.compiled_rows = limit  # every batch compiled; then one row only (a batch of 3 runs eager)
        got = m.decode(cache, *step)
        m.fast.compiled_rows = 0
        ref = m.decode(cache, *step)
        assert got.argmax(-1).tolist() == ref.argmax(-1).tolist()
        assert (got - ref).abs().max() < 1.0 and (limit == 3) == bool((got != ref).any())
    m.fast.row_timings = {}
    assert m.fast.measure_rows(cache, saved=saved) == rows and set(m.fast.row_timings) <= {1, 2}
    assert m.fast.prompt_timing == (compiled, eager)  # read back, not timed again

    # A new process that loads the package and sends a prompt through it before anything else runs
    # (a restart's first request): on a CPU with AMX its kernels need the process's AMX permission,
    # which nothing had asked for there (SIGILL); aotstep._load asks for it.
    code = f"""
import torch
from pathlib import Path
from dsr1.serve.engine import EmbeddedModel
m = EmbeddedModel(Path({str(demo_draft_dir)!r}), dtype=torch.bfloat16)
cache = m.make_cache(3, 128)
m.fast.enable_compile(store=Path({str(tmp_path / "compiled")!r}))
m.fast.warm_up(cache)
assert m.fast.compile_how == "loaded"
m.fast.prompt_compiled = True
print(m.prefill_rows(cache, 0, {prompts!r}).argmax(-1).tolist())
m.fast.compiled_rows = 3
assert m.pack_weights()  # a first start packs the eager weights before timing them (oneDNN's opaque tensors)
m.fast.release_eager(m.model)  # what the package reads stays with it: the same tokens after
print(m.prefill_rows(cache, 0, {prompts!r}).argmax(-1).tolist())
"""
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    m.fast.prompt_compiled = True
    first = str(m.prefill_rows(cache, 0, prompts).argmax(-1).tolist())
    assert run.stdout.strip().splitlines() == [first, first]


def test_compiled_step_without_disk_for_it_compiles_just_in_time(demo_model_dir, tmp_path, monkeypatch):
    """Too little free disk for the package: said, and the step is compiled in memory instead. The disk's
    free space is the one seam faked (filling a real disk is not something a test should do)."""
    import shutil

    from dsr1.serve.engine import EmbeddedModel

    m = EmbeddedModel(demo_model_dir, dtype=torch.bfloat16)
    m.make_cache(1, 64)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**12, 10**12 - 10**8, 10**8))
    m.fast.enable_compile(store=tmp_path / "compiled")
    assert m.fast.not_kept.startswith("0.1 GB free at ") and "needs about" in m.fast.not_kept
    assert m.fast._store is None and m.fast.compiled and m.path == "compiled"
    assert not (tmp_path / "compiled").exists()


def test_a_restart_packs_the_eager_weights_only_when_some_batch_decodes_eagerly(tmp_path):
    """FastForward.decodes_eager, from the batch-size timings kept beside the compiled step: unknown
    (none saved, or fewer rows than this cache) counts as eager, which the timing then needs packed."""
    import json
    from types import SimpleNamespace

    from dsr1.serve.fastpath import FastForward

    saved = tmp_path / "step.rows.json"
    eager = lambda slots: FastForward.decodes_eager(None, SimpleNamespace(slots=slots), saved)  # noqa: E731
    assert eager(4)  # nothing saved yet
    saved.write_text(json.dumps({1: (0.01, 0.03), 2: (0.02, 0.03), 4: (0.03, 0.04)}))
    assert not eager(4) and not eager(2)  # compiled at every size this cache has
    assert eager(16)  # 8 and 16 rows never timed
    saved.write_text(json.dumps({1: (0.01, 0.03), 2: (0.02, 0.03), 4: (0.05, 0.04)}))
    assert eager(16) and eager(4) and not eager(2)  # eager from 4 rows on


def test_compile_probe_times_four_layers_and_the_head_and_keeps_the_result(demo_model_dir, tmp_path, monkeypatch):
    """--compile auto's timing at start (dsr1.serve.compileprobe): the model's first four layers and head,
    and the head alone, compiled just in time, against the same eager with oneDNN-packed copies; kept under the CPU and the
    model's shapes, so the next start reads it back without compiling; the verdict follows the ratio on
    record; the model's own weights are left as they were."""
    import json

    from dsr1.serve import compileprobe
    from dsr1.serve.engine import EmbeddedModel

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    m = EmbeddedModel(demo_model_dir, dtype=torch.bfloat16)
    m.make_cache(1, 128)
    first = compileprobe.measure(m.fast, tmp_path / "cache")
    assert not first["cached"] and first["compiled"] > 0 and first["eager"] > 0 and first["compile_seconds"] > 1
    # the whole step is estimated from the first layers (their mean x the model's layers) and the head,
    # each timed both ways
    layers, n = len(m.fast.layers), compileprobe.PROBE_LAYERS
    assert first["layers"] == layers > n == first["probed_layers"]
    assert first["compiled_probed"] > first["compiled_head"] > 0 and first["eager_probed"] > first["eager_head"] > 0
    for way in ("compiled", "eager"):
        one = max(first[f"{way}_probed"] - first[f"{way}_head"], 0.0) / n
        assert first[way] == pytest.approx(first[f"{way}_head"] + layers * one)
    t0 = time.perf_counter()
    on, why = compileprobe.choose(m.fast, tmp_path / "cache")
    assert time.perf_counter() - t0 < 1  # read back, not compiled again
    assert "cached measurement" in why and on == (first["eager"] / first["compiled"] >= compileprobe.GAIN)
    path = tmp_path / "cache" / compileprobe.FILE
    saved = json.loads(path.read_text())
    (key,) = saved
    saved[key]["compiled"] = 2 * saved[key]["eager"]  # a CPU where the compiled layer measured slower
    path.write_text(json.dumps(saved))
    on, why = compileprobe.choose(m.fast, tmp_path / "cache")
    assert not on and why.startswith("auto: off") and "0.50x" in why
    saved[key]["batch"] = {"compiled": 1.0, "eager": 2.0}  # ... but a 16-row batch gained (int4's template)
    path.write_text(json.dumps(saved))
    on, why = compileprobe.choose(m.fast, tmp_path / "cache")
    assert on and "0.50x the eager one's speed at one row, 2.00x at 16 rows" in why
    assert m.fast.quant is None and not m.fast.compiled and isinstance(m.fast.layers[0][1], torch.Tensor)


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
    pc.store_rows(cache, [(0, prompt)])
    hits = pc.match(prompt)
    assert len(hits) == (len(prompt) - 1) // 16  # at least one token left to compute
    n = pc.load(cache, 1, hits, len(prompt))
    got = fast.prefill(cache, 1, prompt[n:], n)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    changed = prompt[:40] + [prompt[40] + 1] + prompt[41:]
    assert len(pc.match(changed)) == 40 // 16
    assert pc.hit_rate() == n / len(prompt)


def test_prefix_cache_stores_several_rows_in_one_copy(fp32_models):
    """store_rows (a burst's prompts in one copy per layer) keeps each block's exact K/V under its key, for
    rows of different lengths; a pool too small for them keeps the last blocks written, each with its own
    K/V, and a prompt whose first block was evicted matches nothing."""
    from dsr1.serve.prefixcache import PrefixCache

    _, fast = fp32_models
    cache = fast.make_cache(3, 256)
    mk = lambda budget: PrefixCache(fast.layers, fast.kv_heads, fast.head_dim, fast.dtype,  # noqa: E731
                                    fast._layer_devices(), budget_bytes=budget, block=16)
    a = fast.tokenizer("You are a careful assistant. " * 12)["input_ids"][:70]
    b = fast.tokenizer("Answer in one word, then explain. " * 12)["input_ids"][:41]
    fast.prefill_rows(cache, 1, [a, b])
    per_block = 2 * fast.layers * fast.kv_heads * 16 * fast.head_dim * 4  # fp32

    def block_kv(pc, idx, row, first):
        for li in range(fast.layers):
            torch.testing.assert_close(pc.k[li][idx], cache.k[li][row, :, first : first + 16], rtol=0, atol=0)
            torch.testing.assert_close(pc.v[li][idx], cache.v[li][row, :, first : first + 16], rtol=0, atol=0)

    pc = mk(64 * 2**20)
    pc.store_rows(cache, [(1, a), (2, b)])
    for row, prompt in ((1, a), (2, b)):
        hits = pc.match(prompt)
        assert len(hits) == (len(prompt) - 1) // 16
        for i, idx in enumerate(hits):
            block_kv(pc, idx, row, 16 * i)
    small = mk(3 * per_block)  # three blocks for the six of a and b
    small.store_rows(cache, [(1, a), (2, b)])
    assert small.match(a) == [] and len(small.match(b)) == 2  # a's blocks went to b's
    for i, idx in enumerate(small.match(b)):
        block_kv(small, idx, 2, 16 * i)


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


def _reference(model_dir, home) -> list[str]:
    """What the transformers forward with nothing extra answers."""
    ref = ServerProc([*_common(model_dir), "--no-fast-path", "--compile", "off", "--prefix-cache-mb", "0"], home)
    try:
        return _run(ref)
    finally:
        assert ref.stop() == 0


@pytest.fixture(scope="module")
def reference_outputs(demo_model_dir, tmp_path_factory) -> list[str]:
    return _reference(demo_model_dir, tmp_path_factory.mktemp("ref"))


@pytest.fixture(scope="module")
def draft_reference_outputs(demo_draft_dir, tmp_path_factory) -> list[str]:
    return _reference(demo_draft_dir, tmp_path_factory.mktemp("ref-draft"))


def test_serve_options_leave_greedy_output_unchanged(fp32_package, demo_draft_dir, draft_reference_outputs, tmp_path):
    """A server with every option on (fast path, compiled decode, prefix cache, n-gram
    speculation) gives the reference's greedy text for concurrent requests and for requests
    sharing a long prefix; the hit rate and the acceptance rate are on /metrics. (On the 6-layer
    draft model, whose package the kept-package test built.)"""
    common = _common(demo_draft_dir)
    run, want = _run, draft_reference_outputs
    # the step compiled by the kept-package test (same weights, options and CPU: the same key) saves this
    # start its compile; the restart below still compiles its --compile auto probe
    shutil.copytree(fp32_package[2], tmp_path / "b" / "cache" / "compiled")
    fast = ServerProc([*common, "--compile", "on", "--prefix-cache-mb", "64", "--speculative", "ngram"],
                      tmp_path / "b", timeout=600)
    try:
        assert any("forward    compiled" in line for line in fast.lines), "".join(fast.lines)
        # inductor's autotune tables (written to stderr while compiling) stay off the console
        assert not any(line.startswith(("AUTOTUNE", "SingleProcess AUTOTUNE", "Autotune Choices")) for line in fast.lines), \
            "".join(fast.lines)
        got = run(fast)
        assert got == want
        # 4 misses arriving together (one forward: none can reuse another's prefix yet), then 4 hits that
        # reuse the shared system prompt's whole blocks: about half of their tokens, a quarter of all
        assert _metric(fast.url, "dsr1_kv_cache_hit_rate") > 0.2
        assert _metric(fast.url, "dsr1_spec_decode_draft_tokens_total") > 0
        assert 0 < _metric(fast.url, "dsr1_spec_decode_acceptance_rate") <= 1
    finally:
        assert fast.stop() == 0
    # a restart (same DSR1_HOME, another context length) with --compile auto: one compiled layer is timed
    # against the eager one (dsr1.serve.compileprobe: ~30 s, then cached); where compiling won, the step
    # compiled by the first start is loaded, not compiled again
    t0 = time.monotonic()
    again = ServerProc([*common[:-1], "512", "--compile", "auto"], tmp_path / "b", timeout=240)
    try:
        started = time.monotonic() - t0
        line = " ".join(ln.strip() for ln in again.lines if not ln.startswith("dsr1 serve:"))
        line = line[line.index("forward "):]
        assert re.search(r"auto: (on|off) \(measured now on this CPU: compiled step [\d.]+x", line), line
        if "auto: on" in line:  # fp32 on the demo model: 3.5x at one row on a 2-core AMD EPYC
            assert "the compiled step of an earlier start" in line, line
            assert float(re.search(r"ready in ([\d.]+)s", line).group(1)) < 10, line
        assert started < 120, f"restart took {started:.0f}s"  # model load, timing and start-up included
        assert _run(again) == want
    finally:
        assert again.stop() == 0


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
