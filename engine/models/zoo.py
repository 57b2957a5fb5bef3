"""`tiny-random:FAMILY`: one seeded tiny random model per decoder family users prune (no downloads).

Each is built from the configuration class of transformers' own implementation of that family (the version
pinned in pyproject), small (4 layers, hidden size 64) but with the family's distinctive features switched on:
grouped-query attention, sliding-window and full attention layers mixed in one model, soft-capped logits,
extra norms, fused or transposed projections, parallel attention/MLP, mixture-of-experts with top-k routing.
They share tiny-random's byte-level tokenizer (engine.models.tiny). hierui writes no modeling code for them: the
model classes are transformers'.

torch and transformers are imported only when one is built.
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.models.tiny import TINY_RANDOM, TINY_SHAPE, TINY_TOKENS

PREFIX = f"{TINY_RANDOM}:"
ZOO_VERSION = 1  # part of each member's cache key: bump when the weights built below change
ZOO_SEED = 0

# shared by every member: the byte tokenizer's vocabulary and special ids, and tiny-random's shape
_TOKENS = TINY_TOKENS
_SHAPE = TINY_SHAPE
SLIDING_WINDOW = 16  # small, so that a short test steps past it


@dataclass(frozen=True)
class Family:
    """A member of the zoo: the transformers config class, its arguments, and what it exercises."""

    name: str
    config_class: str
    features: str
    kwargs: dict

    def config(self):
        import transformers

        return getattr(transformers, self.config_class)(**self.kwargs)


def _llama_like(**extra) -> dict:
    return {**_TOKENS, **_SHAPE, **extra}


FAMILIES: dict[str, Family] = {
    family.name: family
    for family in (
        Family(
            "llama",
            "LlamaConfig",
            "Llama 3 layout: GQA, untied LM head, llama3 RoPE scaling",
            _llama_like(
                tie_word_embeddings=False,
                rope_parameters={
                    "rope_type": "llama3",
                    "rope_theta": 500000.0,
                    "factor": 8.0,
                    "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 256,
                },
            ),
        ),
        Family(
            "mistral",
            "MistralConfig",
            "GQA, sliding-window attention on every layer",
            _llama_like(sliding_window=SLIDING_WINDOW, tie_word_embeddings=False),
        ),
        Family(
            "qwen2",
            "Qwen2Config",
            "GQA, q/k/v biases, sliding and full attention layers mixed, tied head",
            _llama_like(
                use_sliding_window=True,
                sliding_window=SLIDING_WINDOW,
                max_window_layers=2,  # layers 0-1 full attention, 2-3 sliding window
                tie_word_embeddings=True,
            ),
        ),
        Family(
            "qwen3",
            "Qwen3Config",
            "GQA, q/k norms, explicit head_dim",
            _llama_like(head_dim=32, tie_word_embeddings=True),
        ),
        Family(
            "gemma2",
            "Gemma2Config",
            "sliding/full alternating, attention and final logit soft-capping, four norms per layer",
            _llama_like(
                head_dim=16,
                sliding_window=SLIDING_WINDOW,
                final_logit_softcapping=3.0,  # small enough to bend these tiny logits
                attn_logit_softcapping=5.0,
                query_pre_attn_scalar=16,
            ),
        ),
        Family(
            "gemma3",
            "Gemma3TextConfig",
            "sliding/full pattern (1 full per 2), q/k norms, four norms per layer, final soft-capping",
            _llama_like(
                head_dim=16,
                sliding_window=SLIDING_WINDOW,
                layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
                final_logit_softcapping=3.0,
                query_pre_attn_scalar=16,
            ),
        ),
        Family(
            "phi3",
            "Phi3Config",
            "fused qkv_proj and gate_up_proj, partial RoPE",
            _llama_like(partial_rotary_factor=0.5, tie_word_embeddings=False),
        ),
        Family(
            "olmo2",
            "Olmo2Config",
            "norms after attention and MLP (no pre-norm), q/k norms",
            _llama_like(tie_word_embeddings=False),
        ),
        Family(
            "gpt_neox",
            "GPTNeoXConfig",
            "Pythia layout: fused head-interleaved query_key_value, parallel attention and MLP, partial RoPE",
            {
                **_TOKENS,
                "hidden_size": 64,
                "intermediate_size": 128,
                "num_hidden_layers": 4,
                "num_attention_heads": 4,
                "max_position_embeddings": 1024,
                "rotary_pct": 0.25,
                "use_parallel_residual": True,
                "tie_word_embeddings": False,
                "initializer_range": 0.1,
            },
        ),
        Family(
            "opt",
            "OPTConfig",
            "learned positions, biases everywhere, MLP as fc1/fc2 inside the layer (no MLP module)",
            {
                **_TOKENS,
                "hidden_size": 64,
                "ffn_dim": 128,
                "num_hidden_layers": 4,
                "num_attention_heads": 4,
                "word_embed_proj_dim": 64,
                "max_position_embeddings": 1024,
                "init_std": 0.1,
            },
        ),
        Family(
            "gpt2",
            "GPT2Config",
            "transposed Conv1D projections, fused c_attn, learned positions, tied head",
            {
                **_TOKENS,
                "n_embd": 64,
                "n_inner": 128,
                "n_layer": 4,
                "n_head": 4,
                "n_positions": 1024,
                "initializer_range": 0.1,
            },
        ),
        Family(
            "mixtral",
            "MixtralConfig",
            "mixture of experts: 4 experts stored as one 3-D tensor, top-2 routing, GQA",
            _llama_like(num_local_experts=4, num_experts_per_tok=2, tie_word_embeddings=False),
        ),
        Family(
            "qwen2_moe",
            "Qwen2MoeConfig",
            "mixture of experts: 4 routed experts (3-D tensor), top-2, a shared expert with its gate",
            _llama_like(
                num_experts=4,
                num_experts_per_tok=2,
                moe_intermediate_size=64,
                shared_expert_intermediate_size=128,
                decoder_sparse_step=1,
                tie_word_embeddings=False,
            ),
        ),
    )
}


def family_of(name: str) -> str | None:
    """'tiny-random:gemma2' -> 'gemma2'; None for a name that is not a zoo member."""
    low = (name or "").strip().lower()
    return low[len(PREFIX) :] if low.startswith(PREFIX) else None


def member_names() -> list[str]:
    return [PREFIX + family for family in FAMILIES]


def check_family(family: str, raw: str | None = None) -> Family:
    from engine.errors import HieruiError

    if family not in FAMILIES:
        known = ", ".join(FAMILIES)
        raise HieruiError(f"unknown tiny-random family '{raw or family}': use tiny-random:FAMILY with one of {known}")
    return FAMILIES[family]


def zoo_config_dict(family: str) -> dict:
    """The member's config as config.json would hold it (for the checks that run before loading)."""
    return check_family(family).config().to_dict()


def build_member(family: str):
    """The seeded tiny model of `family` (same weights on every call) and the byte tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM

    from engine.models.tiny import byte_tokenizer

    config = check_family(family).config()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(ZOO_SEED)
        model = AutoModelForCausalLM.from_config(config)
    model.config.name_or_path = PREFIX + family
    return model.eval(), byte_tokenizer()
