"""`tiny-random`: a seeded four-layer Llama with a byte-level tokenizer, for tests and demos (no downloads).

torch, tokenizers and transformers are imported only when one is built.
"""

from __future__ import annotations

TINY_RANDOM = "tiny-random"
TINY_VERSION = 1  # part of its cache key: bump when the weights built below change
TINY_SEED = 0


# the tiny shape and the byte tokenizer's ids: tiny-random's config, shared with the zoo (engine.models.zoo) and read
# without torch by engine.models.configs.read_config
TINY_TOKENS = {"vocab_size": 260, "bos_token_id": 256, "eos_token_id": 257, "pad_token_id": 258}
TINY_SHAPE = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 1024,
    "initializer_range": 0.1,
}


def tiny_config():
    from transformers import LlamaConfig

    return LlamaConfig(**TINY_TOKENS, **TINY_SHAPE, tie_word_embeddings=True, rms_norm_eps=1e-6)


def byte_tokenizer():
    """A byte-level tokenizer: ids 0..255 are bytes, then <s>, </s>, <pad>, <unk>. No downloads."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    byte_to_char = _bytes_to_unicode()
    vocab = {byte_to_char[b]: b for b in range(256)}
    assert set(vocab) == set(alphabet)
    for i, special in enumerate(["<s>", "</s>", "<pad>", "<unk>"]):
        vocab[special] = 256 + i
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    # like Llama's tokenizers, it adds <s> to a text (add_special_tokens=True); choices and pieces go without
    core.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 256)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
    )


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (what ByteLevel pre-tokenization emits)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def build_tiny_random():
    """The seeded tiny Llama (same weights on every call) and its byte tokenizer."""
    import torch
    from transformers import LlamaForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        model = LlamaForCausalLM(tiny_config())
    model.config.name_or_path = TINY_RANDOM
    return model.eval(), byte_tokenizer()
