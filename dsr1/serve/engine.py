"""The embedded engine adapter: a transformers causal LM driven one step at a time.

The scheduler calls `prefill` (one prompt chunk into one slot) and `decode` (one
token for every running slot) and never touches transformers itself. Masks and
position ids are built here and passed ready-made, so the model's own mask
builder and cache bookkeeping are bypassed (a 4-D mask is used as is by
transformers.masking_utils).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from dsr1.errors import ConfigError, UsageError
from dsr1.serve.kvcache import SlotCache

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}

# DeepSeek-R1's chat template (tokenizer_config.json of deepseek-ai/DeepSeek-R1-Distill-Qwen-*, revision
# after DeepSeek appended "<think>\n" to the generation prompt), without the tool-call branches.
# Earlier assistant turns keep only the text after </think>, as the R1 template does.
R1_CHAT_TEMPLATE = (
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}"
    "{% set ns = namespace(system_prompt='') %}"
    "{%- for message in messages %}{%- if message['role'] == 'system' %}"
    "{% set ns.system_prompt = message['content'] %}{%- endif %}{%- endfor %}"
    "{{ bos_token }}{{ ns.system_prompt }}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'user' %}{{ '<｜User｜>' + message['content'] }}{%- endif %}"
    "{%- if message['role'] == 'assistant' and message['content'] is not none %}"
    "{% set content = message['content'] %}{% if '</think>' in content %}"
    "{% set content = content.split('</think>')[-1] %}{% endif %}"
    "{{ '<｜Assistant｜>' + content + '<｜end▁of▁sentence｜>' }}{%- endif %}"
    "{%- endfor -%}"
    "{% if add_generation_prompt %}{{ '<｜Assistant｜><think>\\n' }}{% endif %}"
)
R1_ASSISTANT_TOKEN = "<｜Assistant｜>"


def parse_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name.lower()]
    except KeyError:
        raise UsageError(f"unknown dtype {name!r}", hint="use --dtype auto, bf16, fp16 or fp32") from None



class EmbeddedModel:
    """One loaded model plus its tokenizer; `prefill`/`decode` run one forward each."""

    def __init__(self, model_dir: Path, *, dtype: torch.dtype, device_map: str | None = None,
                 max_memory: dict[Any, str] | None = None, offload_dir: Path | None = None, threads: int | None = None,
                 fast_path: bool = True, quantize: str = "none", weights: str | None = None):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if threads:
            torch.set_num_threads(threads)
        if not (Path(model_dir) / "config.json").is_file():
            raise ConfigError(f"{model_dir} is not a model directory (no config.json)",
                              hint="pass a directory made by `dsr1 pull` or save_pretrained")
        t0 = time.perf_counter()
        kwargs: dict[str, Any] = {"dtype": dtype, "attn_implementation": "sdpa"}
        if device_map and device_map != "cpu":
            kwargs["device_map"] = device_map
            if max_memory:
                kwargs["max_memory"] = max_memory
            if offload_dir:
                kwargs["offload_folder"] = str(offload_dir)
        if quantize != "none":
            # bitsandbytes while loading (what `dsr1 pull --quant` stores, without the stored copy);
            # a checkpoint that is already quantized keeps its own config.
            import json

            from dsr1.quantize import bnb_config

            cfg_json = json.loads((Path(model_dir) / "config.json").read_text())
            if "quantization_config" not in cfg_json:
                kwargs["quantization_config"] = bnb_config(quantize)
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs).eval()
        self.dtype = dtype
        cfg = self.model.config
        self.layers = cfg.num_hidden_layers
        self.kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        if getattr(cfg, "kv_lora_rank", None) or getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", False):
            # MLA (DeepseekV3) and sliding windows store keys differently; the slot cache assumes plain GQA.
            raise ConfigError(f"{cfg.model_type} attention is not supported by the embedded engine's slot cache",
                              hint="serve an R1 distill (Qwen2/Llama) on the embedded engine")
        self.input_device = self.model.get_input_embeddings().weight.device
        if self.input_device.type == "meta":
            self.input_device = torch.device("cpu")
        self.vocab = self.model.get_output_embeddings().weight.shape[0]
        self.eos_ids = _eos_ids(self.model, self.tokenizer)
        vocab = self.tokenizer.get_vocab()
        self.is_r1 = R1_ASSISTANT_TOKEN in vocab
        self.has_think = "</think>" in vocab
        if self.is_r1 and not self.tokenizer.chat_template:
            self.tokenizer.chat_template = R1_CHAT_TEMPLATE
        self.max_position = int(getattr(cfg, "max_position_embeddings", 0) or 2048)
        # The lean forward (dsr1.serve.fastpath) when this model takes it; made with the cache,
        # which fixes the longest position its RoPE tables need.
        from dsr1.serve.fastpath import unsupported_reason

        self.fast = None
        self.fast_reason = unsupported_reason(self.model) if fast_path else "turned off (--no-fast-path)"
        self.weights = weights  # weight-only int8/int4 (dsr1.serve.wquant): the fast path packs them
        if weights and self.fast_reason is not None:
            raise ConfigError(f"weight-only {weights} needs the embedded engine's fast path, which this model "
                              f"cannot take: {self.fast_reason}", hint="use --precision nf4 or bf16")
        if weights and self.input_device.type != "cpu":
            raise ConfigError(f"weight-only {weights} runs on the CPU", hint="on a GPU use --engine vllm")
        self.weights_store: Path | None = None  # where int8/int4 weights are kept between starts (dsr1.serve.wstore)
        self.adapters: list[list[dict]] = []  # LoRA adapters, id i+1 (dsr1.lora.load's layout)
        self.load_seconds = time.perf_counter() - t0

    def _layer_devices(self) -> list[torch.device]:
        devs = []
        for layer in self.model.model.layers:
            d = next(layer.parameters()).device
            devs.append(self.input_device if d.type == "meta" else d)
        return devs

    def pack_weights(self) -> bool:
        """bf16 on a CPU, eager fast path: reorder the weights for oneDNN once (dsr1.serve.wquant,
        PACKED); later FastForwards (a longer context) reuse them. Whether it was done."""
        from dsr1.serve.wquant import PACKED, can_pack

        if (self.fast is None or self.weights or self.dtype != torch.bfloat16 or self.input_device.type != "cpu"
                or (self.fast.compiled and not self.fast.ahead_of_time) or not can_pack()):
            return False
        self.fast.pack(self.model)
        self.weights = PACKED
        return True

    def make_cache(self, slots: int, max_len: int) -> SlotCache:
        if self.fast_reason is None and (self.fast is None or self.fast.max_len < max_len):
            from dsr1.serve.fastpath import FastForward

            self.fast = FastForward(self.model, max_len, quant=self.weights, store=self.weights_store)
            for per_layer in self.adapters:  # ids stay as they were: i+1
                self.fast.add_adapter(per_layer)
        return SlotCache(self.layers, slots, self.kv_heads, max_len, self.head_dim, self.dtype, self._layer_devices())

    @property
    def path(self) -> str:
        """Which forward runs: "compiled", "fast" (lean eager) or "transformers"."""
        if self.fast is None:
            return "transformers"
        return "compiled" if self.fast.compiled else "fast"

    def kv_bytes_per_token(self) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * torch.empty(0, dtype=self.dtype).element_size()

    @torch.inference_mode()
    def load_adapter(self, adapter) -> int:
        """Load a LoRA adapter (dsr1.lora.Adapter, checked against this model) for per-row use; its id."""
        from dsr1 import lora

        if self.fast_reason is not None:
            raise ConfigError(f"LoRA adapters need the embedded engine's fast path, which this model cannot take: "
                              f"{self.fast_reason}", hint="serve the adapters with --engine vllm")
        self.adapters.append(lora.load(adapter, layers=self.layers, dtype=self.dtype, device=self.input_device))
        if self.fast is not None:
            self.fast.add_adapter(self.adapters[-1])
        return len(self.adapters)

    def prefill(self, cache: SlotCache, slot: int, tokens: list[int], start: int, adapter: int = 0) -> torch.Tensor:
        """Append `tokens` to row `slot` after `start` cached positions; logits of the last one."""
        if self.fast is not None:
            return self.fast.prefill(cache, slot, tokens, start, adapter)
        c = len(tokens)
        dev = self.input_device
        ids = torch.tensor([tokens], device=dev)
        pos = torch.arange(start, start + c, device=dev).unsqueeze(0)
        cols = torch.arange(start + c, device=dev)
        mask = (cols[None, :] <= pos[0][:, None]).view(1, 1, c, start + c)
        cache.for_prefill(slot, start)
        out = self.model(input_ids=ids, position_ids=pos, attention_mask=mask, cache=cache, use_cache=True,
                         logits_to_keep=1)
        return out.logits[0, -1].float()

    @torch.inference_mode()
    def prefill_rows(self, cache: SlotCache, first: int, prompts: list[list[int]],
                     adapters: list[int] | None = None) -> torch.Tensor:
        """Whole prompts into rows first.. in one forward (right-padded); logits of each last token."""
        if self.fast is not None:
            return self.fast.prefill_rows(cache, first, prompts, adapters)
        n, L = len(prompts), max(len(p) for p in prompts)
        dev = self.input_device
        ids = torch.zeros(n, L, dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, : len(p)] = torch.tensor(p)
        lens = torch.tensor([len(p) for p in prompts], device=dev)
        cols = torch.arange(L, device=dev)
        # causal, and never a padded key; padded queries still see column 0 (no all-masked rows)
        mask = (cols[None, None, :] <= cols[None, :, None]) & (cols[None, None, :] < lens[:, None, None])
        cache.for_prefill_rows(first, n)
        out = self.model.get_decoder()(input_ids=ids.to(dev), position_ids=cols.expand(n, L),
                                       attention_mask=mask[:, None], cache=cache, use_cache=True)
        last = out.last_hidden_state[torch.arange(n, device=dev), lens - 1]
        head = self.model.get_output_embeddings()
        return head(last.to(head.weight.device)).float()

    @torch.inference_mode()
    def decode(self, cache: SlotCache, tokens: list[int], positions: list[int],
               adapters: list[int] | None = None) -> torch.Tensor:
        """One token for each of rows 0..n-1; row i's token sits at positions[i]. Logits [n, vocab]."""
        if self.fast is not None:
            return self.fast.decode(cache, tokens, positions, adapters)
        n = len(tokens)
        dev = self.input_device
        ids = torch.tensor(tokens, device=dev).view(n, 1)
        pos = torch.tensor(positions, device=dev)
        span = max(positions) + 1
        mask = (torch.arange(span, device=dev)[None, :] <= pos[:, None]).view(n, 1, 1, span)
        cache.for_decode(n, pos, span)
        out = self.model(input_ids=ids, position_ids=pos.view(n, 1), attention_mask=mask, cache=cache,
                         use_cache=True)
        return out.logits[:, -1].float()

    def verify(self, cache: SlotCache, rows: list[list[int]], starts: list[int],
               adapters: list[int] | None = None) -> torch.Tensor:
        """Row i appends rows[i] at starts[i].. (speculative decoding); logits [n, t, vocab]. Fast path only."""
        if self.fast is None:
            raise ConfigError(f"speculative decoding needs the embedded engine's fast path: {self.fast_reason}")
        return self.fast.verify(cache, rows, starts, adapters)


def _eos_ids(model, tokenizer) -> set[int]:
    ids: set[int] = set()
    for src in (getattr(model, "generation_config", None), model.config):
        e = getattr(src, "eos_token_id", None) if src is not None else None
        if isinstance(e, int):
            ids.add(e)
        elif isinstance(e, (list, tuple)):
            ids.update(int(x) for x in e)
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return ids
