"""Shared cases of the interop and eval tests: corpus text, tiny model architectures, and a file-tree snapshot."""

from __future__ import annotations

from pathlib import Path

# Text with multi-byte UTF-8, special-token look-alikes and code, so the tokenizer learns merges across all of it.
TEXTS = [
    "The quick brown fox jumps over the lazy dog. Déjà vu: naïve façade, 日本語のテキスト, emoji 🙂!",
    "def add(x, y):\n    return x + y\n\nclass Point:\n    pass\n",
    "A document may mention <|eos|> or <|bos|> as plain text; it is still one document.",
    "Zürich, Kraków and São Paulo are cities. Numbers: 12345 678 9.",
] * 8

# model.* overrides on the `tiny` preset (which has QK-norm) per architecture (vocab and context set by make_run)
ARCHES = {
    "gpt2": [
        "model.position=learned",
        "model.norm=layernorm",
        "model.ffn=mlp",
        "model.activation=gelu_tanh",
        "model.bias=true",
        "model.n_kv_heads=0",
        "model.tie_embeddings=true",
        "model.qk_norm=false",
    ],
    "llama-gqa-tied": ["model.n_kv_heads=2", "model.tie_embeddings=true", "model.qk_norm=false"],
    "llama-gqa-untied": [
        "model.n_kv_heads=2",
        "model.tie_embeddings=false",
        "model.rope_theta=5000.0",
        "model.qk_norm=false",
    ],
    "qwen3": ["model.qk_norm=true", "model.n_kv_heads=2", "model.tie_embeddings=true", "model.norm_eps=1e-6"],
}
HF_CLASS = {
    "gpt2": "GPT2LMHeadModel",
    "llama-gqa-tied": "LlamaForCausalLM",
    "llama-gqa-untied": "LlamaForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}


def tree(root: Path) -> dict[str, bytes]:
    """Every file under `root` with its content: equal before and after means nothing was changed."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
