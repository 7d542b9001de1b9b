"""The domain CLIP: trained with open_clip on a tiny data set it tells the classes apart, reloads
from its local directory, and its exported transformers text tower computes open_clip's token states."""

import numpy as np
import pytest
import torch
from tiny_models import TINY_CLIP, write_tiny_dataset

from medsyn.data.dataset import split_records
from medsyn.models.domain_clip import (
    embed_texts,
    export_text_encoder,
    load_domain_clip,
    token_states,
    zero_shot_accuracy,
)
from medsyn.training.domain_clip import train_domain_clip


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("clip")
    data = write_tiny_dataset(root / "data", size=32, n=48)
    return {
        "data": data,
        **train_domain_clip(data, root / "run", epochs=25, batch_size=16, lr=1e-3, config=TINY_CLIP, progress=False),
    }


def test_domain_clip_learns_the_classes(clip):
    history = clip["loss_history"]
    # two captions, 8 of each per batch of 16: identical captions cannot be told apart, so the
    # contrastive loss cannot go below log 8; it should get there
    assert np.mean(history[:3]) > np.log(8) + 0.3 and np.mean(history[-5:]) < np.log(8) + 0.1
    assert clip["zero_shot_accuracy"] == 1.0  # two easy classes, held-out images


def test_reloads_and_the_exported_text_tower_matches_open_clip(clip, tmp_path):
    from medsyn.models.text_encoders import load_text_encoder

    model, tokenizer = load_domain_clip(clip["model_dir"])
    held_out = split_records(clip["data"], "validation")
    prompts = {"tiny: bar": "A cyan bar.", "tiny: disc": "A red disc."}
    assert zero_shot_accuracy(model, tokenizer, clip["data"], held_out, prompts) == clip["zero_shot_accuracy"]
    a = embed_texts(model, tokenizer, ["A red disc.", "A cyan bar."])
    assert torch.allclose(a.norm(dim=-1), torch.ones(2))
    exported = export_text_encoder(clip["model_dir"], tmp_path / "exported")
    encoder = load_text_encoder("clip", exported, max_length=16)
    prompts = ["A red disc.", "A cyan bar.", ""]
    ours = encoder.encode(prompts).hidden_states
    reference = token_states(model, tokenizer(prompts))
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-4)


def test_missing_directory_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no_clip"):
        load_domain_clip(tmp_path / "no_clip")


def test_any_open_clip_local_directory_and_any_image_size(clip, tmp_path):
    """BiomedCLIP-style directories (weights as open_clip_pytorch_model.bin) load the same way, and
    images of another size are resized to the model's input."""
    import shutil

    from safetensors.torch import load_file

    from medsyn.models.domain_clip import embed_images

    other = tmp_path / "biomedclip_like"
    other.mkdir()
    shutil.copy(clip["model_dir"] / "open_clip_config.json", other)
    torch.save(load_file(clip["model_dir"] / "open_clip_model.safetensors"), other / "open_clip_pytorch_model.bin")
    a, _ = load_domain_clip(clip["model_dir"])
    b, _ = load_domain_clip(other)
    images = np.random.default_rng(0).integers(0, 256, (3, 3, 32, 32), dtype=np.uint8)
    torch.testing.assert_close(embed_images(a, images), embed_images(b, images))
    small = embed_images(a, images[:, :, ::2, ::2])  # 16 px into a 32-px model
    assert small.shape == (3, 32) and torch.allclose(small.norm(dim=1), torch.ones(3))
    (other / "open_clip_pytorch_model.bin").unlink()
    with pytest.raises(FileNotFoundError, match="has none of open_clip_model.safetensors"):
        load_domain_clip(other)
