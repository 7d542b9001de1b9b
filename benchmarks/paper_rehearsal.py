"""The `paper` profile rehearsed: every notebook of its chain, with its families and code paths (captions
from a vision-language model, reports rewritten by an LLM, the SDXL fine-tune, FLUX and Kandinsky LoRA,
PixArt-α with HLDF and on templates, vq-ar from a pretrained causal LM, the BiomedCLIP-layout privacy
embedder, an ImageNet ResNet-50, FID required), on random-weight models saved where the profile looks
for them, the embedded corpus and step counts of minutes: a multi-day job should not fail at hour 30
on something this run shows.

    python -m benchmarks.paper_rehearsal --scale cpu --work /tmp/rehearsal --readme   # 2 cores, 3 minutes
    python -m benchmarks.paper_rehearsal --scale gpu --work /tmp/rehearsal --readme   # one GPU

The rehearsal profile is `paper.yaml` itself with only what a short run must change replaced
(`REHEARSAL`, the same at either scale): the corpus (embedded: the real sources need registration), the image side, step
counts, batch sizes and numbers of images. Everything else, precisions included, is the paper's.
The models are the tests' stand-ins (`tests/tiny_models.py`: tiny widths, the real classes and
directory layouts) at either scale; on a GPU the run also takes the device's paths (placement, bf16
autocast, bfloat16 sampling). The published sizes are measured by the other benchmarks
(`train_step`, `sampling`). Prints one row per notebook (status, seconds) and, with `--out` or
`--readme`, writes them with their provenance (`benchmarks/results/paper_rehearsal_<scale>.csv`).
A failed notebook ends the run with status 1, its row saying where.
"""

import copy
import json
import shutil
import signal
import sys
import time
from pathlib import Path

import pandas as pd
import torch
import yaml

from benchmarks.common import README, RESULTS_DIR, arguments, device_for, device_name, stand_ins
from medsyn.paths import PROFILES_DIR

# what a rehearsal changes in paper.yaml (on a CPU and on a GPU alike); the rest is the paper's
REHEARSAL = {
    "common": {"size": 64},
    "01_curate": {
        "corpus": "embedded",
        "manifests": ["rsna_pe", "chexpert", "brats", "kermany_oct", "ham10000", "kvasir_v2", "camelyon16"],
        "corpus_patients": 10,
        "corpus_size": 64,
        "vlm_batch_size": 4,
        "probe_epochs": 1,
        "domain_clip_epochs": 1,
    },
    "02_train_ldm": {
        # the compact families' sentence encoder through the same loader (`bert`: a local directory)
        # from a stand-in, so that a GPU machine needs no 83 MB wheel of the real one
        "text_encoder": "bert",
        "text_encoder_path": "{run}/pretrained/all-MiniLM-L6-v2",
        "vae_steps": 4,
        "vae_batch_size": 4,
        "vae_config": {"block_out_channels": [16, 32, 32], "layers_per_block": 1, "norm_num_groups": 8},
        "unet_steps": 4,
        "unet_batch_size": 4,
        "sampling_steps": 2,
        "pretrain_images": 8,
        "pretrain_steps": 2,
        "finetune_steps": 3,
        "finetune_batch_size": 2,
        "large_lora_steps": 2,
        "large_lora_batch_size": 2,
    },
    "03_train_dit_hldf": {
        "text_encoder": "bert",
        "text_encoder_path": "{run}/pretrained/all-MiniLM-L6-v2",
        "steps": 3,
        "batch_size": 4,
        "hldf_batch": 2,
        "sampling_steps": 2,
    },
    "04_train_vq_ar": {
        "codes": 32,
        "vq_config": {"block_out_channels": [16, 32, 32, 32], "layers_per_block": 1, "norm_num_groups": 8},
        "vq_steps": 3,
        "vq_batch_size": 4,
        "prompt_tokens": 12,
        "clue_tokens": 4,
        "lm_steps": 3,
        "lm_batch_size": 4,
        "ablation_per_class": 1,
    },
    "05_sample": {"samples_per_prompt": 2, "sampling_steps": 2, "batch_size": 8},
    "06_fidelity": {"niqe_block": 16, "bootstrap_resamples": 20},
    "08_downstream": {"n_real": 4, "epochs": 1, "replicates": 2, "bootstrap_resamples": 20, "batch_size": 8},
    "09_report": {"study_per_class": 1},
}


def rehearsal_profile(scale: str, pretrained: Path, run_dir: Path) -> Path:
    """paper.yaml with `REHEARSAL` laid over it, every `{run}/pretrained/...` path pointing into
    `pretrained`, and FID's InceptionV3 weights from there; written into the run directory."""
    profile = yaml.safe_load((PROFILES_DIR / "paper.yaml").read_text())
    profile["name"] = f"paper-rehearsal-{scale}"
    profile["description"] = f"the paper profile rehearsed at {scale} scale (benchmarks/paper_rehearsal.py)"
    for block, values in REHEARSAL.items():
        profile.setdefault(block, {}).update(copy.deepcopy(values))
    profile["06_fidelity"]["inception_weights"] = str(pretrained / "pt_inception-2015-12-05-6726825d.pth")
    text = yaml.safe_dump(profile, sort_keys=False).replace("{run}/pretrained", str(pretrained))
    path = run_dir / "rehearsal.yaml"
    run_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def write_stand_ins(pretrained: Path) -> dict[str, float]:
    """Every pretrained model and weight file the paper profile names, with random weights, in the
    layout the profile expects; returns seconds per model."""
    tiny_models = stand_ins()
    seconds = {}
    builders = {
        "stable-diffusion-xl-base-1.0": lambda d: _pipeline_at(d, tiny_models.save_tiny_sd, xl=True),
        "FLUX.1-dev": lambda d: _pipeline_at(d, tiny_models.save_tiny_flux),
        "kandinsky-2-2-prior": None,  # written with the decoder
        "kandinsky-2-2-decoder": lambda d: _kandinsky(d, tiny_models),
        "PixArt-XL-2-512x512": lambda d: _pixart(d, tiny_models),
        "dolly-v2-3b": lambda d: _gpt_neox(d, tiny_models),
        "Qwen2-VL-7B-Instruct": lambda d: tiny_models.save_tiny_vlm(d, STAND_IN_DESCRIPTION),
        "Llama-3.1-8B-Instruct": lambda d: tiny_models.save_tiny_llm(d, STAND_IN_REPORT, []),
        "BiomedCLIP-PubMedBERT_256-vit_base_patch16_224": lambda d: _open_clip(d, tiny_models.TINY_CLIP),
        "resnet50-imagenet1k-v2.pth": _resnet50,
        "pt_inception-2015-12-05-6726825d.pth": _inception,
        "all-MiniLM-L6-v2": _bert,
    }
    pretrained.mkdir(parents=True, exist_ok=True)
    for name, build in builders.items():
        if build is None or (pretrained / name).exists():
            continue
        began = time.perf_counter()
        build(pretrained / name)
        seconds[name] = round(time.perf_counter() - began, 1)
        print(f"stand-in {name}: {seconds[name]} s", flush=True)
    return seconds


# what the stand-in VLM says of every image, and the stand-in LLM's rewrite of every report
STAND_IN_DESCRIPTION = ["grey", "tones", "with", "a", "brighter", "region", "."]
STAND_IN_REPORT = ["Findings", "as", "described", "."]


def _pipeline_at(directory: Path, save, **kw) -> None:
    scratch = directory.with_name(directory.name + ".parts")
    shutil.move(save(scratch, **kw), directory)
    shutil.rmtree(scratch)


def _kandinsky(decoder_dir: Path, tiny_models) -> None:
    """The published pair of directories (prior, decoder) from one combined pipeline."""
    from medsyn.sampling import load_pipeline

    scratch = decoder_dir.with_name("kandinsky.parts")
    combined = load_pipeline(tiny_models.save_tiny_kandinsky(scratch))
    tiny_models.split_kandinsky(combined, decoder_dir.with_name("kandinsky-2-2-prior"), decoder_dir)
    shutil.rmtree(scratch)


def _pixart(directory: Path, tiny_models) -> None:
    """PixArt-α's layout: T5 tokenizer and encoder, a learned-sigma transformer (8 output channels),
    the SD VAE, DPM-Solver."""
    from diffusers import DPMSolverMultistepScheduler, PixArtAlphaPipeline, PixArtTransformer2DModel
    from transformers import T5EncoderModel, T5TokenizerFast

    scratch = directory.with_name(directory.name + ".parts")
    tiny_models.t5_tokenizer_and_tower(scratch, hidden=32)
    torch.manual_seed(0)
    transformer = PixArtTransformer2DModel(
        sample_size=32,  # latent pixels: the rehearsal's 64 px images through the VAE's one down-sampling
        in_channels=4,
        out_channels=8,
        num_layers=2,
        num_attention_heads=2,
        attention_head_dim=16,
        cross_attention_dim=32,
        caption_channels=32,
    )
    vae = tiny_models.tiny_vae(sample_size=64)
    vae.register_to_config(scaling_factor=1.0)
    PixArtAlphaPipeline(
        tokenizer=T5TokenizerFast.from_pretrained(scratch / "tokenizer", local_files_only=True),
        text_encoder=T5EncoderModel.from_pretrained(scratch / "text_encoder", local_files_only=True),
        vae=vae,
        transformer=transformer,
        scheduler=DPMSolverMultistepScheduler(beta_schedule="linear", beta_start=0.0001, beta_end=0.02),
    ).save_pretrained(directory)
    shutil.rmtree(scratch)


def _gpt_neox(directory: Path, tiny_models) -> None:
    """Dolly-v2's architecture (GPT-NeoX) with a byte-level BPE tokenizer, tiny."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    tokenizer = tiny_models.byte_bpe_tokenizer(directory)
    torch.manual_seed(0)
    config = GPTNeoXConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64
    )
    GPTNeoXForCausalLM(config).save_pretrained(directory)


def _open_clip(directory: Path, config: dict) -> None:
    """BiomedCLIP's layout: open_clip_config.json and open_clip_pytorch_model.bin."""
    import open_clip
    from safetensors.torch import load_file

    from medsyn.models.domain_clip import save_domain_clip

    torch.manual_seed(0)
    cfg = {**config, "vision_cfg": {**config["vision_cfg"], "image_size": 32}}
    model = open_clip.CLIP(**cfg)
    save_domain_clip(model, cfg, directory)
    weights = directory / "open_clip_model.safetensors"
    torch.save(load_file(weights), directory / "open_clip_pytorch_model.bin")
    weights.unlink()


def _bert(directory: Path) -> None:
    """all-MiniLM-L6-v2's layout (a BERT with a WordPiece tokenizer) at tiny widths: every character a
    piece, so any prompt tokenizes."""
    import string

    from transformers import BertConfig, BertModel, BertTokenizerFast

    directory.mkdir(parents=True)
    characters = string.ascii_lowercase + string.digits + string.punctuation
    pieces = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *characters, *("##" + c for c in characters)]
    (directory / "vocab.txt").write_text("\n".join(pieces) + "\n")
    tokenizer = BertTokenizerFast(vocab_file=str(directory / "vocab.txt"), do_lower_case=True)
    tokenizer.save_pretrained(directory)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(pieces),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    BertModel(config).save_pretrained(directory)


def _resnet50(path: Path) -> None:
    from medsyn.training.classifier import resnet50

    torch.manual_seed(0)
    torch.save(resnet50(1000)[0].state_dict(), path)


def _inception(path: Path) -> None:
    """torch-fidelity's TF-compatible InceptionV3 with random weights, saved as its weight file."""
    from unittest import mock

    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    torch.manual_seed(0)
    with (  # its constructor loads the published weights; here the layers keep their initialisation
        mock.patch("torch_fidelity.feature_extractor_inceptionv3.load_state_dict_from_url", return_value={}),
        mock.patch.object(FeatureExtractorInceptionV3, "load_state_dict"),
    ):
        model = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    torch.save(model.state_dict(), path)


# what each notebook runs in the paper profile that the smoke and default chains do not
PAPER_PATHS = {
    "01_curate": "captions from a vision-language model (LLaVA layout), reports rewritten by an LLM (Llama)",
    "02_train_ldm": "SDXL fine-tune, FLUX.1 LoRA, Kandinsky 2.2 LoRA from its two directories; bf16",
    "03_train_dit_hldf": "PixArt-α (T5, learned sigma) with HLDF and on templates; bf16",
    "04_train_vq_ar": "vq-ar from a pretrained causal LM (GPT-NeoX, as Dolly-v2); bf16",
    "05_sample": "seven families, Euler (DDIM for Kandinsky), bfloat16",
    "06_fidelity": "FID required (InceptionV3 from its weight file)",
    "07_privacy": "BiomedCLIP's directory layout (open_clip_pytorch_model.bin)",
    "08_downstream": "ResNet-50 from ImageNet weights, CheXpert and HAM10000",
    "09_report": "six readers, real-or-synthetic",
}


def results(run_dir: Path, stopped: bool = False) -> pd.DataFrame:
    """One row per notebook of the last run: its status ('ok', 'failed', 'stopped' where a signal
    ended the run, or 'not run'), seconds, and what the paper profile runs there."""
    notebooks = yaml.safe_load((run_dir / "rehearsal.yaml").read_text())["notebooks"]
    record = run_dir / "run.json"
    ran = {n["notebook"]: n for n in json.loads(record.read_text())["notebooks"]} if record.is_file() else {}
    rows = []
    for notebook in notebooks:
        status = ran.get(notebook, {}).get("status", "not run")
        if status == "not run" and stopped:
            status, stopped = "stopped", False  # the notebook the signal ended
        rows.append(
            {
                "notebook": notebook,
                "status": status,
                "seconds": ran.get(notebook, {}).get("seconds"),
                "paper code paths": PAPER_PATHS[notebook],
            }
        )
    return pd.DataFrame(rows).set_index("notebook")


def main() -> None:
    def own_options(parser):
        parser.add_argument("--readme", action="store_true", help="rewrite the README's table from the results")

    args = arguments(__doc__.splitlines()[0], own_options)
    from medsyn.chain import ChainError, reproduce
    from medsyn.records import save_table

    run_dir = args.work / f"paper-rehearsal-{args.scale}"
    if (run_dir / "rehearsal.yaml").is_file():  # an earlier rehearsal's run: each run starts afresh
        shutil.rmtree(run_dir)
    pretrained = args.work / "pretrained" / args.scale
    built = write_stand_ins(pretrained)
    profile = rehearsal_profile(args.scale, pretrained, run_dir)
    began, stopped = time.perf_counter(), False

    def stop(signum, frame):  # `timeout` sends SIGTERM: the table still says how far the chain came
        raise SystemExit(f"stopped by signal {signum}")

    signal.signal(signal.SIGTERM, stop)
    try:
        reproduce(profile, run_dir, progress=True)
    except ChainError as error:  # the table shows where it stopped; the error says why
        print(error, file=sys.stderr)
    except SystemExit as error:
        print(error, file=sys.stderr)
        stopped = True
    table = results(run_dir, stopped)
    print(table.to_string())
    print(f"chain: {time.perf_counter() - began:.0f} s on {device_name(device_for(args.scale))}")
    if args.out or args.readme:
        out = args.out or RESULTS_DIR / f"paper_rehearsal_{args.scale}.csv"
        parameters = {
            "scale": args.scale,
            "device": device_name(device_for(args.scale)),
            "torch": torch.__version__,
            "rehearsal": REHEARSAL,
            "stand_in_seconds": built,
        }
        save_table(table, out, parameters, [profile])
        if args.readme:
            from medsyn.readme import write_readme_tables

            used = write_readme_tables(README, README.parent, only=str(out.resolve().parent.relative_to(README.parent)))
            print(f"README: wrote {', '.join(used)}")
    if (table["status"] != "ok").any():
        raise SystemExit(1)


if __name__ == "__main__":
    main()
