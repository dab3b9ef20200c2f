"""int8/int4 weights kept between starts (dsr1.serve.wstore): a second start maps the bits the first
made instead of quantizing the checkpoint again, and decodes exactly as the first did; a damaged or
unfinished set is never used."""

from __future__ import annotations

import pytest
import torch

from dsr1.serve import pages, wquant, wstore


def _start(model_dir, method, store):
    from dsr1.serve.engine import EmbeddedModel

    m = EmbeddedModel(model_dir, dtype=torch.bfloat16, weights=method)
    m.weights_store = store
    cache = m.make_cache(2, 64)
    return m, cache


def _decode(m, cache) -> torch.Tensor:
    with torch.inference_mode():
        m.prefill(cache, 0, [5, 9, 2, 7], 0)
        return m.decode(cache, [11, 3], [4, 0])


@pytest.mark.parametrize("method", wquant.METHODS)
def test_second_start_maps_the_weights_the_first_kept(tiny_model_factory, tmp_path, method):
    model_dir, store = tiny_model_factory("qwen2"), tmp_path / "quantized"
    first, cache = _start(model_dir, method, store)
    assert first.fast.weights_how == "weights quantized, kept for the next start"
    want = _decode(first, cache)
    [kept] = [p for p in store.iterdir()]
    assert kept.name.startswith(method + "-") and (kept / wstore.DONE).is_file()
    assert len(list(kept.glob("layer-*.pt"))) == len(first.fast.layers)

    again, cache2 = _start(model_dir, method, store)
    assert again.fast.weights_how == f"weights {'mapped' if method == 'int4' else 'read'} from an earlier start"
    # the int8 head is packed for fbgemm when the eager forward first needs it (a compiled step reads its
    # plain integers: packing it at load, then unpacking it, cost ~4 s of a 1.5B restart); an int4 model's
    # head is int4 where int4 runs dsr1's VNNI kernel (wquant.head_method), nothing to pack
    int8_head = again.fast.head.method == "int8"
    assert again.fast.head.method == wquant.head_method(method, again.fast.head.shape) and (again.fast.head.plain is not None) == int8_head
    assert torch.equal(_decode(again, cache2), want)  # the same bits, the same logits
    assert again.fast.head.plain is None
    # the transformers modules hold no bf16 copies on a mapped start either
    assert again.model.model.layers[0].mlp.up_proj.weight.numel() == 0
    q = again.fast.layers[0][1]
    assert isinstance(q, wquant.QuantWeight) and q.method == method
    if method == "int4":  # used where they lie in the file, not copied
        spans = [(lo, hi) for lo, hi, name in pages.file_mappings() if name.endswith("layer-0000.pt")]
        assert any(lo <= q.q.data_ptr() < hi for lo, hi in spans)


def test_a_damaged_or_unfinished_set_is_not_used(tiny_model_factory, tmp_path):
    model_dir, store = tiny_model_factory("qwen2"), tmp_path / "quantized"
    first, cache = _start(model_dir, "int4", store)
    want = _decode(first, cache)
    [kept] = list(store.iterdir())
    layer = kept / "layer-0001.pt"
    layer.write_bytes(layer.read_bytes()[: layer.stat().st_size // 2])  # a disk error, a copy cut short

    again, cache2 = _start(model_dir, "int4", store)
    assert again.fast.weights_how == "weights quantized, kept for the next start"  # quantized again, kept again
    assert torch.equal(_decode(again, cache2), want)
    assert (kept / wstore.DONE).is_file() and torch.load(layer, mmap=True, weights_only=True)

    # a start that died while writing: its build directory holds layers but no DONE, and is not a set
    w = wstore.Writer(tmp_path / "other", "int4-unfinished", 1)
    w.layer({"qkv": again.fast.layers[0][1]})
    assert w.why_not is None and any((tmp_path / "other").glob(".build-int4-unfinished-*/layer-0000.pt"))
    assert wstore.load(tmp_path / "other", "int4-unfinished", 1) is None
    assert not (tmp_path / "other" / "int4-unfinished").exists()


def test_a_different_checkpoint_or_method_makes_another_set(tiny_model_factory, tmp_path):
    from dsr1.serve.engine import EmbeddedModel

    model_dir = tiny_model_factory("qwen2")
    m = EmbeddedModel(model_dir, dtype=torch.bfloat16, weights="int4")
    k4 = wstore.key(m.model, "int4")
    assert k4 == wstore.key(m.model, "int4") and k4 != wstore.key(m.model, "int8")
    with torch.no_grad():
        m.model.model.layers[1].mlp.down_proj.weight[0, :64] += 0.01  # a fine-tune touching one weight's sample
    assert wstore.key(m.model, "int4") != k4


def test_prune_keeps_the_most_recent_sets(tmp_path):
    import os

    for i in range(5):
        d = tmp_path / f"int4-{i}"
        d.mkdir()
        os.utime(d, (i, i))
    (tmp_path / ".build-int4-x-999999999").mkdir()  # a writer that is gone
    wstore.prune(tmp_path, keep=tmp_path / "int4-0")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["int4-0", "int4-3", "int4-4"]


def test_the_embedding_table_stays_in_the_checkpoints_mapping(tiny_model_factory, tmp_path):
    """A bf16 checkpoint loaded in place: the packed start keeps the embedding table in the file mapping,
    so only the rows a step reads are resident, and decodes as a start whose table was copied (the same
    model from its fp32 checkpoint, converted on load)."""
    from transformers import AutoModelForCausalLM

    from dsr1.serve.engine import EmbeddedModel

    fp32 = tiny_model_factory("qwen2")
    bf16 = tmp_path / "bf16"
    AutoModelForCausalLM.from_pretrained(fp32, dtype=torch.bfloat16).save_pretrained(bf16)
    for f in fp32.glob("tokenizer*"):
        (bf16 / f.name).write_bytes(f.read_bytes())
    copied, cache = _start(fp32, "int4", None)
    assert pages.mapping_of(copied.fast.embed.data_ptr(), copied.fast.embed.nbytes) is None
    want = _decode(copied, cache)

    mapped, cache2 = _start(bf16, "int4", None)
    table = mapped.fast.embed
    where = pages.mapping_of(table.data_ptr(), table.nbytes)
    assert where is not None and where[2].endswith("model.safetensors")
    assert pages.written(where[0], where[1]) == 0
    assert pages.smaps_bytes(where[0], where[1], "Rss") < 64 << 10  # every page the packing read dropped
    assert torch.equal(_decode(mapped, cache2), want)
    assert pages.smaps_bytes(where[0], where[1], "Rss") < table.nbytes // 4  # the rows of six tokens, not the table


def test_a_written_private_mapping_is_not_dropped(tmp_path):
    """pages.written sees pages this process wrote into a private file mapping (copies that MADV_DONTNEED
    would discard): fastpath then copies the table instead of keeping it mapped."""
    from dsr1.serve.fastpath import _mapped_table

    f = tmp_path / "w.bin"
    f.write_bytes(bytes(1 << 20))
    storage = torch.UntypedStorage.from_file(str(f), shared=False, nbytes=1 << 20)
    t = torch.empty(0, dtype=torch.uint8).set_(storage).view(torch.bfloat16).view(512, 1024)
    where = pages.mapping_of(t.data_ptr(), t.nbytes)
    assert where is not None and pages.written(where[0], where[1]) == 0
    assert _mapped_table(t) == (where[0], where[1])
    t[3, 5] = 1.0
    assert pages.written(where[0], where[1]) == 4096
    assert _mapped_table(t) is None
