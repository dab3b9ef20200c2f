"""dsr1.gguf_place: R1's GGUF tensor tables against the published files, and placements against
llama.cpp's own rules.

The recipe tables are checked against what llama.cpp printed loading the real files (type counts and
`file size = ... GiB`, from the load logs cited in dsr1/data/gguf_quants.toml) and against the hub's
shard sizes. The layer split is checked by replaying llama.cpp b11434's mapping from -ts ratios to
layers (src/llama-model.cpp: cumulative split fractions, std::upper_bound over il / act_gpu_layers with
act_gpu_layers = n_layer + 1 under -ngl 999).
"""

from __future__ import annotations

import bisect
from collections import Counter

import pytest

from dsr1 import catalog, gguf_files, gguf_place
from dsr1.gguf_files import type_name

GiB = 1 << 30
R1 = catalog.get("r1")


def test_every_r1_quant_is_listed_smallest_first():
    qs = gguf_place.quants("r1")
    assert [q.quant for q in qs] == ["UD-IQ1_S", "UD-IQ1_M", "UD-IQ2_XXS", "UD-Q2_K_XL"]
    assert qs[0].first_shard == "DeepSeek-R1-UD-IQ1_S/DeepSeek-R1-UD-IQ1_S-00001-of-00003.gguf"
    assert gguf_place.quants("r1-distill-qwen-7b") == []


@pytest.mark.parametrize("quant,counts", [
    ("UD-IQ1_S", {"F32": 361, "Q4_K": 190, "Q5_K": 116, "Q6_K": 184, "IQ2_XXS": 6, "IQ1_S": 168}),
    ("UD-Q2_K_XL", {"F32": 361, "Q2_K": 171, "Q3_K": 3, "Q4_K": 306, "Q6_K": 184}),
])
def test_recipe_tables_match_llama_cpps_load_logs(quant, counts):
    q = next(q for q in gguf_place.quants("r1") if q.quant == quant)
    lay = gguf_place.layout_from_recipe(R1, q)
    assert len(lay.tensors) == 1025  # llama.cpp's count for these files
    assert Counter(type_name(t.ggml_type) for t in lay.tensors) == counts
    assert abs(lay.size / GiB - q.loaded_gib) < 0.01  # 130.60 / 211.034 GiB as printed
    assert abs(lay.size - q.size_bytes) / q.size_bytes < 0.005  # and the hub's shard sizes (rounded)


def test_tables_without_a_load_log_take_the_published_total():
    for q in gguf_place.quants("r1"):
        lay = gguf_place.layout_from_recipe(R1, q)
        kinds = gguf_files.bytes_by_kind(lay.tensors)
        assert abs(lay.size - q.size_bytes) / q.size_bytes < 0.005, q.quant
        assert 0.9 < kinds["routed_experts"] / lay.size < 0.97, q.quant  # ~88% of the parameters, fewest bits


def _llama_cpp_layer_devices(split: list[int], n_layer: int, ngl: int) -> list[int | None]:
    """llama.cpp b11434's assignment of layers 0..n_layer (the last: the output head) to devices."""
    total = float(sum(split))
    cum, acc = [], 0.0
    for v in split:
        acc += v
        cum.append(acc / total)
    start = max(n_layer - ngl, 0)
    act = min(ngl, n_layer + 1)
    out = []
    for il in range(n_layer + 1):
        if il < start or il - start >= act:
            out.append(None)  # CPU
        else:
            out.append(bisect.bisect_right(cum, (il - start) / act))  # std::upper_bound
    return out


@pytest.mark.parametrize("gpus,ram,where", [([80 * GiB] * 2, 128e9, "experts_in_ram"), ([80 * GiB] * 4, 256e9, "all_gpu"),
                                            ([80 * GiB] * 8, 512e9, "all_gpu"), ([24 * GiB], 384e9, "layers_in_ram")])
def test_tensor_split_places_exactly_the_planned_layers(gpus, ram, where):
    q = gguf_place.quants("r1")[-1]
    lay = gguf_place.layout_from_recipe(R1, q)
    p = gguf_place.place(lay, gpus, int(ram), 8192)
    assert p.fits and p.where == where
    n = lay.n_layer
    ngl = p.n_gpu_layers
    devices = _llama_cpp_layer_devices(list(p.tensor_split), n, ngl)
    planned, first = [], n - min(ngl, n)
    for g, k in enumerate(p.tensor_split):
        planned += [g] * k
    want = [None] * first + planned + ([None] if ngl <= n else [])
    if len(p.tensor_split) == 1:  # one GPU: llama.cpp takes no split, every offloaded layer on it
        want = [None if d is None else 0 for d in want]
    assert devices == want
    assert all(u <= c for u, c in zip(p.gpu_bytes, p.gpu_usable))
    # the routed experts in RAM are the first n_cpu_moe layers' (llama.cpp's --n-cpu-moe counts dense layers too)
    assert p.weights_on_gpus + p.weights_in_ram == lay.size


def test_experts_go_to_ram_only_as_far_as_needed():
    q = gguf_place.quants("r1")[-1]
    lay = gguf_place.layout_from_recipe(R1, q)
    p = gguf_place.place(lay, [80 * GiB] * 2, int(128e9), 8192)
    assert p.where == "experts_in_ram" and p.n_cpu_moe > R1.first_dense_layers
    one_less = [gguf_place.compute_bytes(lay, 8192, False)]  # with one layer fewer in RAM it would not fit
    assert one_less and gguf_place.place(lay, [80 * GiB - (1 << 30)] * 2, int(128e9), 8192).n_cpu_moe >= p.n_cpu_moe
    bigger = gguf_place.place(lay, [96 * GiB] * 2, int(128e9), 8192)  # more GPU memory: fewer experts in RAM
    assert bigger.n_cpu_moe < p.n_cpu_moe
    assert gguf_place.place(lay, [], int(512e9), 8192).where == "cpu_only"


def test_the_largest_quant_that_fits_is_chosen():
    small = gguf_place.choose(R1, [80 * GiB] * 2, int(64e9), 8192)
    big = gguf_place.choose(R1, [80 * GiB] * 2, int(128e9), 8192)
    assert small[0].size_bytes < big[0].size_bytes and big[0].quant == "UD-Q2_K_XL"
    assert any("next larger" in n for n in small[2])
    assert gguf_place.choose(R1, [80 * GiB] * 4, int(256e9), 8192)[1].where == "all_gpu"


def test_pre_mla_r1_kv_cache_is_quantized_and_sized_per_head():
    lay = gguf_place.layout_from_recipe(R1, gguf_place.quants("r1")[0])
    assert not lay.mla and lay.kv_k_values == 128 * 192 and lay.kv_v_values == 128 * 128
    p = gguf_place.place(lay, [80 * GiB] * 4, int(256e9), 8192)
    assert p.kv_type == "q4_0"
    # K q4_0 (18 bytes per 32 values) + V f16, 61 layers: 2.71 MiB per token
    assert p.kv_per_token == 61 * (128 * 192 // 32 * 18 + 128 * 128 * 2)
    assert "--cache-type-k" in gguf_place.flags(p, 61, 4)
