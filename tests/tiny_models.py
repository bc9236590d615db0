"""Small random Hugging Face models and an offline tokenizer for tests (no hub)."""
from __future__ import annotations

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers


def byte_tokenizer():
    """Byte-level tokenizer with no merges: 256 byte tokens + <eos>; encodes any text, offline."""
    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<eos>", bos_token="<eos>")


VOCAB = 257  # byte_tokenizer's size

# hidden 96 = 3 x 32: group 32 divides it, 64 does not (like SmolLM2's 576 and 128)
ARCHS = {
    "llama": lambda: transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=96, intermediate_size=192, num_hidden_layers=2, num_attention_heads=6,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True),
    "qwen2": lambda: transformers.Qwen2Config(
        vocab_size=VOCAB, hidden_size=96, intermediate_size=192, num_hidden_layers=2, num_attention_heads=6,
        num_key_value_heads=2, max_position_embeddings=256),
    "mistral": lambda: transformers.MistralConfig(
        vocab_size=VOCAB, hidden_size=96, intermediate_size=192, num_hidden_layers=2, num_attention_heads=6,
        num_key_value_heads=2, max_position_embeddings=256, sliding_window=16),
    "opt": lambda: transformers.OPTConfig(
        vocab_size=VOCAB, hidden_size=96, ffn_dim=192, num_hidden_layers=2, num_attention_heads=6,
        max_position_embeddings=256, word_embed_proj_dim=96),
    "gpt2": lambda: transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=96, n_layer=2, n_head=6, n_positions=256, bos_token_id=VOCAB - 1,
        eos_token_id=VOCAB - 1),
}

# issue 28's architectures (tests/test_architectures.py), apart from ARCHS so the tests parametrized over ARCHS keep
# their set: the sliding window (8) is shorter than the test sequences, and Gemma's layer_types alternate so both
# attention kinds (each with its own mask and rotary table) run
MORE_ARCHS = {
    "llama3": lambda: transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=96, intermediate_size=192, num_hidden_layers=2, num_attention_heads=6,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
    "qwen3": lambda: transformers.Qwen3Config(  # q_norm / k_norm on each head
        vocab_size=VOCAB, hidden_size=96, intermediate_size=192, num_hidden_layers=2, num_attention_heads=6,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=256),
    "gemma2": lambda: transformers.Gemma2Config(
        vocab_size=VOCAB, hidden_size=96, intermediate_size=192, num_hidden_layers=2, num_attention_heads=6,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=256, sliding_window=8,
        layer_types=["sliding_attention", "full_attention"], query_pre_attn_scalar=16,
        final_logit_softcapping=30.0, attn_logit_softcapping=50.0),
    "gemma3": lambda: transformers.Gemma3TextConfig(
        vocab_size=VOCAB, hidden_size=96, intermediate_size=192, num_hidden_layers=2, num_attention_heads=6,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=256, sliding_window=8,
        layer_types=["sliding_attention", "full_attention"], query_pre_attn_scalar=16, final_logit_softcapping=30.0),
    "phi3": lambda: transformers.Phi3Config(  # fused qkv_proj and gate_up_proj
        vocab_size=VOCAB, hidden_size=96, intermediate_size=192, num_hidden_layers=2, num_attention_heads=6,
        num_key_value_heads=2, max_position_embeddings=256, original_max_position_embeddings=256,
        bos_token_id=VOCAB - 1, eos_token_id=VOCAB - 1, pad_token_id=VOCAB - 1),
    # mixture of experts: 4 experts, top-2, hidden 64; the experts are fused 3-D weights (gate_up_proj [4, 2I, 64],
    # down_proj [4, 64, I]) and the router a TopKRouter, not nn.Linear
    "mixtral": lambda: transformers.MixtralConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, num_local_experts=4, num_experts_per_tok=2),
    "qwen3_moe": lambda: transformers.Qwen3MoeConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, moe_intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256, num_experts=4,
        num_experts_per_tok=2),
    # Qwen2-MoE: routed experts plus a shared expert (nn.Linear MLP) and its sigmoid gate nn.Linear(H, 1)
    "qwen2_moe": lambda: transformers.Qwen2MoeConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, moe_intermediate_size=64,
        shared_expert_intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=256, num_experts=4, num_experts_per_tok=2),
}


def tiny_model(arch: str = "llama", seed: int = 0, dtype=torch.float32, **overrides):
    """A random model of `arch`; overrides set config fields (e.g. attention_dropout=0.5)."""
    torch.manual_seed(seed)
    cfg = (ARCHS[arch] if arch in ARCHS else MORE_ARCHS[arch])()
    for key, value in overrides.items():
        setattr(cfg, key, value)
    cfg.eos_token_id = cfg.bos_token_id = cfg.pad_token_id = VOCAB - 1
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():  # random init is tiny; make weights and activations lively so quantization matters
        for p in model.parameters():
            if p.dim() in (2, 3):  # 3: fused experts [E, out, in]
                p.normal_(0, 0.08)
    # drawn in float32, then rounded: a half model is the float model's rounding on every torch (normal_ of a bf16
    # tensor draws other numbers on other torch versions and devices' kernels)
    return model.to(dtype)


def token_batch(n: int = 8, seqlen: int = 32, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB - 1, (n, seqlen), generator=g)
