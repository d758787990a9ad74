"""Tiny random models of every architecture in the table, built offline in seconds."""
from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from transplant_core.zoo.tokenizer import VOCAB_SIZE, build_tokenizer

ARCH_CONFIGS = {
    "llama": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128),
    "mistral": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=128),
    "qwen2": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128),
    "gemma2": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=8, max_position_embeddings=128),
    "phi3": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=4, max_position_embeddings=128),
    "gpt2": dict(n_embd=32, n_layer=2, n_head=4, n_positions=128),
    "gpt_neox": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                     max_position_embeddings=128),
    "opt": dict(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=128, word_embed_proj_dim=32),
    "stablelm": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=4, max_position_embeddings=128),
    "falcon": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4),
    "mixtral": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, num_local_experts=2, num_experts_per_tok=1, max_position_embeddings=128),
    "bloom": dict(hidden_size=32, n_layer=2, n_head=4),      # not in the table: the generic fallback
}


def make_config(arch: str, **overrides):
    from transformers import AutoConfig

    tok = build_tokenizer()
    kw = dict(ARCH_CONFIGS[arch], vocab_size=VOCAB_SIZE, pad_token_id=tok.pad_token_id,
              bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    kw.update(overrides)
    return AutoConfig.for_model(arch, **kw)


def make_model(arch: str = "llama", seed: int = 0, **overrides):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(make_config(arch, **overrides))
    model.eval()
    return model


def save(model, path: Path) -> Path:
    path = Path(path)
    model.save_pretrained(path)
    build_tokenizer().save_pretrained(path)
    return path
