"""vq-ar: images as VQGAN tokens written by a causal language model (arXiv 2403.06835, on LLM-CXR).

A `VQARPipeline` holds three parts, each saved in its library's own format: a diffusers `VQModel`
(the tokenizer: an image <-> an H x W grid of code ids), a transformers causal LM (`GPT2LMHeadModel`,
`LlamaForCausalLM`, ... loaded with `AutoModelForCausalLM`) and its text tokenizer. The LM's
vocabulary is the text vocabulary followed by the image codes, each code a row of its own (LLM-CXR's
`resize_token_embeddings(len(tokenizer) + K)`).

A sequence is `[prompt: P tokens, left-padded][<clue> + M visual clues][<boi>][H x W image codes][<eoi>]`.
The prompt and clue slots have fixed lengths, so every image code sits at the same position whatever
the prompt; the unconditional sequence (classifier-free guidance) fills both slots with padding.

Sampling is exact by construction: at every one of the H x W steps only image ids can be drawn (the
logits are cut to the code rows), so the sampler returns exactly H x W codes, never text or an
end-of-sequence id, with no retry loop. Guidance mixes the conditional and unconditional logits at
every step; the two run as separate rows, each with its own key-value cache. Each image draws from
its own generator, so a seed gives the same codes and the same pixels.
"""

import json
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

CONFIG_FILE = "vq_ar_config.json"
PAD, UNK, CLUE, BOI, EOI = "<pad>", "<unk>", "<clue>", "<boi>", "<eoi>"
SPECIALS = [PAD, UNK, CLUE, BOI, EOI]
WORD = re.compile(r"[a-z0-9]+|[^\sa-z0-9]")


def build_text_tokenizer(texts: list[str]):
    """A word-level tokenizer over the lower-cased words and punctuation of `texts` (the training
    captions), with the sequence's special tokens; an unseen word becomes `<unk>`."""
    from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    words = sorted({w for text in texts for w in WORD.findall(text.lower())})
    vocab = {token: i for i, token in enumerate(SPECIALS + [w for w in words if w not in SPECIALS])}
    backend = Tokenizer(WordLevel(vocab, unk_token=UNK))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Split(Regex(WORD.pattern), behavior="isolated")]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token=PAD, unk_token=UNK, additional_special_tokens=[CLUE, BOI, EOI]
    )


def lm_tokenizer(pretrained_lm_dir: str | Path):
    """A pretrained causal LM's own tokenizer with the sequence's special tokens added, as LLM-CXR
    keeps Dolly's and adds its image tokens: each of the LM's token ids still names the word its
    embedding learned."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(pretrained_lm_dir, local_files_only=True)
    tokenizer.add_special_tokens({"pad_token": PAD, "additional_special_tokens": [CLUE, BOI, EOI]})
    return tokenizer


def named_terms(text: str, terms: list[str]) -> list[str]:
    """The terms that the text names, as whole words, in `terms` order. A term named only inside a
    longer named term is not named: "polyp" in "dyed lifted polyp", "pulmonary embolism" in "no
    pulmonary embolism"."""
    words = WORD.findall(text.lower())
    spans = {}
    for term in terms:
        parts = WORD.findall(term.lower())
        spans[term] = [
            (i, i + len(parts)) for i in range(len(words) - len(parts) + 1) if words[i : i + len(parts)] == parts
        ]

    def inside_a_longer_one(term: str, start: int, end: int) -> bool:
        return any(a <= start and end <= b and b - a > end - start for o in terms if o != term for a, b in spans[o])

    return [term for term in terms if any(not inside_a_longer_one(term, *span) for span in spans[term])]


def clue_terms(text: str, bank: dict[str, list[int]]) -> list[str]:
    """The clue bank's terms that the text names (`named_terms`), in the bank's order."""
    return named_terms(text, list(bank))


def retrieve_clues(text: str, bank: dict[str, list[int]], count: int) -> list[int]:
    """Up to `count` visual clues (code ids) for a prompt, from the prompt's text alone: the codes of
    each term it names, taken in turn (the first code of each term, then the second, ...)."""
    lists = [bank[term] for term in clue_terms(text, bank)]
    clues = []
    for rank in range(max((len(codes) for codes in lists), default=0)):
        for codes in lists:
            if rank < len(codes) and codes[rank] not in clues and len(clues) < count:
                clues.append(codes[rank])
    return clues


def _filter_logits(logits: torch.Tensor, top_k: int | None, top_p: float | None) -> torch.Tensor:
    """Keep the `top_k` largest logits and the smallest set whose probability reaches `top_p`."""
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        ordered, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = torch.softmax(ordered, dim=-1).cumsum(dim=-1)
        drop = cumulative - torch.softmax(ordered, dim=-1) >= top_p  # keep the token that crosses top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), float("-inf"))
    return logits


class VQARPipeline:
    """A VQGAN tokenizer, a causal LM over text and image codes, and the sequence layout.

    Args:
        vqvae: a diffusers `VQModel`.
        lm: a transformers causal LM whose vocabulary is `len(tokenizer) + codes`.
        tokenizer: the text tokenizer (`build_text_tokenizer`, or a pretrained LM's, `lm_tokenizer`).
        config: `grid` [H, W], `codes`, `prompt_tokens` P, `clue_tokens` M, `clue_bank` {term: [code]},
            `prompt_field` ('text' or 'report': what `medsyn.sampling` prompts it with).
    """

    def __init__(self, vqvae, lm, tokenizer, config: dict):
        self.vqvae, self.lm, self.tokenizer = vqvae.eval(), lm.eval(), tokenizer
        self.config = dict(config)
        self.grid = tuple(self.config["grid"])
        self.codes = int(self.config["codes"])
        self.offset = len(tokenizer)
        self.pad, self.clue, self.boi, self.eoi = tokenizer.convert_tokens_to_ids([PAD, CLUE, BOI, EOI])
        if lm.config.vocab_size != self.offset + self.codes:
            raise ValueError(f"the LM has {lm.config.vocab_size} rows, not {self.offset} text + {self.codes} codes")

    @property
    def device(self) -> torch.device:
        return next(self.lm.parameters()).device

    @property
    def prompt_field(self) -> str:
        """The record field its prompts were trained on: 'text' (captions) or 'report' (reports)."""
        return self.config.get("prompt_field", "text")

    @property
    def sample_size(self) -> int:
        """The side of the images, in pixels."""
        return self.grid[0] * 2 ** (len(self.vqvae.config.block_out_channels) - 1)

    def to(self, device):
        self.vqvae.to(device)
        self.lm.to(device)
        return self

    def set_progress_bar_config(self, **_):
        """Sampling shows no bar of its own (for `medsyn.sampling`, which calls every pipeline alike)."""

    # ---------------------------------------------------------------- sequences

    def context(self, prompts: list[str | None], clues: bool = True) -> torch.Tensor:
        """The ids before the first image code: P prompt tokens (left-padded; None gives the
        unconditional context), `<clue>` and M clue codes (padded), `<boi>`."""
        rows = []
        for prompt in prompts:
            if prompt is None:
                rows.append([self.pad] * (self.config["prompt_tokens"] + 1 + self.config["clue_tokens"]) + [self.boi])
                continue
            text = self.tokenizer(prompt, add_special_tokens=False)["input_ids"][-self.config["prompt_tokens"] :]
            found = retrieve_clues(prompt, self.config["clue_bank"], self.config["clue_tokens"]) if clues else []
            clue_ids = [self.offset + c for c in found]
            rows.append(
                [self.pad] * (self.config["prompt_tokens"] - len(text))
                + text
                + [self.clue]
                + clue_ids
                + [self.pad] * (self.config["clue_tokens"] - len(clue_ids))
                + [self.boi]
            )
        return torch.tensor(rows, dtype=torch.long)

    def sequences(self, prompts: list[str | None], codes: torch.Tensor, clues: bool = True) -> torch.Tensor:
        """Whole training sequences: the context, the H x W codes (as ids), `<eoi>`."""
        ids = codes.reshape(len(prompts), -1) + self.offset
        end = torch.full((len(prompts), 1), self.eoi, dtype=torch.long)
        return torch.cat([self.context(prompts, clues), ids, end], dim=1)

    # ---------------------------------------------------------------- the tokenizer's two directions

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] (N x 3 x H x W) -> code ids (N x H' x W'), the nearest code of each latent."""
        latents = self.vqvae.encode(images.to(self.device)).latents
        return nearest_codes(latents, self.vqvae.quantize.embedding.weight)

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Code ids (N x H' x W') -> images in [0, 1] (N x H x W x 3)."""
        n, h, w = codes.shape
        dim = self.vqvae.quantize.embedding.weight.shape[1]
        quantized = self.vqvae.quantize.get_codebook_entry(codes.reshape(-1).to(self.device), (n, h, w, dim))
        images = self.vqvae.decode(quantized, force_not_quantize=True).sample
        return ((images + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1).float().cpu()

    # ---------------------------------------------------------------- sampling

    @torch.no_grad()
    def sample_codes(
        self,
        prompts: list[str],
        generators: list[torch.Generator],
        guidance_scale: float = 1.0,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        clues: bool = True,
    ) -> torch.Tensor:
        """Exactly H x W codes per prompt (N x H x W), drawn from the code rows only."""
        if len(generators) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts need as many generators, got {len(generators)}")
        n, steps = len(prompts), self.grid[0] * self.grid[1]
        guided = guidance_scale != 1.0
        context = self.context(prompts, clues)
        if guided:  # the unconditional rows: their own positions in the batch, their own cache rows
            context = torch.cat([context, self.context([None] * n)])
        out = self.lm(input_ids=context.to(self.device), use_cache=True)
        cache, logits = out.cache, out.logits[:, -1]
        codes = torch.empty((n, steps), dtype=torch.long)
        for step in range(steps):
            scores = logits[:, self.offset : self.offset + self.codes].float()  # image ids only
            if guided:
                scores = scores[n:] + guidance_scale * (scores[:n] - scores[n:])
            scores = _filter_logits(scores / max(temperature, 1e-6), top_k, top_p)
            probabilities = torch.softmax(scores, dim=-1).cpu()
            for row in range(n):
                codes[row, step] = torch.multinomial(probabilities[row], 1, generator=generators[row])[0]
            feed = (codes[:, step] + self.offset).repeat(2 if guided else 1)[:, None]
            out = self.lm(input_ids=feed.to(self.device), cache=cache, use_cache=True)
            cache, logits = out.cache, out.logits[:, -1]
        return codes.reshape(n, *self.grid)

    def __call__(
        self,
        prompt: str | list[str],
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float = 1.0,
        output_type: str = "pil",
        generator=None,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        clues: bool = True,
        **_,
    ):
        """Text -> images, called like a diffusers pipeline (`medsyn.sampling.generate` calls every
        family alike). `num_inference_steps` does not apply: decoding runs exactly H x W steps.
        Returns an object with `.images`: float N x H x W x 3 in [0, 1] (`output_type='np'`) or PIL."""
        from PIL import Image

        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        size = self.sample_size
        if (height or size) != size or (width or size) != size:
            raise ValueError(f"this pipeline makes {size} x {size} images, asked for {height} x {width}")
        if generator is None:
            generator = [torch.Generator().manual_seed(i) for i in range(len(prompts))]
        generators = generator if isinstance(generator, list) else [generator] * len(prompts)
        codes = self.sample_codes(prompts, generators, guidance_scale, temperature, top_k, top_p, clues)
        images = self.decode(codes).numpy()
        if output_type == "np":
            return SimpleNamespace(images=images, codes=codes)
        return SimpleNamespace(images=[Image.fromarray(np.rint(i * 255).astype(np.uint8)) for i in images], codes=codes)

    # ---------------------------------------------------------------- saving

    def save_pretrained(self, directory: str | Path) -> Path:
        directory = Path(directory)
        self.vqvae.save_pretrained(directory / "vqvae")
        self.lm.save_pretrained(directory / "lm")
        self.tokenizer.save_pretrained(directory / "tokenizer")
        (directory / CONFIG_FILE).write_text(json.dumps(self.config, indent=1))
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> "VQARPipeline":
        """Load a saved pipeline from a local directory (never the network)."""
        from diffusers import VQModel
        from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

        directory = Path(directory)
        if not (directory / CONFIG_FILE).is_file():
            raise FileNotFoundError(f"not a vq-ar pipeline: {directory / CONFIG_FILE} does not exist")
        return cls(
            VQModel.from_pretrained(directory / "vqvae", local_files_only=True),
            AutoModelForCausalLM.from_pretrained(directory / "lm", local_files_only=True),
            PreTrainedTokenizerFast.from_pretrained(directory / "tokenizer", local_files_only=True),
            json.loads((directory / CONFIG_FILE).read_text()),
        )


def nearest_codes(latents: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Latents (N x D x H x W) -> the id of each position's nearest codebook row (N x H x W)."""
    n, d, h, w = latents.shape
    flat = latents.permute(0, 2, 3, 1).reshape(-1, d).float()
    distances = (flat**2).sum(1, keepdim=True) - 2 * flat @ codebook.float().T + (codebook.float() ** 2).sum(1)
    return distances.argmin(dim=1).reshape(n, h, w)
