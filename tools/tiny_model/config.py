"""Architecture of the embedded tiny model: a pixel-space SANA transformer, a tiny Gemma2 text
encoder with a word-level Gemma tokenizer over the shapes vocabulary, and a flow-matching scheduler.

Everything is built in code from these configs (no downloads); `weights/` holds one trained copy.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

from diffusers import FlowMatchEulerDiscreteScheduler, SanaTransformer2DModel
from transformers import Gemma2Config, Gemma2Model, GemmaTokenizer

from solrl_core.scenes import COLORS, DEFAULT_SIZE, NUMBERS, RELATIONS, SHAPES

SPECIAL_TOKENS: tuple[str, ...] = ("<pad>", "<eos>", "<bos>", "<unk>", "<mask>")
WORD_MARK = "\u2581"  # Gemma's normalizer turns every space into this mark
# Prompts start with a determiner; only these words may appear without a leading space.
FIRST_WORDS: tuple[str, ...] = ("a", "an", *NUMBERS)
MAX_PROMPT_TOKENS = 16  # bos + the longest prompt ("a red circle left of a green square": 9 words)


def vocabulary_words() -> list[str]:
    """Every word a prompt of the shapes world can use, in a fixed order."""
    words = ["a", "an", *NUMBERS, *COLORS, *SHAPES, *(s + "s" for s in SHAPES)]
    for rel in RELATIONS:
        words += [w for w in rel.split() if w not in words]
    return words


def _chain(word: str) -> list[tuple[str, str]]:
    """BPE merges that build `word` left to right, one character at a time."""
    return [(word[:i], word[i]) for i in range(1, len(word))]


def build_tokenizer(max_length: int = MAX_PROMPT_TOKENS) -> GemmaTokenizer:
    """A GemmaTokenizer whose BPE merges spell each vocabulary word as exactly one token.

    Gemma's tokenizer has no word splitting (spaces become a mark inside one long pre-token), so an
    empty merge list tokenizes nothing. Merges here grow each word from its first character; all
    space-marked chains rank before the unmarked first-word chains so a merge that starts a first
    word never fires inside a later word.
    """
    marked = [WORD_MARK + w for w in vocabulary_words()]
    tokens: list[str] = list(SPECIAL_TOKENS)
    merges: list[tuple[str, str]] = []
    for word in [*marked, *FIRST_WORDS]:
        for left, right in _chain(word):
            if (left, right) not in merges:
                merges.append((left, right))
        for piece in [*word, *(word[:i] for i in range(2, len(word) + 1))]:
            if piece not in tokens:
                tokens.append(piece)
    vocab = {tok: i for i, tok in enumerate(tokens)}
    # Right padding (as SanaPipeline): the causal encoder's real tokens then never see the padding.
    return GemmaTokenizer(vocab=vocab, merges=merges, model_max_length=max_length, add_bos_token=True,
                          padding_side="right")


@dataclass
class TextEncoderConfig:
    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 16


@dataclass
class TransformerConfig:
    sample_size: int = DEFAULT_SIZE
    patch_size: int = 4  # 8x8 tokens: patch 2 (256 tokens) trains ~4x slower on a shared 2-core CPU
    num_attention_heads: int = 4
    attention_head_dim: int = 32
    num_layers: int = 4
    mlp_ratio: float = 2.5


@dataclass
class TinyModelConfig:
    transformer: TransformerConfig = field(default_factory=TransformerConfig)
    text_encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TinyModelConfig:
        return cls(TransformerConfig(**d["transformer"]), TextEncoderConfig(**d["text_encoder"]))


PRESETS: dict[str, TinyModelConfig] = {
    "default": TinyModelConfig(),
    # For tests: a few seconds to build and step.
    "test": TinyModelConfig(TransformerConfig(patch_size=4, num_attention_heads=2, attention_head_dim=16,
                                              num_layers=2),
                            TextEncoderConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                              num_attention_heads=2, num_key_value_heads=1, head_dim=16)),
}


def build_text_encoder(cfg: TextEncoderConfig, vocab_size: int) -> Gemma2Model:
    config = Gemma2Config(
        vocab_size=vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim,
        query_pre_attn_scalar=cfg.head_dim, max_position_embeddings=64, sliding_window=64,
        pad_token_id=0, eos_token_id=1, bos_token_id=2,
    )
    return Gemma2Model(config)


def build_transformer(cfg: TransformerConfig, caption_channels: int) -> SanaTransformer2DModel:
    width = cfg.num_attention_heads * cfg.attention_head_dim
    return SanaTransformer2DModel(
        in_channels=3, out_channels=3, sample_size=cfg.sample_size, patch_size=cfg.patch_size,
        num_attention_heads=cfg.num_attention_heads, attention_head_dim=cfg.attention_head_dim,
        num_layers=cfg.num_layers, num_cross_attention_heads=cfg.num_attention_heads,
        cross_attention_head_dim=cfg.attention_head_dim, cross_attention_dim=width,
        caption_channels=caption_channels, mlp_ratio=cfg.mlp_ratio,
        # Sin-cos positions: SANA's convolutions alone locate tokens poorly, and prompts say "left of".
        interpolation_scale=1,
    )


def build_scheduler() -> FlowMatchEulerDiscreteScheduler:
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
