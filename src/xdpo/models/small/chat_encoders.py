"""Tiny chat-model text encoders and their tokenizers, built offline, in the classes the 2025 pipelines load.

- `byte_bpe`: a byte-level BPE (GPT-2 / Qwen style) trained with `tokenizers` on a fixed word list: the
  tests' caption words and the words of Qwen-Image's prompt template, each of which ends as one token, so
  that the template's prefix is the 34 tokens `QwenImagePipeline` drops (`prompt_template_encode_start_idx`),
  as with the real Qwen tokenizer.
- `qwen_tokenizer`: `Qwen2Tokenizer` over that BPE with `<|im_start|>`, `<|im_end|>`, `<think>`, `</think>`
  and a chat template rendering as Qwen3's does for one user message (`enable_thinking=False` adds the
  empty think block, as FLUX.2-klein asks; Z-Image asks `enable_thinking=True`).
- `mistral_tokenizer`: FLUX.2-dev's tokenizer (a `PreTrainedTokenizerFast` over the BPE with Mistral's `<s>`,
  `</s>`, `<pad>`, `[IMG]` tokens and a `[SYSTEM_PROMPT]` / `[INST]` chat template taking content lists, as
  Mistral-Small-3.1's; the real folder's `PixtralProcessor` needs torchvision, see the function).
- `qwen25_vl_encoder`, `qwen3_encoder` (causal LM or bare model), `mistral3_encoder`, `umt5_encoder`: the
  encoders at tiny widths; `layers` is at least the deepest hidden state the pipeline reads (FLUX.2-dev's
  layers 10, 20, 30; klein's 9, 18, 27).
"""

from __future__ import annotations

import json
from typing import Any

QWEN_IMAGE_PREFIX = (
    "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, "
    "spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n"
)
"""The part of QwenImagePipeline's prompt template before the prompt (34 tokens with the real tokenizer)."""
WORDS = (
    "a an the of and with by in on picture photo image painting drawing bright dark number red blue green "
    "square circle cat dog squirrel eating burger system user assistant think video clip frame moving slow "
    "fast 0 1 2 3 4 5 6 7 8 9"
)
QWEN_SPECIALS = ("<|im_start|>", "<|im_end|>", "<think>", "</think>")
QWEN_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}"
    "{% endif %}"
)
"""Qwen3's chat template for plain-text messages (its tool and reasoning branches left out)."""
MISTRAL_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% set text = m['content'] if m['content'] is string else m['content'] | map(attribute='text') | join('') %}"
    "{% if m['role'] == 'system' %}[SYSTEM_PROMPT]{{ text }}[/SYSTEM_PROMPT]"
    "{% elif m['role'] == 'user' %}[INST]{{ text }}[/INST]{% else %}{{ text }}{{ eos_token }}{% endif %}"
    "{% endfor %}"
)
"""Mistral-Small-3.1's chat template for text content lists (its image branch left out)."""
MISTRAL_SPECIALS = (
    "<unk>",
    "<s>",
    "</s>",
    "<pad>",
    "[INST]",
    "[/INST]",
    "[SYSTEM_PROMPT]",
    "[/SYSTEM_PROMPT]",
)
PIXTRAL_IMAGE_TOKENS = ("[IMG]", "[IMG_BREAK]", "[IMG_END]")


def byte_bpe(extra_text: str = "") -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(vocab, merges) of a byte-level BPE trained on WORDS, Qwen-Image's template words and `extra_text`
    until every word is one token (deterministic: a fixed corpus)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    lines = [WORDS, QWEN_IMAGE_PREFIX.replace("<|im_start|>", "").replace("<|im_end|>", ""), extra_text]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=4096,
        min_frequency=1,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(lines + [" " + line for line in lines], trainer)
    model = json.loads(tok.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    return dict(model["vocab"]), merges


def qwen_tokenizer(max_length: int = 2048) -> Any:
    """A `Qwen2Tokenizer` over `byte_bpe` with Qwen's special tokens and chat template (pad <|endoftext|>)."""
    from transformers import Qwen2Tokenizer

    vocab, merges = byte_bpe()
    tok = Qwen2Tokenizer(vocab=vocab, merges=merges, model_max_length=max_length)
    tok.add_special_tokens({"additional_special_tokens": list(QWEN_SPECIALS)})
    tok.chat_template = QWEN_CHAT_TEMPLATE
    return tok


def mistral_tokenizer(max_length: int = 2048) -> Any:
    """FLUX.2-dev's tokenizer: a byte-level BPE `PreTrainedTokenizerFast` with Mistral's specials and chat
    template. The real folder holds a `PixtralProcessor` around such a tokenizer; transformers 5 builds that
    processor only with torchvision, which does not import beside a CPU torch (docs/design.md §7), and
    `Flux2Pipeline` calls the processor's `apply_chat_template` exactly as the tokenizer's for text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab, merges = byte_bpe()
    model = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    model.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    model.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=model,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        model_max_length=max_length,
    )
    tok.add_special_tokens({"additional_special_tokens": [*MISTRAL_SPECIALS[4:], *PIXTRAL_IMAGE_TOKENS]})
    tok.chat_template = MISTRAL_CHAT_TEMPLATE
    return tok


def _ids(tok: Any) -> dict[str, Any]:
    return {"vocab_size": len(tok), "pad_token_id": tok.pad_token_id, "eos_token_id": tok.eos_token_id}


def qwen25_vl_encoder(tok: Any, *, hidden: int = 32, layers: int = 2) -> Any:
    """A `Qwen2_5_VLForConditionalGeneration` (Qwen-Image's encoder): 2 heads of hidden / 2 with M-RoPE
    sections summing to half the head dim, and a 1-block vision tower."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    half = hidden // 2 // 2  # rotary pairs per head (2 heads)
    t = half // 4  # Qwen2.5-VL's sections [16, 24, 24] of 64, at this size
    h = (half - t) // 2
    text = {
        **_ids(tok),
        "bos_token_id": None,
        "hidden_size": hidden,
        "intermediate_size": 2 * hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "max_position_embeddings": 4096,
        "rope_parameters": {"rope_type": "default", "mrope_section": [t, h, half - t - h], "rope_theta": 1e6},
    }
    vision = {
        "depth": 1,
        "hidden_size": 16,
        "intermediate_size": 32,
        "num_heads": 2,
        "out_hidden_size": hidden,
        "fullatt_block_indexes": [0],
    }
    return Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(text_config=text, vision_config=vision))


def qwen3_encoder(tok: Any, *, hidden: int = 16, layers: int = 2, causal_lm: bool = True) -> Any:
    """A `Qwen3ForCausalLM` (FLUX.2-klein's encoder) or `Qwen3Model` (Z-Image's), 2 heads of 8."""
    from transformers import Qwen3Config, Qwen3ForCausalLM, Qwen3Model

    config = Qwen3Config(
        **_ids(tok),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        max_position_embeddings=4096,
    )
    return (Qwen3ForCausalLM if causal_lm else Qwen3Model)(config)


def mistral3_encoder(tok: Any, *, hidden: int = 16, layers: int = 30) -> Any:
    """A `Mistral3ForConditionalGeneration` (FLUX.2-dev's Mistral-Small-3.1): a Mistral LM of `layers` layers
    (2 heads of 8) and a 1-layer Pixtral vision tower."""
    from transformers import (
        Mistral3Config,
        Mistral3ForConditionalGeneration,
        MistralConfig,
        PixtralVisionConfig,
    )

    text = MistralConfig(
        **_ids(tok),
        bos_token_id=tok.bos_token_id,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        max_position_embeddings=4096,
    )
    vision = PixtralVisionConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, head_dim=8,
        image_size=64, patch_size=8,
    )  # fmt: skip
    config = Mistral3Config(
        vision_config=vision,
        text_config=text,
        image_token_index=tok.convert_tokens_to_ids("[IMG]"),
        spatial_merge_size=2,
    )
    return Mistral3ForConditionalGeneration(config)


def umt5_encoder(tok: Any, *, d_model: int = 48) -> Any:
    """A 2-layer `UMT5EncoderModel` (Wan's encoder, per-layer relative attention) over `tok`'s vocabulary."""
    from transformers import UMT5Config, UMT5EncoderModel

    config = UMT5Config(
        vocab_size=len(tok),
        d_model=d_model,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
        feed_forward_proj="gated-gelu",
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        decoder_start_token_id=tok.pad_token_id,
        is_encoder_decoder=False,
    )
    return UMT5EncoderModel(config)
