"""Tiny models and data built and `save_pretrained` here, standing in for weights that cannot be downloaded."""

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

# a small open_clip model for the domain-CLIP code paths (32-d embeddings, 32-px images in 8-px patches)
TINY_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


def write_tiny_dataset(root: Path, size: int = 16, n: int = 24, reports: bool = True) -> Path:
    """A curated-format data set (`medsyn.data.dataset`) of two classes, a red disc and a cyan bar, with
    captions (and, with `reports`, anatomy-pathology reports): the last sixth of the images in the
    validation split."""
    from medsyn.data.dataset import image_path, write_records

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size]
    c, records = size // 2, []
    for i in range(n):
        disc = i % 2 == 0
        image = np.full((size, size, 3), 40, np.uint8)
        if disc:
            image[(yy - c) ** 2 + (xx - c) ** 2 < (size / 3.5) ** 2] = (230, 80, 80)
        else:
            image[:, c - size // 8 : c + size // 8] = (60, 200, 220)
        image = np.clip(image + rng.normal(0, 6, image.shape), 0, 255).astype(np.uint8)
        records.append(
            {
                "file_name": f"{i:02x}.png",
                "text": "A red disc." if disc else "A cyan bar.",
                "split": "validation" if i >= n - n // 6 else "train",
                "labels": ["disc" if disc else "bar"],
                "source": "tiny",
                "specialty": "tiny",
                "image_type": "phantom",
                "patient_id": f"tiny-{i}",
            }
        )
        if reports:
            report = (
                "Phantom. Anatomy: centre. Pathology: disc (centre). Findings: A round red shape."
                if disc
                else "Phantom. Anatomy: column. Pathology: bar (column). Findings: A vertical cyan band."
            )
            records[-1].update(report=report, class_report=report, report_source="vocabulary")
        image_path(root, records[-1]).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(image_path(root, records[-1]))
    write_records(root, records, kind="curated")
    return root


def clip_tokenizer_files(directory: Path) -> int:
    """A byte-level BPE vocabulary with no merges: every byte is a token (enough to tokenize anything)."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    directory.mkdir(parents=True)
    symbols = list(bytes_to_unicode().values())
    vocab = {s: i for i, s in enumerate(symbols + [s + "</w>" for s in symbols] + ["<|startoftext|>", "<|endoftext|>"])}
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n")
    return len(vocab)


def byte_bpe_tokenizer(directory: Path):
    """A byte-level BPE tokenizer as GPT-2's and GPT-NeoX's are, with no merges (every byte a token,
    `<|endoftext|>` beside them), saved in `directory` and returned."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {symbol: i for i, symbol in enumerate([*bytes_to_unicode().values(), "<|endoftext|>"])}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|endoftext|>", eos_token="<|endoftext|>")
    tokenizer.save_pretrained(directory)
    return tokenizer


def clip_tower(directory: Path, vocab_size: int, hidden: int, projection: bool = False) -> None:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
        projection_dim=hidden,
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
    )
    torch.manual_seed(0)
    (CLIPTextModelWithProjection if projection else CLIPTextModel)(config).save_pretrained(directory)


def t5_tokenizer(directory: Path):
    """A T5 tokenizer (a unigram model over single characters, with T5's `</s>` appended and `<pad>`),
    saved in `directory` and returned."""
    import string

    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    characters = string.ascii_letters + string.digits
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [("\u2581" + c, -1.0) for c in characters] + [(c, -1.0) for c in characters + string.punctuation]
    model = Tokenizer(models.Unigram(pieces, unk_id=2))
    model.normalizer = normalizers.NFKC()
    model.pre_tokenizer = pre_tokenizers.Metaspace()
    model.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tokenizer = T5TokenizerFast(
        tokenizer_object=model, eos_token="</s>", pad_token="<pad>", unk_token="<unk>", extra_ids=0
    )
    tokenizer.save_pretrained(directory)
    return tokenizer


def t5_tokenizer_and_tower(directory: Path, hidden: int = 32) -> None:
    """`t5_tokenizer` in `<directory>/tokenizer` and a random T5 encoder in `<directory>/text_encoder`:
    PixArt's / FLUX's layout."""
    from transformers import T5Config, T5EncoderModel

    tokenizer = t5_tokenizer(directory / "tokenizer")
    torch.manual_seed(0)
    T5EncoderModel(
        T5Config(
            vocab_size=len(tokenizer),
            d_model=hidden,
            d_kv=8,
            d_ff=2 * hidden,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
        )
    ).save_pretrained(directory / "text_encoder")


def tiny_vae(sample_size: int = 16):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(
        block_out_channels=[8, 16],
        down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2,
        norm_num_groups=4,
        latent_channels=4,
        sample_size=sample_size,
    )


def save_tiny_sd(directory: Path, xl: bool = False, prediction_type: str = "epsilon") -> Path:
    """A randomly initialised Stable Diffusion 1.x (or SDXL) pipeline directory with CLIP text towers."""
    from diffusers import (
        EulerDiscreteScheduler,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    parts = directory / "parts"
    vocab = clip_tokenizer_files(parts / "tokenizer")
    clip_tower(parts / "text_encoder", vocab, 32)
    unet_kw = {"cross_attention_dim": 32}
    if xl:
        clip_tokenizer_files(parts / "tokenizer_2")
        clip_tower(parts / "text_encoder_2", vocab, 32, projection=True)
        # SDXL conditions on the pooled text embedding plus 6 size / crop numbers, each embedded in 8
        unet_kw = {
            "cross_attention_dim": 64,
            "addition_embed_type": "text_time",
            "addition_time_embed_dim": 8,
            "projection_class_embeddings_input_dim": 32 + 6 * 8,
        }
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        block_out_channels=[16, 32],
        layers_per_block=1,
        norm_num_groups=8,
        attention_head_dim=4,
        down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
        up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"],
        **unet_kw,
    )
    scheduler = EulerDiscreteScheduler(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        steps_offset=1,
        prediction_type=prediction_type,
    )
    vae = tiny_vae()
    vae.register_to_config(scaling_factor=1.0)
    local = {"local_files_only": True}
    text = {
        "tokenizer": CLIPTokenizer.from_pretrained(parts / "tokenizer", model_max_length=77, **local),
        "text_encoder": CLIPTextModel.from_pretrained(parts / "text_encoder", **local),
    }
    if xl:
        text |= {
            "tokenizer_2": CLIPTokenizer.from_pretrained(parts / "tokenizer_2", model_max_length=77, **local),
            "text_encoder_2": CLIPTextModelWithProjection.from_pretrained(parts / "text_encoder_2", **local),
        }
        pipeline = StableDiffusionXLPipeline(vae=vae, unet=unet, scheduler=scheduler, **text)
    else:
        pipeline = StableDiffusionPipeline(
            vae=vae,
            unet=unet,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
            **text,
        )
    pipeline.save_pretrained(directory / "pipeline")
    return directory / "pipeline"


def save_tiny_flux(directory: Path) -> Path:
    """A randomly initialised FLUX.1 pipeline directory: CLIP + T5 text encoders, a 16-channel-packed
    transformer with a guidance embedding (as FLUX.1-dev), an AutoencoderKL with a shift factor."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

    parts = directory / "parts"
    vocab = clip_tokenizer_files(parts / "tokenizer")
    clip_tower(parts / "text_encoder", vocab, 32)
    t5_tokenizer_and_tower(parts / "t5")
    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        axes_dims_rope=[4, 4, 8],
        guidance_embeds=True,
    )
    # a pretrained model's output is calibrated, a random one's is large noise that low-rank adapters
    # cannot cancel: start from a zero output layer (adaLN-zero style)
    torch.nn.init.zeros_(transformer.proj_out.weight)
    torch.nn.init.zeros_(transformer.proj_out.bias)
    vae = AutoencoderKL(
        block_out_channels=[8, 16],
        down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2,
        norm_num_groups=4,
        latent_channels=4,
        sample_size=16,
        shift_factor=0.1,
        scaling_factor=1.5,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )
    with torch.no_grad():  # a trained VAE's posterior is narrow; a random one's std is about 1
        vae.encoder.conv_out.weight[4:] = 0
        vae.encoder.conv_out.bias[4:] = -10.0
    local = {"local_files_only": True}
    tokenizer_2 = T5TokenizerFast.from_pretrained(parts / "t5" / "tokenizer", **local)
    tokenizer_2.model_max_length = 512
    pipeline = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=vae,
        text_encoder=CLIPTextModel.from_pretrained(parts / "text_encoder", **local),
        tokenizer=CLIPTokenizer.from_pretrained(parts / "tokenizer", model_max_length=77, **local),
        text_encoder_2=T5EncoderModel.from_pretrained(parts / "t5" / "text_encoder", **local),
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )
    pipeline.save_pretrained(directory / "pipeline")
    return directory / "pipeline"


def save_tiny_kandinsky(directory: Path) -> Path:
    """A randomly initialised Kandinsky 2.2 combined pipeline directory: prior (CLIP text and image
    towers, PriorTransformer, UnCLIP scheduler) and decoder (image-embedding U-Net, MoVQ, DDPM)."""
    from diffusers import (
        DDPMScheduler,
        KandinskyV22CombinedPipeline,
        PriorTransformer,
        UnCLIPScheduler,
        UNet2DConditionModel,
        VQModel,
    )
    from transformers import (
        CLIPImageProcessor,
        CLIPTextModelWithProjection,
        CLIPTokenizer,
        CLIPVisionConfig,
        CLIPVisionModelWithProjection,
    )

    parts = directory / "parts"
    vocab = clip_tokenizer_files(parts / "tokenizer")
    clip_tower(parts / "text_encoder", vocab, 32, projection=True)
    torch.manual_seed(0)
    prior = PriorTransformer(num_attention_heads=2, attention_head_dim=12, embedding_dim=32, num_layers=1)
    prior.clip_std = torch.nn.Parameter(torch.ones(prior.clip_std.shape))  # a real prior holds CLIP's statistics
    image_encoder = CLIPVisionModelWithProjection(
        CLIPVisionConfig(
            hidden_size=32,
            image_size=32,
            projection_dim=32,
            intermediate_size=37,
            num_attention_heads=4,
            num_hidden_layers=2,
            patch_size=8,
        )
    )
    processor = CLIPImageProcessor(
        crop_size=32, size=32, do_center_crop=True, do_normalize=True, do_resize=True, resample=3
    )
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=8,
        addition_embed_type="image",
        down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
        up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
        mid_block_type="UNetMidBlock2DSimpleCrossAttn",
        block_out_channels=(16, 32),
        layers_per_block=1,
        encoder_hid_dim=32,
        encoder_hid_dim_type="image_proj",
        cross_attention_dim=32,
        attention_head_dim=4,
        resnet_time_scale_shift="scale_shift",
        norm_num_groups=8,
    )
    movq = VQModel(
        block_out_channels=[32, 64],
        down_block_types=["DownEncoderBlock2D", "AttnDownEncoderBlock2D"],
        up_block_types=["AttnUpDecoderBlock2D", "UpDecoderBlock2D"],
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=8,
        norm_type="spatial",
        num_vq_embeddings=12,
        vq_embed_dim=4,
    )
    local = {"local_files_only": True}
    pipeline = KandinskyV22CombinedPipeline(
        unet=unet,
        movq=movq,
        scheduler=DDPMScheduler(beta_schedule="linear", beta_start=0.00085, beta_end=0.012, clip_sample=False),
        prior_prior=prior,
        prior_image_encoder=image_encoder,
        prior_image_processor=processor,
        prior_text_encoder=CLIPTextModelWithProjection.from_pretrained(parts / "text_encoder", **local),
        prior_tokenizer=CLIPTokenizer.from_pretrained(parts / "tokenizer", model_max_length=77, **local),
        prior_scheduler=UnCLIPScheduler(
            variance_type="fixed_small_log", prediction_type="sample", clip_sample=True, clip_sample_range=10.0
        ),
    )
    pipeline.save_pretrained(directory / "pipeline")
    return directory / "pipeline"


def split_kandinsky(combined, prior_dir: Path, decoder_dir: Path) -> tuple[Path, Path]:
    """Save a Kandinsky 2.2 combined pipeline as the two directories it is published as
    (kandinsky-2-2-prior and kandinsky-2-2-decoder)."""
    from diffusers import KandinskyV22Pipeline, KandinskyV22PriorPipeline

    KandinskyV22PriorPipeline(
        prior=combined.prior_prior,
        image_encoder=combined.prior_image_encoder,
        text_encoder=combined.prior_text_encoder,
        tokenizer=combined.prior_tokenizer,
        scheduler=combined.prior_scheduler,
        image_processor=combined.prior_image_processor,
    ).save_pretrained(prior_dir)
    KandinskyV22Pipeline(unet=combined.unet, scheduler=combined.scheduler, movq=combined.movq).save_pretrained(
        decoder_dir
    )
    return Path(prior_dir), Path(decoder_dir)


def save_tiny_vlm(directory: Path, words: list[str]) -> Path:
    """A LLaVA (CLIP vision tower, Llama language model) of a real architecture, saved with its
    processor, whose greedy answer to any image and prompt is exactly `words`, then end of sequence.

    Its weights are set, not trained: every layer's output projections are zero (each layer passes its
    input on), each of the chain's tokens has an embedding of its own along one axis, and the LM head
    maps that axis to the next word; any other token (the prompt's, the image's) maps to the first word.
    So the captioner's code runs through transformers' real classes and yields a known description.
    """
    from tokenizers import Tokenizer, decoders, pre_tokenizers
    from tokenizers import models as tokenizer_models
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        PreTrainedTokenizerFast,
    )

    special = ["<pad>", "<s>", "</s>", "<unk>", "<image>"]
    prompt_words = "USER: ASSISTANT: describe what is visible in this image : colours , shapes".split()
    vocab = {token: i for i, token in enumerate(dict.fromkeys(special + prompt_words + words))}
    backend = Tokenizer(tokenizer_models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece(prefix="##")  # words joined by spaces, no space before "."
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
    )
    hidden = 64
    assert len(words) + 2 < hidden
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=16,
            patch_size=8,
        ),
        text_config=_tiny_llama_config(vocab, hidden, positions=256),
        image_token_index=vocab["<image>"],
        vision_feature_select_strategy="default",
        image_seq_length=4,
    )
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config).eval()
    _answer_with(model.model.language_model, model.lm_head, vocab, words)
    model.save_pretrained(directory)
    LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}),
        tokenizer=tokenizer,
        patch_size=8,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's class token, which "default" drops again
        chat_template=(
            "{% for m in messages %}{{ m['role'].upper() }}: {% for c in m['content'] %}{% if c['type'] == 'image' %}"
            "<image> {% else %}{{ c['text'] }} {% endif %}{% endfor %}{% endfor %}"
            "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
        ),
    ).save_pretrained(directory)
    return Path(directory)


def _tiny_llama_config(vocab: dict, hidden: int, positions: int):
    """A one-layer Llama configuration over a word-level vocabulary with <pad>, <s> and </s>."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=positions,
        pad_token_id=vocab["<pad>"],
        bos_token_id=vocab["<s>"],
        eos_token_id=vocab["</s>"],
        tie_word_embeddings=False,
    )


def _answer_with(language, lm_head, vocab: dict, words: list[str]) -> None:
    """Set a Llama's weights so that its greedy continuation of anything is `words`, then `</s>`:
    every layer's output projections are zero (each layer passes its input on), each of the chain's
    tokens has an embedding of its own along one axis, and the head maps that axis to the next word;
    any other token maps to the first word. The words must be distinct."""
    chain = [*words, "</s>"]
    assert len(set(chain)) == len(chain) and len(chain) + 1 < language.config.hidden_size
    with torch.no_grad():
        for layer in language.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        embedding, head = language.embed_tokens.weight, lm_head.weight
        embedding.zero_()
        head.zero_()
        embedding[:, 0] = 1.0  # axis 0: any token outside the chain
        head[vocab[chain[0]], 0] = 10.0  # ... is followed by the first word
        for axis, token in enumerate(chain[:-1], 1):
            embedding[vocab[token]] = 0.0
            embedding[vocab[token], axis] = 1.0
            head[vocab[chain[axis]], axis] = 10.0


def save_tiny_llm(directory: Path, words: list[str], prompt_words: list[str]) -> Path:
    """An instruction-following causal LM of a real architecture (Llama, with a chat template), saved
    with its tokenizer, whose greedy answer to any prompt is exactly `words`, then end of sequence.
    `prompt_words`: the words its tokenizer knows besides (others become `<unk>`)."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers
    from tokenizers import models as tokenizer_models
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

    special = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = {
        token: i for i, token in enumerate(dict.fromkeys(special + ["USER:", "ASSISTANT:"] + prompt_words + words))
    }
    backend = Tokenizer(tokenizer_models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece(prefix="##")  # words joined by spaces, no space before "."
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )
    tokenizer.chat_template = (
        "{% for m in messages %}{{ m['role'].upper() }}: {{ m['content'] }} {% endfor %}"
        "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(_tiny_llama_config(vocab, 64, positions=512)).eval()
    _answer_with(model.model, model.lm_head, vocab, words)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return Path(directory)
