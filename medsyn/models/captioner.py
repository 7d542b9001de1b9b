"""A vision-language model that describes what an image shows (Med-Art's captions), from a local
directory, through transformers' own auto classes (`AutoProcessor`, `AutoModelForImageTextToText`):
LLaVA-style models, Qwen2-VL, PaliGemma, BLIP-2 or a medical VLM in one of those layouts.

It sees the curated image's pixels and an instruction built from the image type alone: never a file
name, a patient key or a header value. `medsyn.data.captions.vlm_captions` checks what it says and
combines it with the label template.
"""

import hashlib
import json
from pathlib import Path

import numpy as np

INSTRUCTION = (
    "Describe what is visible in this {image_type}: colours, shapes, textures and structures, in one or two "
    "sentences. Do not name a diagnosis."
)


class VLMCaptioner:
    """Batched greedy descriptions from a local vision-language model.

    Args:
        model_dir: a transformers directory holding the model (`config.json`, weights) and its processor.
        instruction: the request, with `{image_type}` filled per image.
        max_new_tokens: the longest description, in tokens.
        batch_size: images per `generate` call.
        device: torch device; default CUDA when available.

    Raises:
        FileNotFoundError: `model_dir` or its `config.json` is missing (checked before anything loads).
    """

    def __init__(
        self,
        model_dir: str | Path,
        instruction: str = INSTRUCTION,
        max_new_tokens: int = 60,
        batch_size: int = 8,
        device: str | None = None,
    ):
        model_dir = require_model_dir(model_dir, "vision-language model for captions", "captions='template'")
        from transformers import AutoModelForImageTextToText, AutoProcessor

        self.device, dtype = device_and_dtype(device)
        self.processor = AutoProcessor.from_pretrained(model_dir, local_files_only=True)
        self.model = AutoModelForImageTextToText.from_pretrained(model_dir, local_files_only=True, dtype=dtype)
        self.model.to(self.device).eval()
        tokenizer = getattr(self.processor, "tokenizer", None)
        if tokenizer is not None:
            tokenizer.padding_side = "left"  # a decoder-only model continues each prompt from its end
        self.instruction = instruction
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self.calls = 0  # generate calls so far: a cache that works leaves this at 0 on a rerun
        self.model_id = directory_id(model_dir, {"instruction": instruction, "max_new_tokens": max_new_tokens})

    def _prompt(self, image_type: str) -> str:
        text = self.instruction.format(image_type=image_type)
        if getattr(self.processor, "chat_template", None):
            messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
            return self.processor.apply_chat_template(messages, add_generation_prompt=True)
        return text

    def describe(self, images: list[np.ndarray], image_types: list[str]) -> list[str]:
        """One description per image (H×W×3 uint8), greedy, batched."""
        import torch
        from PIL import Image

        out = []
        for start in range(0, len(images), self.batch_size):
            batch = [Image.fromarray(image) for image in images[start : start + self.batch_size]]
            prompts = [self._prompt(kind) for kind in image_types[start : start + self.batch_size]]
            inputs = self.processor(images=batch, text=prompts, return_tensors="pt", padding=True).to(self.device)
            with torch.no_grad():
                generated = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
            self.calls += 1
            new = generated[:, inputs["input_ids"].shape[1] :]
            out += [text.strip() for text in self.processor.batch_decode(new, skip_special_tokens=True)]
        return out


def require_model_dir(model_dir: str | Path, what: str, instead: str) -> Path:
    """`model_dir` as a Path, or FileNotFoundError naming its missing `config.json` before anything
    loads (medsyn never downloads); `instead` says how to run without the model."""
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(
            f"{what} not found: {model_dir / 'config.json'} does not exist "
            f"(medsyn never downloads; put a transformers model directory there, or use {instead})"
        )
    return model_dir


def device_and_dtype(device: str | None):
    """The device (CUDA when available unless one is given) and its dtype (bfloat16 on CUDA)."""
    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return device, torch.bfloat16 if device.startswith("cuda") else torch.float32


def directory_id(model_dir: Path, settings: dict) -> str:
    """A name for the cache: the directory's name and a hash of its config, its weight files' names
    and sizes, and the generation settings (hashing the weights themselves would read gigabytes)."""
    digest = hashlib.sha256((model_dir / "config.json").read_bytes())
    for path in sorted(model_dir.glob("*.safetensors")) + sorted(model_dir.glob("*.bin")):
        digest.update(f"{path.name}:{path.stat().st_size}".encode())
    digest.update(json.dumps(settings, sort_keys=True).encode())
    return f"{model_dir.name}@{digest.hexdigest()[:16]}"
