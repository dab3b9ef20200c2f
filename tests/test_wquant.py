"""Weight-only int8/int4 in the embedded engine's fast path (dsr1.serve.wquant), on the demo model's
real weights: quality by the NLL of pull's fixed text against bf16 (the issue's targets: +1% int8,
+7% int4), the kernels against the weights they stand for, and the bf16 copies released."""

from __future__ import annotations

import re

import pytest
import torch

from dsr1.quantize import NLL_TEXT
from dsr1.serve import wquant

pytestmark = pytest.mark.slow


def _nll(m) -> float:
    ids = m.tokenizer(NLL_TEXT)["input_ids"]
    cache = m.make_cache(1, len(ids) + 8)
    total = 0.0
    with torch.inference_mode():
        for i in range(len(ids) - 1):  # one token at a time: the decode path the weights serve
            logits = m.prefill(cache, 0, ids[i:i + 1], i)
            total -= torch.log_softmax(logits.float(), -1)[ids[i + 1]].item()
    return total / (len(ids) - 1)


@pytest.fixture(scope="module")
def bf16_nll(demo_model_dir):
    from dsr1.serve.engine import EmbeddedModel

    return _nll(EmbeddedModel(demo_model_dir, dtype=torch.bfloat16))


@pytest.mark.parametrize("method,limit", [("int8", 1.01), ("int4", 1.07)])
def test_weight_only_quality_and_memory(demo_model_dir, bf16_nll, method, limit):
    from dsr1.serve.engine import EmbeddedModel

    m = EmbeddedModel(demo_model_dir, dtype=torch.bfloat16, weights=method)
    nll = _nll(m)
    assert nll <= bf16_nll * limit, (method, nll, bf16_nll)
    ff = m.fast
    packed = [w for layer in ff.layers for w in layer if isinstance(w, wquant.QuantWeight)]
    assert len(packed) == 4 * len(ff.layers) and all(w.method == method for w in packed)
    # the transformers modules no longer hold bf16 copies of what was packed
    layer = m.model.model.layers[0]
    assert layer.mlp.gate_proj.weight.numel() == 0 and layer.self_attn.q_proj.weight.numel() == 0
    bf16_bytes = sum(w.shape[0] * w.shape[1] * 2 for w in packed)
    assert sum(w.nbytes for w in packed) < bf16_bytes * (0.52 if method == "int8" else 0.33)
    # a longer context rebuilds the fast path from the packed weights, not from the released ones
    m.make_cache(1, ff.max_len * 2)
    assert m.fast is not ff and m.fast.layers[0][1] is ff.layers[0][1]


@pytest.mark.parametrize("method", wquant.METHODS)
def test_kernel_computes_with_the_weights_it_stands_for(method):
    torch.manual_seed(0)
    w = (torch.randn(96, 256) * 0.05).to(torch.bfloat16)
    q = wquant.quantize(w, method)
    x = torch.randn(3, 256, dtype=torch.bfloat16)
    want = x.float() @ q.dequantize().float().t()
    got = q.mm(x).float()
    assert ((got - want).norm() / want.norm()).item() < 0.01
    # and the quantized weight is close to the original (4 bits: groups of 32 columns)
    err = ((q.dequantize().float() - w.float()).norm() / w.float().norm()).item()
    assert err < (0.01 if method == "int8" else 0.1)
    # a row's result does not depend on the rows batched with it (int8 quantizes activations per call)
    x[1] *= 40
    alone = torch.cat([q.mm(x[i:i + 1]) for i in range(3)])
    assert torch.equal(alone, q.mm(x))


def test_packed_bf16_decodes_as_the_plain_weights(demo_model_dir):
    """bf16 on a CPU, eager: the weights reordered for oneDNN replace the plain ones and greedy decoding
    is unchanged; a longer context reuses them."""
    from dsr1.serve.engine import EmbeddedModel

    if not wquant.can_pack():
        pytest.skip("this PyTorch has no oneDNN")

    def greedy(m, n=24):
        cache = m.make_cache(2, 128)
        with torch.inference_mode():
            ids = m.tokenizer("The capital of France is")["input_ids"]
            logits = m.prefill_rows(cache, 0, [ids, ids[:3]])
            out = [logits.argmax(-1).tolist()]
            pos = [len(ids), 3]
            for _ in range(n):
                logits = m.decode(cache, out[-1], pos)
                out.append(logits.argmax(-1).tolist())
                pos = [p + 1 for p in pos]
        return out

    m = EmbeddedModel(demo_model_dir, dtype=torch.bfloat16)
    want = greedy(m)
    assert m.pack_weights() and m.weights == wquant.PACKED
    assert greedy(m) == want
    ff = m.fast
    assert all(isinstance(w, wquant.QuantWeight) and w.method == wquant.PACKED for w in ff.layers[0][1::2][:1])
    assert m.model.model.layers[0].mlp.down_proj.weight.numel() == 0  # released, not doubled
    m.make_cache(1, ff.max_len * 2)
    assert m.fast is not ff and m.fast.layers[0][1] is ff.layers[0][1]
    assert not m.pack_weights()  # once


@pytest.mark.skipif("avx512" not in torch.backends.cpu.get_cpu_capability().lower(),
                    reason="inductor's AVX-512 int4 micro-kernel needs AVX-512")
def test_one_row_kernels_match_and_are_compiled_in(tmp_path, monkeypatch):
    """dsr1's one-row kernels (dsr1.serve.kernel_edits): the int4 path in inductor's AVX-512 int4
    micro-kernel and the int8 head's prefetch are compiled in when dsr1 compiles (their text in the
    generated code), not otherwise (inductor's templates are left as they were). One row's int4 product
    equals eager int4's to bf16 rounding (a K long enough that the template splits it: calls that start
    mid-row and accumulate; a short one; groups of 32); the int8 one (on a CPU with AMX reading the AMX
    kernel's VNNI-2 layout of the head), whose arithmetic is unchanged, equals
    inductor's own to the bit. At many rows over a dynamic row count, on a CPU with AMX, the AMX int4 kernel
    reads the integers in place (its text compiled in) and computes what it computes over its own
    re-blocked copy, to the bit."""
    import torch._inductor.config as inductor_config
    from torch._inductor.utils import run_and_get_code

    from dsr1.serve import kernel_edits
    from dsr1.serve.fastpath import compile_options, compiling

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    monkeypatch.setenv("DSR1_INT4_VNNI", "off")  # PyTorch's int4 layout, which these kernels read
    torch.manual_seed(0)
    ws = [wquant.QuantWeight(torch.randn(n, k, dtype=torch.bfloat16) * 0.02, "int4")
          for n, k in ((256, 1536), (192, 64))]
    head = wquant.QuantWeight(torch.randn(512, 1536, dtype=torch.bfloat16) * 0.02, "int8").frozen()

    class Three(torch.nn.Module):  # the weights as parameters: frozen into the graph, as the step's are
        def __init__(self):
            super().__init__()
            self.q = torch.nn.ParameterList([torch.nn.Parameter(w.q, requires_grad=False) for w in ws])
            self.s = torch.nn.ParameterList([torch.nn.Parameter(w.scales, requires_grad=False) for w in ws])
            self.hq = torch.nn.Parameter(head.q, requires_grad=False)
            self.hs = torch.nn.Parameter(head.scales, requires_grad=False)

        def forward(self, x1, x2):
            int4 = [torch._weight_int4pack_mm_for_cpu(x, q, ws[0].group, s) for x, q, s in zip((x1, x2), self.q, self.s)]
            return [*int4, torch._weight_int8pack_mm(x1, self.hq, self.hs)]

    class One(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.q = torch.nn.Parameter(ws[0].q, requires_grad=False)
            self.s = torch.nn.Parameter(ws[0].scales, requires_grad=False)

        def forward(self, x):
            return torch._weight_int4pack_mm_for_cpu(x, self.q, ws[0].group, self.s)

    xs = (torch.randn(1, 1536, dtype=torch.bfloat16), torch.randn(1, 64, dtype=torch.bfloat16))
    inductors = [getattr(owner, attr) for owner, attr, *_ in kernel_edits._edits()]
    options = {**compile_options(torch.bfloat16, torch.device("cpu")), "fx_graph_cache": False}
    model = Three().eval()
    with torch.inference_mode():
        ref = model(*xs)
        torch._dynamo.reset()
        with compiling(options, torch.device("cpu")):
            got, code = run_and_get_code(torch.compile(model, dynamic=False), *xs)
        assert [getattr(owner, attr) for owner, attr, *_ in kernel_edits._edits()] == inductors  # restored
        assert "dsr1 one-row path" in "".join(code) and "dsr1: further ahead" in "".join(code)
        # the head's vector kernel reads AMX's VNNI-2 layout where the AMX kernel would read it too
        assert ("B in VNNI-2 pairs" in "".join(code)) == _amx_head()
        for g, r in zip(got[:2], ref):
            assert (g.float() - r.float()).abs().max() <= 0.01 * r.float().abs().max()
        torch._dynamo.reset()
        with inductor_config.patch(options):  # inductor's own kernels outside dsr1's compiles
            plain, code = run_and_get_code(torch.compile(model, dynamic=False), *xs)
        assert "dsr1 one-row path" not in "".join(code) and "dsr1: further ahead" not in "".join(code)
        assert "B in VNNI-2 pairs" not in "".join(code)
        assert all(torch.equal(p, r) for p, r in zip(plain[:2], ref))  # inductor's int4 kernel: eager's sums
        assert torch.equal(got[2], plain[2])

        # many rows (a prompt): with AMX, inductor's AMX int4 kernel reading the integers where they lie
        # instead of its own re-blocked copy of them; the same sums as over the copy, so equal to them
        x = torch.randn(40, 1536, dtype=torch.bfloat16)
        torch._dynamo.mark_dynamic(x, 0)
        one = One().eval()
        torch._dynamo.reset()
        with compiling(options, torch.device("cpu")):
            got, code = run_and_get_code(torch.compile(one), x)
        torch._dynamo.reset()
        with inductor_config.patch(options):
            plain, plain_code = run_and_get_code(torch.compile(one), x)
        code, plain_code = "".join(code), "".join(plain_code)
        assert ("32-byte rows of the 64-column block" in code) == ("AMXState" in plain_code)
        assert "32-byte rows of the 64-column block" not in plain_code
        eager = one(x)
        assert (got.float() - eager.float()).abs().max() <= 0.01 * eager.float().abs().max()
        assert torch.equal(got, plain)
        assert torch.equal(got, plain)


def _amx_head() -> bool:
    """Whether inductor picks its AMX kernel for the int8 head over a dynamic row count here, which the
    one-row library's head then shares its layout with (dsr1.serve.kernel_edits._vnni_head)."""
    import torch._inductor.compile_fx  # noqa: F401 - inductor's codegen modules import in this order
    from torch._inductor.codegen import cpp_micro_gemm as mg

    isa = mg.pick_vec_isa()
    return isinstance(isa, mg.VecAMX) and isa.is_avx512_bf16_supported()


def _one_row_args(ff, cache, step):
    """The arguments the compiled step takes for row 0's next token (FastForward.decode's)."""
    (tok, *_), (p, *_) = step
    return (torch.tensor([[tok]]), torch.tensor([[p]]), torch.arange(p + 1), cache.k, cache.v, ff.cos, ff.sin,
            torch.arange(1))


def _agree(got: torch.Tensor, ref: torch.Tensor) -> None:
    """Compiled against eager int4 logits: bf16 sums in another order (the template's tiles), so not
    identical; close, and each row's best token is the other's best or within a near-tie of it (the
    demo model's int4 prompts have such ties: 3987 against 753)."""
    assert (got - ref).abs().max() < 1.0
    for g, r in zip(got, ref):
        assert r[g.argmax()] >= r.max() - 0.25 and g[r.argmax()] >= g.max() - 0.25


@pytest.fixture(scope="module")
def draft_bf16_nll(demo_draft_dir):
    from dsr1.serve.engine import EmbeddedModel

    return _nll(EmbeddedModel(demo_draft_dir, dtype=torch.bfloat16))


@pytest.fixture(scope="module")
def int4_store(tmp_path_factory):
    """Where the int4 tests keep the demo model's compiled int4 step: built once, loaded by the server test."""
    return tmp_path_factory.mktemp("int4-home") / "cache" / "compiled"


def test_int4_compiled_step_agrees_with_eager_and_keeps_quality(demo_draft_dir, draft_bf16_nll, int4_store, tmp_path,
                                                                 monkeypatch):
    """int4 with the compiled step (inductor's int4 GEMM template over the same packed integers): the step
    and a prompt through the package agree with the eager int4 forward, the NLL target holds through it,
    the head runs as plain int8 tensors (fbgemm's packing cannot be compiled), a second start loads the
    package, and once the package serves everything the eager weights go. On the demo model's first six
    layers with their real weights (the draft fixture), against their own bf16 NLL: two libraries of 30
    layers took ~190 s to compile here (the whole model's int4 NLL is checked eagerly above; the package
    computes with the same integers)."""
    from dsr1.serve.engine import EmbeddedModel

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    # PyTorch's int4 layout and an int8 head, as on a CPU with AMX (without it int4 runs dsr1's VNNI kernel
    # eager, and a compiled step converts it: tests/test_int4vnni.py)
    monkeypatch.setenv("DSR1_INT4_VNNI", "off")
    m = EmbeddedModel(demo_draft_dir, dtype=torch.bfloat16, weights="int4")
    cache = m.make_cache(3, 512)
    m.fast.enable_compile(store=int4_store)
    assert isinstance(m.fast.head, wquant.Frozen) and m.fast.head.method == "int8"
    m.fast.warm_up(cache)
    # compiled here, or loaded when the server test ran first (it keeps its package in the same home)
    assert m.fast.compile_how in ("compiled", "loaded") and m.fast.package.with_suffix(".consts").is_file()
    prompts = [m.tokenizer(p)["input_ids"] for p in ("The capital of France is", "def fibonacci(n):\n    ",
                                                      "Once upon a time")]
    m.fast.prompt_compiled = False
    eager_prompt = m.prefill_rows(cache, 0, prompts)
    m.fast.prompt_compiled = True
    got_prompt = m.prefill_rows(cache, 0, prompts)
    _agree(got_prompt, eager_prompt)
    step = ([int(t) for t in got_prompt.argmax(-1)], [len(p) for p in prompts])
    m.fast.compiled_rows = 0
    ref = m.decode(cache, *step)
    m.fast.compiled_rows = 3
    got = m.decode(cache, *step)
    _agree(got, ref)
    assert (got != ref).any()  # the compiled step ran, not the eager one
    # one row of one token: the one-row library beside the dynamic one (aotstep, one_row)
    assert m.fast.package.with_name(m.fast.package.stem + ".one.so").is_file() and m.fast._aot_one is not None
    one = m.decode(cache, step[0][:1], step[1][:1])
    assert torch.equal(one, m.fast._aot_one(*_one_row_args(m.fast, cache, step)))
    m.fast.compiled_rows = 0
    _agree(one, m.decode(cache, step[0][:1], step[1][:1]))
    m.fast.compiled_rows = 3
    assert _nll(m) <= draft_bf16_nll * 1.07  # prompts (one token each here) through the package
    # the package's own constants hold no second layout of the int4 integers (the AMX kernel reads them
    # in place: dsr1.serve.kernel_edits): the int8 head's blocked copy at most
    stored = torch.load(m.fast.package.with_suffix(".consts"), mmap=True, weights_only=True)["stored"]
    assert not [n for n, t in stored.items() if t.dtype == torch.uint8], list(stored)
    # and on a CPU with AMX the one-row library reads that head copy where the dynamic one's file holds
    # it, storing none of its own (both blocked alike: kernel_edits._HEAD_VNNI)
    one_saved = torch.load(m.fast.package.with_suffix(".one.consts"), mmap=True, weights_only=True)
    heads = [n for n, t in stored.items() if t.dtype == torch.int8]
    if _amx_head():
        assert heads and {other for other, *_ in one_saved["sibling"].values()} >= set(heads), one_saved["sibling"]
        assert not [n for n, t in one_saved["stored"].items() if t.dtype == torch.int8], list(one_saved["stored"])
    # the eager forward's logits go through the head's own library, which reads the dynamic library's head
    # too (blocked alike where inductor picks the same kernel for both), not the kept
    # [N, K] integers; it computes what the eager kernel computes, to bf16 rounding
    assert m.fast._aot_head is not None
    head_saved = torch.load(m.fast.package.with_suffix(".head.consts"), mmap=True, weights_only=True)
    if _amx_head():  # AMX for both
        assert not [n for n, t in head_saved["stored"].items() if t.dtype == torch.int8], list(head_saved["stored"])
        assert {other for other, *_ in head_saved["sibling"].values()} >= set(heads), head_saved["sibling"]
    for rows in (1, 3):
        x = torch.randn(rows, m.fast.head.q.shape[1], dtype=torch.bfloat16)
        want = wquant.frozen_mm(m.fast.head, x).float()
        assert (m.fast._aot_head(x).float() - want).abs().max() <= 0.01 * want.abs().max()
    # the package reads the weights the eager forward holds: releasing its references frees little, but
    # nothing breaks
    freed = m.fast.release_eager(m.model)
    assert freed >= 0 and m.fast.layers[0][1].numel() == 0
    assert torch.equal(m.decode(cache, *step), got)  # the same package, the same rows

    again = EmbeddedModel(demo_draft_dir, dtype=torch.bfloat16, weights="int4")
    cache2 = again.make_cache(3, 512)
    again.fast.enable_compile(store=int4_store)
    again.fast.warm_up(cache2)
    assert again.fast.compile_how == "loaded"
    again.fast.prompt_compiled = True
    assert torch.equal(again.prefill_rows(cache2, 0, prompts), got_prompt)


def test_serve_precision_int4_packs_the_weights_and_answers(demo_draft_dir, int4_store):
    """`dsr1 serve MODEL --precision int4 --compile on` on a CPU: the plan says weight-only int4 on the fast
    path (no bitsandbytes, nothing to pull), the server packs at load, compiles the int4 step ahead of time
    (or loads the package the test above built in the same home) and answers through the official client.
    A restart maps the int4 weights the first start kept (dsr1.serve.wstore) and answers the same."""
    from tests.serve_util import ServerProc, greedy_completion

    args = [str(demo_draft_dir), "--engine", "embedded", "--precision", "int4", "--compile", "on",
            "--max-model-len", "512", "--max-concurrent", "2"]
    home = int4_store.parent.parent
    texts = []
    for start in ("first", "restart"):
        # alone, the server compiles the step itself (~90 s on two cores); PyTorch's int4 layout, as the test above
        srv = ServerProc(args, home, env={"DSR1_INT4_VNNI": "off"}, timeout=600)
        try:
            log = " ".join("".join(srv.lines).split())  # the plan's lines as one (rich wraps them)
            assert "weight-only int4, packed at load" in log and "bitsandbytes" not in log
            assert re.search(r"forward\s+compiled with weight-only int4", log)
            if start == "first":
                assert "compiled ahead of time" in log or "the compiled step of an earlier start" in log
                assert "int4 weights quantized, kept for the next start" in log
            else:  # the package and the int4 weights of the first start: nothing compiled or quantized
                assert "the compiled step of an earlier start" in log
                assert "int4 weights mapped from an earlier start" in log
            texts.append(greedy_completion(srv))  # through the official client
        finally:
            srv.stop()
    assert texts[0] == texts[1]  # greedy, the same bits and library
