"""A small domain CLIP (Radford et al. 2021), trained in-project with open_clip on the curated
image-caption pairs by `medsyn.training.domain_clip`: MSDM's "clinical text encoder" where no
pretrained one is at hand, and the image / text embedding of the evaluation (alignment scores,
nearest neighbours).

Saved in open_clip's own local layout (`open_clip_config.json` + `open_clip_model.safetensors`), which
`open_clip.create_model_and_transforms("local-dir:<dir>")` loads. `export_text_encoder` writes its
text tower as a transformers `CLIPTextModel` + `CLIPTokenizer`, so any diffusers pipeline (and
`load_text_encoder("clip", ...)`) can use it as its text encoder.
"""

import json
from pathlib import Path

import numpy as np
import torch

from medsyn.data.dataset import class_key, load_images
from medsyn.models.text_encoders import require_dir

# ~1.6 M + 1.5 M parameters: a ViT over 8 x 8 patches and a 4-layer text transformer of width 128
DOMAIN_CLIP_CONFIG = {
    "embed_dim": 128,
    "vision_cfg": {"layers": 4, "width": 128, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 128, "heads": 4, "layers": 4},
}


def normalise(images: np.ndarray) -> torch.Tensor:
    """uint8 N x 3 x H x W -> CLIP's normalised float input."""
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    x = torch.from_numpy(np.asarray(images, dtype=np.float32)) / 255
    return (x - torch.tensor(OPENAI_DATASET_MEAN).view(1, 3, 1, 1)) / torch.tensor(OPENAI_DATASET_STD).view(1, 3, 1, 1)


def save_domain_clip(model, cfg: dict, model_dir: Path) -> None:
    """Write a CLIP and its `model_cfg` in open_clip's `local-dir:` layout (`load_domain_clip` reads it)."""
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
    from safetensors.torch import save_file

    model_dir.mkdir(parents=True, exist_ok=True)
    preprocess = {
        "size": cfg["vision_cfg"]["image_size"],
        "mean": list(OPENAI_DATASET_MEAN),
        "std": list(OPENAI_DATASET_STD),
        "interpolation": "bicubic",
        "resize_mode": "shortest",
    }
    (model_dir / "open_clip_config.json").write_text(
        json.dumps({"model_cfg": cfg, "preprocess_cfg": preprocess}, indent=2)
    )
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, model_dir / "open_clip_model.safetensors")


# the weight files open_clip's `local-dir:` loader reads (medsyn writes the first; BiomedCLIP ships the third)
OPEN_CLIP_WEIGHTS = (
    "open_clip_model.safetensors",
    "open_clip_pytorch_model.safetensors",
    "open_clip_pytorch_model.bin",
)


def load_domain_clip(model_dir: str | Path):
    """(model, tokenizer) of an open_clip model in a local directory (`open_clip_config.json` plus
    weights): medsyn's domain CLIP, or e.g. BiomedCLIP (whose text tower is a transformers model that
    must itself be in the local Hugging Face cache). Nothing reaches the network."""
    import open_clip

    model_dir = require_dir(model_dir, ("open_clip_config.json",))
    if not any((model_dir / name).is_file() for name in OPEN_CLIP_WEIGHTS):
        raise FileNotFoundError(f"pretrained directory {model_dir} has none of {', '.join(OPEN_CLIP_WEIGHTS)}")
    model = open_clip.create_model(f"local-dir:{model_dir}").eval()
    return model, open_clip.get_tokenizer(f"local-dir:{model_dir}")


@torch.no_grad()
def embed_images(model, images: np.ndarray, batch_size: int = 256) -> torch.Tensor:
    """L2-normalised image embeddings of uint8 N x 3 x H x W images, resized (bicubic, antialiased)
    to the model's input size where they differ from it."""
    size = model.visual.image_size
    size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)

    def prepare(batch):
        x = normalise(batch)
        if tuple(x.shape[-2:]) != size:
            x = torch.nn.functional.interpolate(x, size=size, mode="bicubic", antialias=True, align_corners=False)
        return x

    return torch.cat(
        [
            model.encode_image(prepare(images[i : i + batch_size]), normalize=True)
            for i in range(0, len(images), batch_size)
        ]
    )


@torch.no_grad()
def embed_texts(model, tokenizer, texts: list[str]) -> torch.Tensor:
    """L2-normalised text embeddings."""
    return model.encode_text(tokenizer(list(texts)), normalize=True)


def zero_shot_accuracy(
    model, tokenizer, dataset_dir: str | Path, records: list[dict], prompts: dict[str, str]
) -> float:
    """Share of images whose most similar class prompt is their own class's (CLIP's zero-shot test).

    Args:
        model, tokenizer: a domain CLIP (`load_domain_clip`, or the one just trained).
        dataset_dir, records: the images to classify.
        prompts: class name -> prompt (`medsyn.data.dataset.class_prompts`).
    """
    images = load_images(dataset_dir, records).transpose(0, 3, 1, 2)
    similarity = embed_images(model, images) @ embed_texts(model, tokenizer, list(prompts.values())).T
    names = list(prompts)
    truth = np.array([names.index(class_key(r)) for r in records])
    return float((similarity.argmax(1).numpy() == truth).mean())


def export_text_encoder(model_dir: str | Path, out_dir: str | Path) -> Path:
    """Write the text tower as transformers `CLIPTextModel` (`<out>/text_encoder`) and `CLIPTokenizer`
    (`<out>/tokenizer`), the layout of an SD 1.x pipeline, so that diffusers pipelines and
    `load_text_encoder("clip", out_dir)` use it. The token states equal open_clip's (tested).

    open_clip's tower is OpenAI CLIP's: pre-LayerNorm blocks with a causal mask, fused q/k/v
    projections (split here), GELU, a final LayerNorm; it pads with token 0, so the tokenizer does too."""
    from open_clip.tokenizer import SimpleTokenizer
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    model, _ = load_domain_clip(model_dir)
    cfg = json.loads((Path(model_dir) / "open_clip_config.json").read_text())["model_cfg"]["text_cfg"]
    out_dir = Path(out_dir)
    simple = SimpleTokenizer()
    tokenizer_dir = out_dir / "tokenizer"
    tokenizer_dir.mkdir(parents=True, exist_ok=True)
    (tokenizer_dir / "vocab.json").write_text(json.dumps(simple.encoder))
    merges = sorted(simple.bpe_ranks, key=simple.bpe_ranks.get)
    (tokenizer_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(pair) for pair in merges) + "\n")
    special = {v: k for k, v in simple.encoder.items()}
    tokenizer = CLIPTokenizer.from_pretrained(
        tokenizer_dir,
        pad_token="!",
        bos_token=special[simple.sot_token_id],
        eos_token=special[simple.eot_token_id],
        unk_token=special[simple.eot_token_id],
        model_max_length=cfg["context_length"],
    )
    tokenizer.save_pretrained(tokenizer_dir)

    width, layers = cfg["width"], cfg["layers"]
    config = CLIPTextConfig(
        vocab_size=cfg["vocab_size"],
        hidden_size=width,
        intermediate_size=4 * width,
        num_hidden_layers=layers,
        num_attention_heads=cfg["heads"],
        max_position_embeddings=cfg["context_length"],
        hidden_act="gelu",
        layer_norm_eps=1e-5,
        projection_dim=DOMAIN_CLIP_CONFIG["embed_dim"],
        bos_token_id=simple.sot_token_id,
        eos_token_id=simple.eot_token_id,
        pad_token_id=0,
    )
    state = {
        "embeddings.token_embedding.weight": model.token_embedding.weight,
        "embeddings.position_embedding.weight": model.positional_embedding,
        "final_layer_norm.weight": model.ln_final.weight,
        "final_layer_norm.bias": model.ln_final.bias,
    }
    for i, block in enumerate(model.transformer.resblocks):
        prefix = f"encoder.layers.{i}."
        q, k, v = block.attn.in_proj_weight.chunk(3)
        qb, kb, vb = block.attn.in_proj_bias.chunk(3)
        state |= {
            prefix + "self_attn.q_proj.weight": q,
            prefix + "self_attn.q_proj.bias": qb,
            prefix + "self_attn.k_proj.weight": k,
            prefix + "self_attn.k_proj.bias": kb,
            prefix + "self_attn.v_proj.weight": v,
            prefix + "self_attn.v_proj.bias": vb,
            prefix + "self_attn.out_proj.weight": block.attn.out_proj.weight,
            prefix + "self_attn.out_proj.bias": block.attn.out_proj.bias,
            prefix + "layer_norm1.weight": block.ln_1.weight,
            prefix + "layer_norm1.bias": block.ln_1.bias,
            prefix + "layer_norm2.weight": block.ln_2.weight,
            prefix + "layer_norm2.bias": block.ln_2.bias,
            prefix + "mlp.fc1.weight": block.mlp.c_fc.weight,
            prefix + "mlp.fc1.bias": block.mlp.c_fc.bias,
            prefix + "mlp.fc2.weight": block.mlp.c_proj.weight,
            prefix + "mlp.fc2.bias": block.mlp.c_proj.bias,
        }
    text_model = CLIPTextModel(config)
    missing, unexpected = text_model.load_state_dict({k: v.detach().clone() for k, v in state.items()}, strict=False)
    if unexpected or [m for m in missing if "position_ids" not in m]:
        raise RuntimeError(f"text tower export: missing {missing}, unexpected {unexpected}")
    text_model.save_pretrained(out_dir / "text_encoder")
    return out_dir


@torch.no_grad()
def token_states(model, tokens: torch.Tensor) -> torch.Tensor:
    """open_clip's per-token text states after the final LayerNorm (what cross-attention reads)."""
    x = model.token_embedding(tokens) + model.positional_embedding
    return model.ln_final(model.transformer(x, attn_mask=model.attn_mask))
