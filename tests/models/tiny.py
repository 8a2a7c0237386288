from nemotron.models.nano3 import Nano3Config


def tiny_config(**overrides) -> Nano3Config:
    """A Nano3-shaped model that differs only in sizes: all four block kinds, GQA, 2 groups."""
    fields = dict(
        hybrid_pattern="ME*EM-",
        num_layers=6,
        hidden_size=32,
        vocab_size=96,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        mamba_num_heads=4,
        mamba_head_dim=8,
        mamba_state_size=8,
        mamba_num_groups=2,
        mamba_conv_kernel=4,
        mamba_chunk_size=4,
        num_experts=8,
        moe_top_k=3,
        moe_ffn_hidden_size=16,
        moe_shared_expert_hidden_size=24,
        ffn_hidden_size=40,
        init_std=0.05,
    )
    fields.update(overrides)
    return Nano3Config(**fields)
