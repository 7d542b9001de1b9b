"""Text encoders load from local directories only; tiny models saved here stand in for real weights."""

import pytest
import torch
from tiny_models import clip_tokenizer_files, clip_tower, t5_tokenizer_and_tower

from medsyn.models.text_encoders import load_text_encoder, minilm_path


def test_minilm_is_the_packaged_sentence_encoder():
    encoder = load_text_encoder("minilm")
    assert encoder.hidden_size == 384 and encoder.towers[0][1].num_parameters() > 2e7
    out = encoder.encode(["Dermoscopy image showing melanoma.", ""])
    assert out.hidden_states.shape == (2, 32, 384)
    unpadded = encoder.towers[0][0]("Dermoscopy image showing melanoma.").input_ids  # [CLS] word pieces [SEP]
    assert out.attention_mask.sum(1).tolist() == [len(unpadded), 2]
    with pytest.raises(ValueError, match="list of prompts"):
        encoder.encode("one string")


def test_bert_like_encoder_from_a_local_directory(tmp_path):
    from transformers import AutoTokenizer, BertConfig, BertModel

    AutoTokenizer.from_pretrained(minilm_path(), local_files_only=True).save_pretrained(tmp_path)
    BertModel(
        BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    ).save_pretrained(tmp_path)
    encoder = load_text_encoder("bert", tmp_path, max_length=16)
    assert encoder.encode(["a chest X-ray"]).hidden_states.shape == (1, 16, 32)


def test_clip_and_sdxl_layouts(tmp_path):
    vocab = clip_tokenizer_files(tmp_path / "sd" / "tokenizer")
    clip_tower(tmp_path / "sd" / "text_encoder", vocab, 32)
    clip = load_text_encoder("clip", tmp_path / "sd")
    assert clip.encode(["a polyp"]).hidden_states.shape == (1, 77, 32)

    for suffix in ("", "_2"):
        clip_tokenizer_files(tmp_path / "xl" / f"tokenizer{suffix}")
    clip_tower(tmp_path / "xl" / "text_encoder", vocab, 32)
    clip_tower(tmp_path / "xl" / "text_encoder_2", vocab, 48, projection=True)
    sdxl = load_text_encoder("sdxl", tmp_path / "xl")
    out = sdxl.encode(["a polyp", ""])
    assert sdxl.hidden_size == 80 and out.hidden_states.shape == (2, 77, 80)  # 32 + 48, concatenated
    assert out.pooled.shape == (2, 48)
    # the first 32 features are the first tower's penultimate layer, as SDXL uses it
    ids = sdxl.towers[0][0](["a polyp"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    penultimate = sdxl.towers[0][1](ids, output_hidden_states=True).hidden_states[-2]
    torch.testing.assert_close(out.hidden_states[:1, :, :32], penultimate)


def test_clip_tower_with_fewer_positions_than_77(tmp_path):
    """medsyn's domain CLIP has 32 positions: the default length follows the tower, not SD's 77."""
    from transformers import CLIPTextConfig, CLIPTextModel

    vocab = clip_tokenizer_files(tmp_path / "tokenizer")
    CLIPTextModel(
        CLIPTextConfig(
            vocab_size=vocab,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=32,
        )
    ).save_pretrained(tmp_path / "text_encoder")
    encoder = load_text_encoder("clip", tmp_path)
    assert encoder.max_length == 32 and encoder.encode(["a polyp"]).hidden_states.shape == (1, 32, 16)


def test_t5_attends_only_to_real_tokens(tmp_path):
    """PixArt's T5 with its attention mask: padding changes nothing in the real tokens' states."""
    t5_tokenizer_and_tower(tmp_path)
    encoder = load_text_encoder("t5", tmp_path)
    assert encoder.max_length == 120 and encoder.hidden_size == 32
    out = encoder.encode(["a polyp", ""])
    assert out.hidden_states.shape == (2, 120, 32)
    real = len("a polyp") + 1  # one piece per character (spaces join the next one) plus </s>, minus the space
    assert out.attention_mask.sum(1).tolist() == [real - 1, 1]  # the empty prompt is just </s>
    short = load_text_encoder("t5", tmp_path, max_length=16).encode(["a polyp"])
    torch.testing.assert_close(
        short.hidden_states[0, : real - 1], out.hidden_states[0, : real - 1], atol=1e-5, rtol=1e-5
    )
    with pytest.raises(FileNotFoundError, match="tokenizer"):
        load_text_encoder("t5", tmp_path / "nowhere")


def test_unknown_kind_and_missing_path():
    with pytest.raises(ValueError, match="unknown text encoder kind"):
        load_text_encoder("gpt")
    with pytest.raises(ValueError, match="needs a local directory"):
        load_text_encoder("t5")
