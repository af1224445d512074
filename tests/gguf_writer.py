"""Write a Hugging Face checkpoint as a GGUF file (float32 tensors), for tests of the GGUF path on families other
than the demo's. Tensor names come from gguf-py's own name map, the metadata keys from transformers' GGUF reader,
the tokenizer as a GGUF BPE vocabulary. Covers families whose weights GGUF stores as Hugging Face does (no
transposes or rotary permutations): qwen2, phi3 (its fused gate_up as one tensor)."""

from __future__ import annotations

import json
from pathlib import Path


def write_gguf(hf_folder: Path, out_file: Path, arch_name: str) -> Path:
    import gguf
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING

    model = AutoModelForCausalLM.from_pretrained(hf_folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(hf_folder)
    config = model.config
    arch = {name: key for key, name in gguf.MODEL_ARCH_NAMES.items()}[arch_name]
    writer = gguf.GGUFWriter(str(out_file), arch_name)
    writer.add_name(hf_folder.name)
    for gguf_key, hf_key in GGUF_CONFIG_MAPPING[arch_name].items():
        value = getattr(config, hf_key, None) if hf_key else None
        key = f"{arch_name}.{gguf_key}"
        if isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, int):
            writer.add_uint32(key, value)
        elif isinstance(value, float):
            writer.add_float32(key, value)
    vocab = tokenizer.get_vocab()
    tokens = [""] * len(vocab)
    for token, index in vocab.items():
        tokens[index] = token
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([1] * len(tokens))
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    writer.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in merges])
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_pad_token_id(tokenizer.pad_token_id)
    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    for name, tensor in model.state_dict().items():
        gguf_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise ValueError(f"no GGUF name for {name}")
        writer.add_tensor(gguf_name, tensor.float().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out_file
