"""Architecture presets for GPT-OSS, as typed data, and their conversion to transformers' GptOssConfig.

`gpt-oss-20b` pins the published config.json of openai/gpt-oss-20b (24 layers; 64 query heads, 8 KV
heads of dim 64 -- "24" is the layer count, not the head count). `tiny` is the same architecture shrunk
so that the whole pipeline trains on a CPU in minutes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

from transformers import GptOssConfig

# Harmony ids of the o200k_harmony encoding that gpt-oss ships with.
O200K_HARMONY_VOCAB = 201088
O200K_PAD_ID = 199999  # <|endoftext|>
O200K_RETURN_ID = 200002  # <|return|>: end of a whole answer; gpt-oss's eos


@dataclass(frozen=True)
class ArchPreset:
    num_hidden_layers: int
    hidden_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    num_local_experts: int
    num_experts_per_tok: int
    intermediate_size: int
    vocab_size: int
    sliding_window: int
    max_position_embeddings: int = 131072
    rope_theta: float = 150000.0
    rope_scaling: dict = field(
        default_factory=lambda: {
            "rope_type": "yarn",
            "factor": 32.0,
            "beta_fast": 32.0,
            "beta_slow": 1.0,
            "truncate": False,
            "original_max_position_embeddings": 4096,
        }
    )
    swiglu_limit: float = 7.0
    swiglu_alpha: float = 1.702
    rms_norm_eps: float = 1e-5
    attention_bias: bool = True
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02


PRESETS: dict[str, ArchPreset] = {
    "gpt-oss-20b": ArchPreset(
        num_hidden_layers=24,
        hidden_size=2880,
        num_attention_heads=64,
        num_key_value_heads=8,
        head_dim=64,
        num_local_experts=32,
        num_experts_per_tok=4,
        intermediate_size=2880,
        vocab_size=O200K_HARMONY_VOCAB,
        sliding_window=128,
    ),
    "tiny": ArchPreset(
        num_hidden_layers=4,
        hidden_size=256,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=32,
        num_local_experts=8,
        num_experts_per_tok=2,
        intermediate_size=256,
        vocab_size=4096,  # replaced by the trained tokenizer's size
        sliding_window=64,
        max_position_embeddings=131072,
        initializer_range=0.05,
    ),
}


def get_preset(name: str) -> ArchPreset:
    if name not in PRESETS:
        raise ValueError(f"model.preset: unknown preset {name!r}; known: {sorted(PRESETS)}")
    return PRESETS[name]


def hf_config(
    preset: ArchPreset,
    *,
    vocab_size: int | None = None,
    router_aux_loss_coef: float = 0.01,
    pad_token_id: int | None = None,
    eos_token_id: int | list[int] | None = None,
) -> GptOssConfig:
    """transformers' GptOssConfig for a preset; sliding and full attention alternate, sliding first."""
    p = replace(preset, vocab_size=vocab_size or preset.vocab_size)
    d = asdict(p)
    rope = dict(d.pop("rope_scaling"), rope_theta=d.pop("rope_theta"))
    layer_types = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(p.num_hidden_layers)]
    return GptOssConfig(
        **d,
        rope_parameters=rope,
        layer_types=layer_types,
        router_aux_loss_coef=router_aux_loss_coef,
        pad_token_id=pad_token_id,
        eos_token_id=eos_token_id,
        output_router_logits=False,
        use_cache=False,
    )
