"""Tiny random-init configs of the decoder-only families of the installed transformers (test_families.py)."""

from __future__ import annotations

VOCAB = 320  # above the test tokenizer's 300 tokens (conftest.make_tokenizer)
_SPECIAL = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0)
_LLAMA_LIKE = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=2, head_dim=16,
                   intermediate_size=48, max_position_embeddings=64)
_MOE = dict(num_local_experts=4, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24)

# model_type -> config kwargs (beside _SPECIAL)
CONFIGS: dict[str, dict] = {
    "gpt2": dict(n_embd=32, n_layer=3, n_head=2, n_inner=48, n_positions=64),
    "gpt_neox": dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=48,
                     max_position_embeddings=64),
    "gptj": dict(n_embd=32, n_layer=3, n_head=2, n_inner=48, rotary_dim=8, n_positions=64),
    "opt": dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, ffn_dim=48, word_embed_proj_dim=32,
                max_position_embeddings=64),
    "bloom": dict(hidden_size=32, n_layer=3, n_head=2),
    "falcon": dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, ffn_hidden_size=48, bias=True),
    "phi": dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=48,
                max_position_embeddings=64),
    "phi3": dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=2,
                 intermediate_size=48, max_position_embeddings=64),
    "llama": dict(_LLAMA_LIKE, mlp_bias=True),
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE,
    "gemma2": _LLAMA_LIKE,
    "gemma3_text": _LLAMA_LIKE,
    "olmo": _LLAMA_LIKE,
    "olmo2": _LLAMA_LIKE,
    "stablelm": _LLAMA_LIKE,
    "starcoder2": _LLAMA_LIKE,
    "granite": _LLAMA_LIKE,
    "cohere": _LLAMA_LIKE,
    "mixtral": dict(_LLAMA_LIKE, **_MOE),
    "qwen2_moe": dict(_LLAMA_LIKE, **_MOE, shared_expert_intermediate_size=40),
    "olmoe": dict(_LLAMA_LIKE, **_MOE),
}


MOE = ("mixtral", "qwen2_moe", "olmoe")
DENSE = tuple(family for family in CONFIGS if family not in MOE)


def tiny_config(family: str, vocab: int = VOCAB):
    from transformers import AutoConfig

    return AutoConfig.for_model(family, **CONFIGS[family], **_SPECIAL, vocab_size=vocab)


def save_tiny_model(folder, family: str, seed: int = 0):
    """A tiny model of the family with the test tokenizer, saved like any user's local checkpoint."""
    from conftest import make_tokenizer

    folder.mkdir(parents=True, exist_ok=True)
    make_tokenizer(folder)
    tiny_model(family, seed).save_pretrained(folder)
    return folder


def tiny_model(family: str, seed: int = 0):
    """A random-init model whose 1-d parameters (biases, norm scales and shifts) are perturbed: Hugging Face
    initialises biases to 0 and norm weights to 1, which would hide a missing bias or norm term."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family))
    with torch.no_grad():
        for _, param in model.named_parameters():
            if param.ndim == 1:
                param.add_(0.3 * torch.randn_like(param))
    return model.float().eval()
