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


def test_serve_precision_int4_packs_the_weights_and_answers(demo_model_dir, tmp_path):
    """`dsr1 serve MODEL --precision int4` on a CPU: the plan says weight-only int4 on the fast path (no
    bitsandbytes, nothing to pull), the server packs at load and answers through the official client."""
    import openai

    from tests.serve_util import ServerProc

    srv = ServerProc([str(demo_model_dir), "--engine", "embedded", "--precision", "int4", "--max-model-len", "512",
                      "--max-concurrent", "2"], tmp_path / "home")
    try:
        log = "".join(srv.lines)
        assert "weight-only int4, packed at load" in log and "bitsandbytes" not in log
        assert re.search(r"forward\s+fast with weight-only int4", log)
        cli = openai.OpenAI(base_url=srv.url + "/v1", api_key="x")
        r = cli.completions.create(model=cli.models.list().data[0].id, prompt="The capital of France is",
                                   max_tokens=8, temperature=0)
        assert r.usage.completion_tokens == 8 and r.choices[0].text.strip()
    finally:
        srv.stop()
