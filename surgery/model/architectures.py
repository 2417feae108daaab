"""Published hyperparameters of well-known causal LMs, so they can be built on the meta device offline.

Only architecture is bundled (no weights): enough to trace, inspect and plan a 70B model
in seconds without memory. Values are those of each model's published ``config.json``.
"""

from __future__ import annotations

_OPT = dict(
    model_type="opt",
    vocab_size=50272,
    max_position_embeddings=2048,
    activation_function="relu",
    do_layer_norm_before=True,
    enable_bias=True,
    bos_token_id=2,
    eos_token_id=2,
    pad_token_id=1,
    torch_dtype="float16",
)
_GPT2 = dict(
    model_type="gpt2", vocab_size=50257, n_positions=1024, bos_token_id=50256, eos_token_id=50256, torch_dtype="float32"
)
_LLAMA = dict(
    model_type="llama",
    hidden_act="silu",
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
    attention_bias=False,
    mlp_bias=False,
    torch_dtype="bfloat16",
)
_LLAMA31_ROPE = dict(
    rope_type="llama3",
    factor=8.0,
    low_freq_factor=1.0,
    high_freq_factor=4.0,
    original_max_position_embeddings=8192,
    rope_theta=500000.0,
)

ARCHITECTURES: dict[str, dict] = {
    "facebook/opt-125m": dict(
        _OPT, hidden_size=768, num_hidden_layers=12, num_attention_heads=12, ffn_dim=3072, word_embed_proj_dim=768
    ),
    "facebook/opt-350m": dict(
        _OPT,
        hidden_size=1024,
        num_hidden_layers=24,
        num_attention_heads=16,
        ffn_dim=4096,
        word_embed_proj_dim=512,
        do_layer_norm_before=False,
    ),
    "facebook/opt-1.3b": dict(
        _OPT, hidden_size=2048, num_hidden_layers=24, num_attention_heads=32, ffn_dim=8192, word_embed_proj_dim=2048
    ),
    "facebook/opt-6.7b": dict(
        _OPT, hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, ffn_dim=16384, word_embed_proj_dim=4096
    ),
    "gpt2": dict(_GPT2, n_embd=768, n_layer=12, n_head=12),
    "gpt2-medium": dict(_GPT2, n_embd=1024, n_layer=24, n_head=16),
    "EleutherAI/gpt-j-6B": dict(
        model_type="gptj",
        vocab_size=50400,
        n_positions=2048,
        n_embd=4096,
        n_layer=28,
        n_head=16,
        rotary_dim=64,
        activation_function="gelu_new",
        tie_word_embeddings=False,
        bos_token_id=50256,
        eos_token_id=50256,
        torch_dtype="float32",
    ),
    "meta-llama/Llama-2-7b-hf": dict(
        _LLAMA,
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        max_position_embeddings=4096,
        bos_token_id=1,
        eos_token_id=2,
        torch_dtype="float16",
    ),
    "meta-llama/Llama-3.1-8B": dict(
        _LLAMA,
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=131072,
        rope_parameters=_LLAMA31_ROPE,
        bos_token_id=128000,
        eos_token_id=128001,
    ),
    "meta-llama/Llama-3.1-70B": dict(
        _LLAMA,
        vocab_size=128256,
        hidden_size=8192,
        intermediate_size=28672,
        num_hidden_layers=80,
        num_attention_heads=64,
        num_key_value_heads=8,
        max_position_embeddings=131072,
        rope_parameters=_LLAMA31_ROPE,
        bos_token_id=128000,
        eos_token_id=128001,
    ),
    "mistralai/Mistral-7B-v0.1": dict(
        model_type="mistral",
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=32768,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        sliding_window=4096,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        torch_dtype="bfloat16",
    ),
    "Qwen/Qwen2.5-7B": dict(
        model_type="qwen2",
        vocab_size=152064,
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        max_position_embeddings=131072,
        rms_norm_eps=1e-6,
        rope_theta=1000000.0,
        tie_word_embeddings=False,
        bos_token_id=151643,
        eos_token_id=151643,
        torch_dtype="bfloat16",
    ),
    "google/gemma-2-9b": dict(
        model_type="gemma2",
        vocab_size=256000,
        hidden_size=3584,
        intermediate_size=14336,
        num_hidden_layers=42,
        num_attention_heads=16,
        num_key_value_heads=8,
        head_dim=256,
        max_position_embeddings=8192,
        rms_norm_eps=1e-6,
        sliding_window=4096,
        query_pre_attn_scalar=256,
        final_logit_softcapping=30.0,
        attn_logit_softcapping=50.0,
        hidden_activation="gelu_pytorch_tanh",
        bos_token_id=2,
        eos_token_id=1,
        pad_token_id=0,
        torch_dtype="float32",
    ),
    "microsoft/Phi-3-medium-4k-instruct": dict(
        model_type="phi3",
        vocab_size=32064,
        hidden_size=5120,
        intermediate_size=17920,
        num_hidden_layers=40,
        num_attention_heads=40,
        num_key_value_heads=10,
        max_position_embeddings=4096,
        original_max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=32000,
        pad_token_id=32000,
        torch_dtype="bfloat16",
    ),
}

# Tiny models for tests, demos and CI: a few layers, small hidden size, byte-level vocabulary.
TINY_VOCAB = 260  # 256 bytes + <pad> <bos> <eos> <unk>
_TINY_TOKENS = dict(vocab_size=TINY_VOCAB, pad_token_id=256, bos_token_id=257, eos_token_id=258)

TINY_MODELS: dict[str, dict] = {
    "tiny-opt": dict(
        _TINY_TOKENS,
        model_type="opt",
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        ffn_dim=128,
        max_position_embeddings=256,
        word_embed_proj_dim=64,
        torch_dtype="float32",
    ),
    "tiny-llama": dict(
        _TINY_TOKENS,
        model_type="llama",
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        torch_dtype="float32",
    ),
    "tiny-gpt2": dict(
        _TINY_TOKENS, model_type="gpt2", n_embd=64, n_layer=2, n_head=4, n_positions=256, torch_dtype="float32"
    ),
}
TINY_DEFAULT = "tiny-opt"
TINY_SEED = 1234
