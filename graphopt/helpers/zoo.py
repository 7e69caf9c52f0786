"""Small models built from HuggingFace configs (no download), for tests, benchmarks and examples.

Each config is the architecture's default apart from small sizes (and token ids that fit the small
vocabulary): KV caches are on, as users hold these models. ``hf_model(name)`` returns
``(model, example_inputs)`` with random weights in eval mode; :data:`ZOO` holds the base models,
:data:`TASK_ZOO` models with task heads (causal LM, seq2seq, classification, masked LM).
``llama_meta()`` builds a 7B- or 405B-shaped Llama on the ``meta`` device (no memory for weights).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn


def _text_inputs(vocab: int, batch: int = 2, seq: int = 16, mask: bool = True) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (batch, seq), generator=g)
    out = {"input_ids": ids}
    if mask:
        out["attention_mask"] = torch.ones(batch, seq, dtype=torch.long)
    return out


def _pixels(size: int, channels: int = 3, batch: int = 2) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"pixel_values": torch.randn(batch, channels, size, size, generator=g)}


def _bert() -> tuple[Any, dict]:
    from transformers import BertConfig, BertModel

    cfg = BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=64)
    return BertModel(cfg), _text_inputs(128)


def _gpt2() -> tuple[Any, dict]:
    from transformers import GPT2Config, GPT2Model

    cfg = GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                     bos_token_id=0, eos_token_id=0)
    return GPT2Model(cfg), _text_inputs(128)


def _llama() -> tuple[Any, dict]:
    from transformers import LlamaConfig, LlamaModel

    cfg = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaModel(cfg), _text_inputs(128)


def _vit() -> tuple[Any, dict]:
    from transformers import ViTConfig, ViTModel

    cfg = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                    intermediate_size=64)
    return ViTModel(cfg), _pixels(32)


def _resnet() -> tuple[Any, dict]:
    from transformers import ResNetConfig, ResNetModel

    cfg = ResNetConfig(embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], layer_type="bottleneck")
    return ResNetModel(cfg), _pixels(32)


def _roberta() -> tuple[Any, dict]:
    from transformers import RobertaConfig, RobertaModel

    cfg = RobertaConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=64)
    return RobertaModel(cfg), _text_inputs(128)


def _distilbert() -> tuple[Any, dict]:
    from transformers import DistilBertConfig, DistilBertModel

    cfg = DistilBertConfig(vocab_size=128, dim=32, n_layers=2, n_heads=4, hidden_dim=64, max_position_embeddings=64)
    return DistilBertModel(cfg), _text_inputs(128)


def _qwen2() -> tuple[Any, dict]:
    from transformers import Qwen2Config, Qwen2Model

    cfg = Qwen2Config(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return Qwen2Model(cfg), _text_inputs(128)


def _mistral() -> tuple[Any, dict]:
    from transformers import MistralConfig, MistralModel

    cfg = MistralConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=64,
                        sliding_window=8)
    return MistralModel(cfg), _text_inputs(128)


def _t5_encoder() -> tuple[Any, dict]:
    from transformers import T5Config, T5EncoderModel

    cfg = T5Config(vocab_size=128, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4)
    return T5EncoderModel(cfg), _text_inputs(128)


def _whisper_encoder() -> tuple[Any, dict]:
    from transformers import WhisperConfig
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    cfg = WhisperConfig(vocab_size=128, d_model=32, encoder_layers=2, encoder_attention_heads=4,
                        encoder_ffn_dim=64, num_mel_bins=16, max_source_positions=32, pad_token_id=0,
                        bos_token_id=1, eos_token_id=2, decoder_start_token_id=1)
    g = torch.Generator().manual_seed(0)
    return WhisperEncoder(cfg), {"input_features": torch.randn(2, 16, 64, generator=g)}  # 2 x max_source_positions


def _swin() -> tuple[Any, dict]:
    from transformers import SwinConfig, SwinModel

    cfg = SwinConfig(image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[2, 4], window_size=4)
    return SwinModel(cfg), _pixels(32)


def _convnext() -> tuple[Any, dict]:
    from transformers import ConvNextConfig, ConvNextModel

    cfg = ConvNextConfig(hidden_sizes=[16, 32], depths=[1, 1], num_stages=2)
    return ConvNextModel(cfg), _pixels(32)


def _mobilenet_v2() -> tuple[Any, dict]:
    from transformers import MobileNetV2Config, MobileNetV2Model

    cfg = MobileNetV2Config(image_size=32, depth_multiplier=0.25, finegrained_output=False)
    return MobileNetV2Model(cfg), _pixels(32)


def _opt() -> tuple[Any, dict]:
    from transformers import OPTConfig, OPTModel

    cfg = OPTConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, ffn_dim=64, num_attention_heads=4,
                    max_position_embeddings=64, word_embed_proj_dim=32)
    return OPTModel(cfg), _text_inputs(128)


def _phi3() -> tuple[Any, dict]:
    from transformers import Phi3Config, Phi3Model

    cfg = Phi3Config(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                     pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return Phi3Model(cfg), _text_inputs(128)


def _gemma() -> tuple[Any, dict]:
    from transformers import GemmaConfig, GemmaModel

    cfg = GemmaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=1, head_dim=8, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return GemmaModel(cfg), _text_inputs(128)


def _falcon() -> tuple[Any, dict]:
    from transformers import FalconConfig, FalconModel

    cfg = FalconConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                       new_decoder_architecture=True, num_kv_heads=2, bos_token_id=1,
                       eos_token_id=2)
    return FalconModel(cfg), _text_inputs(128)


def _bloom() -> tuple[Any, dict]:
    from transformers import BloomConfig, BloomModel

    cfg = BloomConfig(vocab_size=128, hidden_size=32, n_layer=2, n_head=4, bos_token_id=1,
                      eos_token_id=2, pad_token_id=0)
    return BloomModel(cfg), _text_inputs(128)


def _efficientnet() -> tuple[Any, dict]:
    from transformers import EfficientNetConfig, EfficientNetModel

    cfg = EfficientNetConfig(image_size=32, width_coefficient=0.25, depth_coefficient=0.2, hidden_dim=320,
                             num_hidden_layers=4)
    return EfficientNetModel(cfg), _pixels(32)


def _regnet() -> tuple[Any, dict]:
    from transformers import RegNetConfig, RegNetModel

    cfg = RegNetConfig(embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], groups_width=8)
    return RegNetModel(cfg), _pixels(32)


def _causal_lm(family: str) -> Callable[[], tuple[Any, dict]]:
    def build() -> tuple[Any, dict]:
        import transformers

        base, inputs = ZOO[family]()
        head = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "gpt2": "GPT2LMHeadModel"}[family]
        return getattr(transformers, head)(base.config), {"input_ids": inputs["input_ids"]}

    return build


def _t5() -> tuple[Any, dict]:
    from transformers import T5Config, T5ForConditionalGeneration

    cfg = T5Config(vocab_size=128, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, decoder_start_token_id=0)
    ids = _text_inputs(128)["input_ids"]
    return T5ForConditionalGeneration(cfg), {"input_ids": ids, "decoder_input_ids": ids[:, :5]}


def _whisper() -> tuple[Any, dict]:
    from transformers import WhisperForConditionalGeneration

    encoder, inputs = _whisper_encoder()
    cfg = encoder.config
    cfg.decoder_layers, cfg.decoder_attention_heads, cfg.decoder_ffn_dim, cfg.max_target_positions = 2, 4, 64, 32
    ids = _text_inputs(128)["input_ids"][:, :4]
    return WhisperForConditionalGeneration(cfg), {**inputs, "decoder_input_ids": ids}


def _bert_head(head: str) -> Callable[[], tuple[Any, dict]]:
    def build() -> tuple[Any, dict]:
        import transformers

        base, inputs = _bert()
        return getattr(transformers, head)(base.config), inputs

    return build


def _vit_classifier() -> tuple[Any, dict]:
    from transformers import ViTForImageClassification

    base, inputs = _vit()
    base.config.num_labels = 5
    return ViTForImageClassification(base.config), inputs


#: name -> builder. Text models take ``input_ids`` + ``attention_mask`` (2 x 16); vision models
#: ``pixel_values`` (2 x 3 x 32 x 32); whisper_encoder ``input_features`` (2 x 16 mel bins x 64).
#: GQA: llama (4 query / 2 KV heads), qwen2 (4/2), mistral (4/1, sliding window).
ZOO: dict[str, Callable[[], tuple[Any, dict]]] = {
    "bert": _bert, "gpt2": _gpt2, "llama": _llama, "vit": _vit, "resnet": _resnet,
    "roberta": _roberta, "distilbert": _distilbert, "qwen2": _qwen2, "mistral": _mistral,
    "t5_encoder": _t5_encoder, "whisper_encoder": _whisper_encoder, "swin": _swin, "convnext": _convnext,
    "mobilenet_v2": _mobilenet_v2, "opt": _opt, "phi3": _phi3, "gemma": _gemma, "falcon": _falcon,
    "bloom": _bloom, "efficientnet": _efficientnet, "regnet": _regnet,
}


#: Task heads on the base models above: what users load with ``AutoModelFor*``.
TASK_ZOO: dict[str, Callable[[], tuple[Any, dict]]] = {
    "llama_causal_lm": _causal_lm("llama"), "qwen2_causal_lm": _causal_lm("qwen2"),
    "gpt2_lm_head": _causal_lm("gpt2"), "t5": _t5, "whisper": _whisper,
    "bert_sequence_classification": _bert_head("BertForSequenceClassification"),
    "bert_masked_lm": _bert_head("BertForMaskedLM"), "vit_image_classification": _vit_classifier,
}


_LAYER_COUNTS = ("num_hidden_layers", "n_layer", "num_layers", "num_decoder_layers", "encoder_layers",
                 "decoder_layers")


def hf_model(name: str, *, seed: int = 0, use_cache: bool | None = None, layers: int | None = None
             ) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """A tiny HF model ``name`` (of :data:`ZOO` or :data:`TASK_ZOO`) in eval mode, with example inputs.

    ``use_cache`` overrides the config's default (``None``: keep it, which for decoders is ``True``);
    ``layers`` sets the number of blocks of every stack (default: 2).
    """
    builders = {**ZOO, **TASK_ZOO}
    if name not in builders:
        raise KeyError(f"unknown zoo model {name!r}; choose from {', '.join(builders)}")
    torch.manual_seed(seed)
    model, inputs = builders[name]()
    if layers is not None:
        cfg = model.config
        for key in _LAYER_COUNTS:
            if isinstance(vars(cfg).get(key), int):
                setattr(cfg, key, layers)
        if isinstance(getattr(cfg, "layer_types", None), list):
            cfg.layer_types = (cfg.layer_types * layers)[:layers]
        torch.manual_seed(seed)
        model = type(model)(cfg)
    if use_cache is not None:
        if not hasattr(model.config, "use_cache"):
            raise ValueError(f"{name}'s config has no use_cache")
        model.config.use_cache = use_cache
    return model.eval(), inputs


#: Llama shapes for the meta device: Llama-2-7B (MHA) and Llama-3.1-405B (GQA 128 / 8)
LLAMA_SHAPES: dict[str, dict[str, int | float]] = {
    "7b": {"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
           "num_attention_heads": 32, "num_key_value_heads": 32, "max_position_embeddings": 4096},
    "405b": {"vocab_size": 128256, "hidden_size": 16384, "intermediate_size": 53248, "num_hidden_layers": 126,
             "num_attention_heads": 128, "num_key_value_heads": 8, "max_position_embeddings": 131072,
             "rope_theta": 500000.0},
}


def llama_meta(shape: str = "7b", num_layers: int | None = None) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """A LlamaModel of one of :data:`LLAMA_SHAPES` on the meta device (no memory for weights), with meta example
    inputs; ``num_layers`` overrides the shape's layer count."""
    from transformers import LlamaConfig, LlamaModel

    if shape not in LLAMA_SHAPES:
        raise KeyError(f"unknown Llama shape {shape!r}; choose from {', '.join(LLAMA_SHAPES)}")
    sizes = dict(LLAMA_SHAPES[shape])
    if num_layers is not None:
        sizes["num_hidden_layers"] = num_layers
    with torch.device("meta"):
        model = LlamaModel(LlamaConfig(**sizes))
    inputs = {"input_ids": torch.zeros(1, 128, dtype=torch.long, device="meta")}
    return model.eval(), inputs
