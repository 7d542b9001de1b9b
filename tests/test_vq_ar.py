"""vq-ar on a tiny data set: the tokenizer's codebook does not collapse and reloads with diffusers'
VQModel, the LM's loss drops and resume is bitwise, the sampler returns exactly H x W image codes
whatever the model prefers, a seed gives the same codes and pixels, the clue bank sees training
images only, and `medsyn sample` treats the pipeline like any other."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from tiny_models import tiny_vae, write_tiny_dataset

from medsyn.data.dataset import read_records, split_records
from medsyn.models.vq_ar import VQARPipeline, _filter_logits, build_text_tokenizer, named_terms, retrieve_clues
from medsyn.sampling import generate, sample_class_prompts
from medsyn.training.vq_ar import clue_bank, train_lm, train_vq, vq_from_autoencoder

TINY_VQ = {"block_out_channels": [8, 16], "latent_channels": 4, "norm_num_groups": 4}
TINY_LM = {"n_embd": 32, "n_layer": 2, "n_head": 2}
LM = {"config": TINY_LM, "prompt_tokens": 6, "clue_tokens": 3, "batch_size": 8, "lr_warmup_steps": 0, "progress": False}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("vq_ar")
    data = write_tiny_dataset(root / "data", size=16, n=32)
    vq = train_vq(
        data, root / "vq", steps=60, batch_size=8, codes=16, config=TINY_VQ, adversarial_start=40, progress=False
    )
    return {"data": data, "vq": vq, "root": root}


def test_the_codebook_stays_in_use_and_the_tokenizer_reloads_with_diffusers(tiny):
    from diffusers import VQModel

    vq = tiny["vq"]
    history = vq["l1_history"]
    assert np.mean(history[-10:]) < 0.5 * np.mean(history[:5])  # reconstruction learns
    assert vq["codes_in_use"] >= 0.5 and vq["perplexity"] > 4  # 16 codes: k-means start, dead codes restarted
    assert vq["psnr"] > 15 and vq["reconstructions"].shape == vq["originals"].shape
    model = VQModel.from_pretrained(vq["vq_dir"], local_files_only=True)
    images = torch.from_numpy(vq["originals"][:4].transpose(0, 3, 1, 2).astype(np.float32)) / 127.5 - 1
    with torch.no_grad():  # diffusers' own quantiser picks the nearest code, as training did
        latents = model.encode(images).latents
        _, _, (_, _, own) = model.quantize(latents)
        decoded = model.decode(latents).sample
    codebook = model.quantize.embedding.weight
    flat = latents.permute(0, 2, 3, 1).reshape(-1, codebook.shape[1])
    assert torch.equal(own.flatten(), torch.cdist(flat, codebook).argmin(1))
    pictures = ((decoded + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    assert np.abs(pictures.astype(int) - vq["reconstructions"][:4]).max() <= 1


def test_the_spectral_term_reaches_the_tokenizer(tiny, tmp_path):
    kw = {"steps": 2, "batch_size": 8, "codes": 16, "config": TINY_VQ, "progress": False}
    plain = train_vq(tiny["data"], tmp_path / "plain", **kw)
    spectral = train_vq(tiny["data"], tmp_path / "spectral", spectral_weight=0.5, **kw)
    assert spectral["l1_history"][0] == plain["l1_history"][0]  # the same first batch and weights
    assert spectral["l1_history"][1] != plain["l1_history"][1]  # another first update


def test_a_tokenizer_started_from_an_autoencoder_is_that_autoencoder_before_quantisation():
    vae = tiny_vae().eval()
    with torch.no_grad():  # random weights everywhere, so a wrong fold or a dropped layer shows
        for module in (vae.quant_conv, vae.post_quant_conv):
            module.bias.normal_()
        vq = vq_from_autoencoder(vae, codes=8).eval()
        x = torch.rand(3, 3, 16, 16) * 2 - 1
        mean = vae.encode(x).latent_dist.mean
        latents = vq.encode(x).latents
        assert latents.shape == mean.shape and torch.allclose(latents, mean, atol=1e-5)
        assert torch.allclose(vq.decode(latents, force_not_quantize=True).sample, vae.decode(mean).sample, atol=1e-5)


def test_train_vq_starts_from_an_autoencoder_directory(tiny, tmp_path):
    from diffusers import VQModel

    vae = tiny_vae()
    vae.save_pretrained(tmp_path / "vae")
    kw = {"steps": 3, "batch_size": 8, "codes": 16, "lr": 1e-6, "progress": False}
    result = train_vq(tiny["data"], tmp_path / "vq", init_from=tmp_path / "vae", **kw)
    model = VQModel.from_pretrained(result["vq_dir"], local_files_only=True).eval()
    assert model.config.vq_embed_dim == vae.config.latent_channels and model.config.num_vq_embeddings == 16
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():  # three tiny steps later the encoder is still the autoencoder's, and has moved
        difference = (model.encode(x).latents - vae.eval().encode(x).latent_dist.mean).abs().max()
    assert 0 < difference < 1e-3
    with pytest.raises(ValueError, match="either config"):
        train_vq(tiny["data"], tmp_path / "both", init_from=tmp_path / "vae", config=TINY_VQ, **kw)
    tiny_vae(sample_size=32).save_pretrained(tmp_path / "vae32")
    with pytest.raises(ValueError, match="trained at 32 px"):
        train_vq(tiny["data"], tmp_path / "size", init_from=tmp_path / "vae32", **kw)
    with pytest.raises(FileNotFoundError, match="missing"):
        train_vq(tiny["data"], tmp_path / "none", init_from=tmp_path / "missing", **kw)


def test_the_lm_learns_resumes_exactly_and_the_pipeline_reloads(tiny, tmp_path):
    vq_dir = tiny["vq"]["vq_dir"]
    straight = train_lm(tiny["data"], vq_dir, tmp_path / "straight", steps=40, lr=3e-3, **LM)
    assert np.mean(straight["loss_history"][-5:]) < 0.8 * np.mean(straight["loss_history"][:5])
    train_lm(tiny["data"], vq_dir, tmp_path / "resumed", steps=20, lr=3e-3, **LM)
    resumed = train_lm(tiny["data"], vq_dir, tmp_path / "resumed", steps=40, lr=3e-3, **LM)
    assert len(resumed["loss_history"]) == 20 and resumed["loss_history"] == straight["loss_history"][20:]
    a = load_file(tmp_path / "straight" / "pipeline" / "lm" / "model.safetensors")
    b = load_file(tmp_path / "resumed" / "pipeline" / "lm" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    pipeline = VQARPipeline.from_pretrained(straight["pipeline_dir"])
    assert pipeline.sample_size == 16 and pipeline.grid == (8, 8)
    seeds = [torch.Generator().manual_seed(s) for s in (3, 4)]
    first = pipeline(["A cyan bar.", "A red disc."], guidance_scale=2.0, output_type="np", generator=seeds)
    again = pipeline(
        ["A cyan bar.", "A red disc."],
        guidance_scale=2.0,
        output_type="np",
        generator=[torch.Generator().manual_seed(s) for s in (3, 4)],
    )
    assert first.images.shape == (2, 16, 16, 3)
    assert torch.equal(first.codes, again.codes) and np.array_equal(first.images, again.images)  # bitwise
    alone = pipeline(
        ["A red disc."], guidance_scale=2.0, output_type="np", generator=[torch.Generator().manual_seed(4)]
    )
    assert torch.equal(alone.codes[0], first.codes[1])  # an image's seed regenerates it on its own
    assert np.array_equal(pipeline.decode(first.codes).numpy(), first.images)


def test_two_launched_processes_train_the_lm_one_process_trains(tiny, tmp_path, capsys):
    """`in_processes` (04's `lm_processes`): two gloo processes on halves of each batch give the weights
    and the loss history of one process, up to the order of floating-point sums in the all-reduce; the
    progress bar reaches the notebook; a failure in the processes is raised with their message."""
    from medsyn.training.processes import in_processes

    vq_dir = tiny["vq"]["vq_dir"]
    # without dropout, whose masks are each process's own draws
    lm = {**LM, "config": {**TINY_LM, "resid_pdrop": 0.0, "embd_pdrop": 0.0}, "lr": 3e-3, "steps": 6}
    one = train_lm(tiny["data"], vq_dir, tmp_path / "one", **lm)
    two = in_processes(train_lm, 2, tiny["data"], vq_dir, tmp_path / "two", **{**lm, "progress": True})
    assert "lm: 100%" in capsys.readouterr().err
    assert two["pipeline_dir"] == str(tmp_path / "two" / "pipeline")
    assert len(two["loss_history"]) == 6
    assert np.allclose(two["loss_history"], one["loss_history"], rtol=0, atol=1e-5), (two, one)
    a = load_file(tmp_path / "one" / "pipeline" / "lm" / "model.safetensors")
    b = load_file(tmp_path / "two" / "pipeline" / "lm" / "model.safetensors")
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert 0 < worst < 1e-4, worst  # two processes did run (not bitwise one), and agree
    with pytest.raises(RuntimeError, match="batch_size 7 must split evenly over 1 accumulation steps and 2 processes"):
        in_processes(train_lm, 2, tiny["data"], vq_dir, tmp_path / "odd", **{**lm, "batch_size": 7})
    with pytest.raises(ValueError, match="at least 1"):
        in_processes(train_lm, 0, tiny["data"], vq_dir, tmp_path / "none")


def test_an_interrupted_launch_leaves_no_process_running(tiny, tmp_path, monkeypatch):
    """A notebook interrupted while its LM trains in processes (Ctrl-C, a kernel interrupt) stops the
    launcher and the training processes with it, rather than leaving them to train unseen; so does
    one interrupted while it waits for a loop in a process of its own."""
    import os
    import subprocess
    import sys
    import time

    from medsyn.training import processes

    started, popen = [], subprocess.Popen

    def recorded(*args, **kwargs):
        started.append(popen(*args, **kwargs))
        return started[-1]

    class Interrupted:  # the notebook's output stream, interrupted when the first line arrives
        def write(self, text):
            raise KeyboardInterrupt

        def flush(self):
            pass

    monkeypatch.setattr(processes.subprocess, "Popen", recorded)
    monkeypatch.setattr(sys, "stderr", Interrupted())
    with pytest.raises(KeyboardInterrupt):
        processes.in_processes(
            train_lm, 2, tiny["data"], tiny["vq"]["vq_dir"], tmp_path / "lm", steps=500, **{**LM, "progress": True}
        )
    monkeypatch.undo()
    assert started[0].poll() is not None
    for _ in range(50):  # the workers of the launcher's session go too
        try:
            os.killpg(started[0].pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.2)
    else:
        pytest.fail("training processes still running after the interrupt")
    assert not (tmp_path / "lm" / "pipeline").exists()
    # a loop in a process of its own (`start`) whose wait is interrupted stops too, and says so when asked again
    apart = processes.start(train_lm, 1, tiny["data"], tiny["vq"]["vq_dir"], tmp_path / "own", steps=500, **LM)
    monkeypatch.setattr(sys, "stderr", Interrupted())
    with pytest.raises(KeyboardInterrupt):
        apart.result()
    monkeypatch.undo()
    assert apart._child.poll() is not None and not (tmp_path / "own" / "pipeline").exists()
    with pytest.raises(RuntimeError, match="was stopped: its wait was interrupted"):
        apart.result()
    assert not Path(apart._scratch.name).exists()  # its call, result and log files go with it


def test_a_pretrained_lm_writes_prompts_with_its_own_tokenizer(tiny, tmp_path):
    """With `pretrained_lm_dir`, the LM's own tokenizer (its special tokens added) writes the prompts,
    so each of its token ids still names the word its embedding learned (LLM-CXR keeps Dolly's); the
    saved pipeline reloads and samples. An LM directory without its tokenizer is named."""
    from tiny_models import byte_bpe_tokenizer
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    lm_dir = tmp_path / "neox"
    own = byte_bpe_tokenizer(lm_dir)
    torch.manual_seed(0)
    config = GPTNeoXConfig(
        vocab_size=len(own), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64
    )
    GPTNeoXForCausalLM(config).save_pretrained(lm_dir)
    result = train_lm(tiny["data"], tiny["vq"]["vq_dir"], tmp_path / "lm", pretrained_lm_dir=lm_dir, steps=2, **LM)
    pipeline = VQARPipeline.from_pretrained(result["pipeline_dir"])
    prompt = "A red disc."
    assert (
        pipeline.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        == own(prompt, add_special_tokens=False)["input_ids"]
    )
    assert pipeline.offset == len(own) + 4  # <pad>, <clue>, <boi>, <eoi> after the LM's own tokens
    assert generate(pipeline, [prompt], 1, seed=0, guidance_scale=2.0)[0]["image"].shape == (16, 16, 3)
    (lm_dir / "tokenizer_config.json").unlink()
    with pytest.raises(FileNotFoundError, match="tokenizer_config.json"):
        train_lm(tiny["data"], tiny["vq"]["vq_dir"], tmp_path / "lm2", pretrained_lm_dir=lm_dir, steps=1, **LM)


def test_a_loop_stops_when_the_notebook_that_started_it_is_gone(tiny, tmp_path):
    """A kernel restarted or killed runs no `except`: the loop it started in a process of its own sees
    that it is gone and stops, rather than training on unseen."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from medsyn.training.processes import _alive

    kernel = tmp_path / "kernel.py"
    kernel.write_text(
        "import time\n"
        "from medsyn.training.processes import start\n"
        "from medsyn.training.vq_ar import train_lm\n"
        f"started = start(train_lm, 1, {str(tiny['data'])!r}, {str(tiny['vq']['vq_dir'])!r}, "
        f"{str(tmp_path / 'lm')!r}, steps=100000, **{LM!r})\n"
        "print(started._child.pid, started._scratch.name, flush=True)\n"
        "time.sleep(600)\n"
    )
    notebook = subprocess.Popen([sys.executable, str(kernel)], stdout=subprocess.PIPE, text=True)
    pid, scratch = notebook.stdout.readline().split()
    loop = int(pid)
    assert _alive(loop)
    notebook.kill()  # SIGKILL: nothing of the kernel runs any more
    notebook.wait()
    for _ in range(150):
        if not _alive(loop):
            break
        time.sleep(0.2)
    else:
        os.killpg(loop, signal.SIGTERM)  # not left to run after the test
        pytest.fail("the loop still trains after its notebook is gone")
    assert not (tmp_path / "lm" / "pipeline").exists() and not Path(scratch).exists()


def test_a_loop_started_in_a_process_of_its_own_trains_what_it_trains_here(tiny, tmp_path, capsys):
    """`start` (02's `unet_threads`): the loop in a process of its own on one thread gives bitwise the
    weights it gives here on one thread, this process keeps the other threads meanwhile and gets them
    back, the loop's progress bar reaches the notebook, and a failure is raised with its message."""
    from medsyn.training.processes import start

    vq_dir, threads = tiny["vq"]["vq_dir"], torch.get_num_threads()
    lm = {**LM, "lr": 3e-3, "steps": 4}
    try:
        torch.set_num_threads(1)
        here = train_lm(tiny["data"], vq_dir, tmp_path / "here", **lm)
    finally:
        torch.set_num_threads(threads)
    started = start(train_lm, 1, tiny["data"], vq_dir, tmp_path / "apart", **{**lm, "progress": True})
    assert torch.get_num_threads() == max(1, threads - 1)
    apart = started.result()
    assert torch.get_num_threads() == threads
    assert "lm: 100%" in capsys.readouterr().err
    assert apart["loss_history"] == here["loss_history"] and apart["pipeline_dir"] == str(
        tmp_path / "apart" / "pipeline"
    )
    a = load_file(tmp_path / "here" / "pipeline" / "lm" / "model.safetensors")
    b = load_file(tmp_path / "apart" / "pipeline" / "lm" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert start(train_lm, None, tiny["data"], vq_dir, tmp_path / "here", **lm).result()["loss_history"] == []
    failed = start(train_lm, 1, tiny["data"], vq_dir, tmp_path / "bad", **{**lm, "prompt_field": "caption"})
    with pytest.raises(RuntimeError, match="prompt_field must be 'text' or 'report'") as first:
        failed.result()
    assert torch.get_num_threads() == threads
    with pytest.raises(RuntimeError) as again:  # asked again: the same error, not a closed log's
        failed.result()
    assert again.value is first.value and torch.get_num_threads() == threads
    with pytest.raises(ValueError, match="at least 1"):
        start(train_lm, 0, tiny["data"], vq_dir, tmp_path / "none")


def test_a_class_balanced_lm_resumes_exactly_and_draws_other_batches(tiny, tmp_path):
    vq_dir = tiny["vq"]["vq_dir"]
    straight = train_lm(tiny["data"], vq_dir, tmp_path / "straight", steps=4, balance="class", **LM)
    train_lm(tiny["data"], vq_dir, tmp_path / "resumed", steps=2, balance="class", **LM)
    resumed = train_lm(tiny["data"], vq_dir, tmp_path / "resumed", steps=4, balance="class", **LM)
    assert resumed["loss_history"] == straight["loss_history"][2:]
    plain = train_lm(tiny["data"], vq_dir, tmp_path / "plain", steps=1, **LM)
    assert plain["loss_history"][0] != straight["loss_history"][0]
    with pytest.raises(ValueError, match="balance"):
        train_lm(tiny["data"], vq_dir, tmp_path / "bad", steps=1, balance="classes", **LM)


def test_a_cosine_lm_resumes_exactly_not_at_another_length_and_an_older_checkpoint_as_constant(tiny, tmp_path):
    """A cosine schedule resumes bitwise after an interruption and refuses another length; a checkpoint
    without `lr_schedule` in its recipe (written before the loops had it) resumes as constant only."""
    import shutil

    from medsyn.training.common import RecipeMismatchError

    vq_dir, cosine = tiny["vq"]["vq_dir"], {**LM, "lr_schedule": "cosine", "lr_warmup_steps": 2}
    straight = train_lm(tiny["data"], vq_dir, tmp_path / "straight", steps=8, checkpoint_every=4, **cosine)
    constant = train_lm(tiny["data"], vq_dir, tmp_path / "constant", steps=8, **{**cosine, "lr_schedule": "constant"})
    assert straight["loss_history"][:2] == constant["loss_history"][:2]  # the same warm-up
    assert straight["loss_history"][4:] != constant["loss_history"][4:]  # then another rate
    shutil.copytree(
        tmp_path / "straight" / "checkpoints" / "step_0000004", tmp_path / "cut" / "checkpoints" / "step_0000004"
    )
    resumed = train_lm(tiny["data"], vq_dir, tmp_path / "cut", steps=8, checkpoint_every=4, **cosine)
    assert resumed["loss_history"] == straight["loss_history"][4:]
    with pytest.raises(RecipeMismatchError, match="steps"):
        train_lm(tiny["data"], vq_dir, tmp_path / "straight", steps=12, **cosine)
    # a checkpoint written before the loops had `lr_schedule` was trained at a constant rate
    state = tmp_path / "constant" / "checkpoints" / "step_0000008" / "trainer_state.json"
    written = json.loads(state.read_text())
    del written["recipe"]["lr_schedule"]
    state.write_text(json.dumps(written))
    with pytest.raises(RecipeMismatchError, match="lr_schedule"):
        train_lm(tiny["data"], vq_dir, tmp_path / "constant", steps=8, **cosine)
    more = train_lm(tiny["data"], vq_dir, tmp_path / "constant", steps=9, **{**cosine, "lr_schedule": "constant"})
    assert len(more["loss_history"]) == 1


def test_the_sampler_returns_exactly_hw_image_codes_even_when_the_model_prefers_text(tiny, tmp_path):
    result = train_lm(tiny["data"], tiny["vq"]["vq_dir"], tmp_path / "lm", steps=2, **LM)
    pipeline = VQARPipeline.from_pretrained(result["pipeline_dir"])
    with torch.no_grad():  # every text id and <eoi> gets a far larger logit than any image code
        pipeline.lm.lm_head.weight[: pipeline.offset] *= 0
        pipeline.lm.transformer.ln_f.bias.fill_(5.0)
        pipeline.lm.lm_head.weight[: pipeline.offset] += 10.0
        logits = pipeline.lm(input_ids=pipeline.context(["A cyan bar."])).logits[0, -1]
    assert logits[: pipeline.offset].min() > logits[pipeline.offset :].max()  # the model wants text
    for guidance in (1.0, 3.0):
        for top in ({}, {"top_k": 3}, {"top_p": 0.5}):
            codes = pipeline.sample_codes(["A cyan bar."] * 2, [torch.Generator().manual_seed(0)] * 2, guidance, **top)
            assert codes.shape == (2, 8, 8) and codes.min() >= 0 and codes.max() < pipeline.codes


def test_top_k_and_top_p_keep_what_they_promise():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isfinite(_filter_logits(logits, 2, None)).tolist() == [[True, True, False, False]]
    assert torch.isfinite(_filter_logits(logits, None, 0.7)).tolist() == [[True, True, False, False]]
    assert torch.isfinite(_filter_logits(logits, None, 0.5)).tolist() == [[True, False, False, False]]
    assert torch.isfinite(_filter_logits(logits, None, 0.81)).tolist() == [[True, True, True, False]]


def test_the_clue_bank_is_built_from_training_images_only_and_retrieved_from_text(tiny):
    records = split_records(tiny["data"], "train")
    codes = np.zeros((len(records), 2, 2), dtype=np.int64)
    for i, record in enumerate(records):  # bars use codes 1 and 2, discs 3 and 4, all use 0
        codes[i] = [[0, 1], [2, 0]] if "bar" in record["labels"] else [[0, 3], [4, 0]]
    bank = clue_bank(codes, records, per_term=2)
    assert {term: sorted(c) for term, c in bank.items()} == {"bar": [1, 2], "disc": [3, 4]}
    with pytest.raises(ValueError, match="training images only"):
        clue_bank(codes[:2], [records[0], {**records[1], "split": "validation"}])
    assert sorted(retrieve_clues("A cyan bar.", bank, 3)) == [1, 2]
    assert retrieve_clues("A red disc next to a bar.", {"bar": [1, 2], "disc": [3, 4]}, 3) == [1, 3, 2]
    assert retrieve_clues("Nothing here.", bank, 3) == [] and retrieve_clues("barn", bank, 3) == []


def test_a_term_named_only_inside_a_longer_term_is_not_named():
    terms = ["dyed lifted polyp", "polyp", "pulmonary embolism", "no pulmonary embolism", "colon"]
    assert named_terms("A dyed lifted polyp in the colon.", terms) == ["dyed lifted polyp", "colon"]
    assert named_terms("A polyp next to a dyed lifted polyp.", terms) == ["dyed lifted polyp", "polyp"]
    assert named_terms("CT with no pulmonary embolism.", terms) == ["no pulmonary embolism"]
    assert named_terms("CT: pulmonary embolism.", terms) == ["pulmonary embolism"]
    assert named_terms("Polyps and colonic folds.", terms) == []  # whole words only


def test_a_report_clue_bank_links_codes_to_the_terms_the_training_prompts_name(tiny):
    records = split_records(tiny["data"], "train")
    codes = np.zeros((len(records), 2, 2), dtype=np.int64)
    for i, record in enumerate(records):  # bars use codes 1 and 2, discs 3 and 4, all use 0
        codes[i] = [[0, 1], [2, 0]] if "bar" in record["labels"] else [[0, 3], [4, 0]]
    prompts = [r["report"] for r in records]
    bank = clue_bank(codes, records, per_term=2, prompts=prompts, terms=["centre", "column", "phantom", "heart"])
    assert {term: sorted(c) for term, c in bank.items()} == {"centre": [3, 4], "column": [1, 2]}
    assert sorted(retrieve_clues("Anatomy: column.", bank, 3)) == [1, 2]  # from the anatomy word alone
    # "phantom" is in every report: no code is typical of it


def test_an_lm_on_reports_drops_clues_resumes_exactly_and_samples_with_the_class_report(tiny, tmp_path):
    vq_dir = tiny["vq"]["vq_dir"]
    options = {**LM, "prompt_tokens": 16, "prompt_field": "report", "lr": 3e-3}
    straight = train_lm(tiny["data"], vq_dir, tmp_path / "straight", steps=20, clue_dropout=0.5, **options)
    train_lm(tiny["data"], vq_dir, tmp_path / "resumed", steps=10, clue_dropout=0.5, **options)
    resumed = train_lm(tiny["data"], vq_dir, tmp_path / "resumed", steps=20, clue_dropout=0.5, **options)
    assert resumed["loss_history"] == straight["loss_history"][10:]
    with_clues = train_lm(tiny["data"], vq_dir, tmp_path / "clues", steps=20, **options)
    assert with_clues["loss_history"] != straight["loss_history"]  # other sequences: some lack their clues
    pipeline = VQARPipeline.from_pretrained(straight["pipeline_dir"])
    assert pipeline.prompt_field == "report" and set(pipeline.config["clue_bank"]) == {"bar", "disc"}
    out = sample_class_prompts(
        straight["pipeline_dir"],
        tiny["data"],
        tmp_path / "generated",
        "vq-ar",
        per_prompt=1,
        steps=1,
        guidance_scale=1.0,
    )
    reports = {r["labels"][0]: r["class_report"] for r in split_records(tiny["data"], "train")}
    generated = read_records(out)
    assert len(generated) == 2 and all(r["text"] == reports[r["labels"][0]] for r in generated)
    assert all("report" not in r for r in generated)

    # the clue and guidance ablation: the same slots in every condition, each with its interval
    from medsyn.metrics.alignment import clue_guidance_ablation, plot_clue_guidance_ablation
    from medsyn.models.class_probe import TrainedProbe, to_probe_input
    from medsyn.training.class_probe import train_class_probe

    probe_path = tmp_path / "probe.pt"
    train_class_probe(tiny["data"], split_records(tiny["data"], "train"), epochs=3, progress=False).save(probe_path)
    table = clue_guidance_ablation(straight["pipeline_dir"], tiny["data"], probe_path, 4, 2.0, resamples=200)
    assert table[["clues", "guidance_scale"]].values.tolist() == [[True, 2.0], [True, 1.0], [False, 2.0], [False, 1.0]]
    assert (table["images"] == 8).all() and table["difference_from_full"].iloc[0] == 0
    assert (table["macro_accuracy_low"] <= table["macro_accuracy"]).all()
    assert (table["macro_accuracy"] <= table["macro_accuracy_high"]).all()
    prompts = [reports["bar"], reports["disc"]]  # class order: tiny: bar, tiny: disc
    plain = generate(pipeline, prompts, 4, 0, guidance_scale=1.0, call_options={"clues": False})
    clued = generate(pipeline, prompts, 4, 0, guidance_scale=1.0)
    assert any(not np.array_equal(a["image"], b["image"]) for a, b in zip(plain, clued))  # the flag reaches it
    probe = TrainedProbe.load(probe_path)
    predicted = np.asarray(probe.classes)[probe.predict(to_probe_input(np.stack([s["image"] for s in plain])))]
    by_hand = np.mean([np.mean(predicted[:4] == "tiny: bar"), np.mean(predicted[4:] == "tiny: disc")])
    assert table["macro_accuracy"].iloc[3] == pytest.approx(by_hand)
    plot_clue_guidance_ablation(table).savefig(tmp_path / "ablation.png")


def test_an_lm_on_reports_needs_records_that_have_them(tmp_path):
    data = write_tiny_dataset(tmp_path / "data", size=16, n=12, reports=False)
    with pytest.raises(ValueError, match=r"prompt_field 'report': the records of \['tiny'\] have none"):
        train_lm(data, tmp_path / "no_vq", tmp_path / "lm", prompt_field="report", **LM)


def test_the_text_tokenizer_splits_words_and_punctuation():
    tokenizer = build_text_tokenizer(["Dermoscopy image showing melanoma."])
    ids = tokenizer("Dermoscopy image showing a melanoma.", add_special_tokens=False)["input_ids"]
    assert tokenizer.convert_ids_to_tokens(ids) == ["dermoscopy", "image", "showing", "<unk>", "melanoma", "."]


def test_medsyn_sample_writes_a_generated_dataset_from_a_vq_ar_pipeline(tiny, tmp_path):
    result = train_lm(tiny["data"], tiny["vq"]["vq_dir"], tmp_path / "lm", steps=4, **LM)
    out = sample_class_prompts(result["pipeline_dir"], tiny["data"], tmp_path / "gen", "vq-ar", 2, guidance_scale=2.0)
    records = read_records(out)
    assert len(records) == 4 and {r["scheduler"] for r in records} == {"autoregressive"}
    assert {r["steps"] for r in records} == {64} and {r["model"] for r in records} == {"vq-ar"}
    pipeline = VQARPipeline.from_pretrained(result["pipeline_dir"])
    record = records[3]  # its seed alone regenerates it
    alone = pipeline(
        [record["text"]],
        guidance_scale=2.0,
        output_type="np",
        generator=[torch.Generator().manual_seed(record["seed"])],
    )
    written = np.asarray(Image.open(out / "train" / record["file_name"]))
    assert np.array_equal(written, np.rint(alone.images[0] * 255).astype(np.uint8))
    assert generate(pipeline, [record["text"]], 1, seed=0, guidance_scale=2.0)[0]["image"].shape == (16, 16, 3)


def test_samples_follow_their_prompt(tiny, tmp_path):
    """Trained a little longer, the LM draws cyan bars for "A cyan bar." and red discs for "A red
    disc.": every bar sample is bluer than every disc sample (red minus blue, the colour that tells
    the two classes of the tiny data set apart)."""
    result = train_lm(tiny["data"], tiny["vq"]["vq_dir"], tmp_path / "lm", steps=250, lr=3e-3, **LM)
    pipeline = VQARPipeline.from_pretrained(result["pipeline_dir"])
    seeds = [torch.Generator().manual_seed(i) for i in range(16)]
    images = pipeline(
        ["A cyan bar."] * 8 + ["A red disc."] * 8, guidance_scale=2.0, output_type="np", generator=seeds
    ).images
    redness = images[..., 0].mean(axis=(1, 2)) - images[..., 2].mean(axis=(1, 2))
    assert redness[:8].max() < redness[8:].min(), redness.round(2)


def test_sample_families_keeps_an_autoregressive_family_and_times_its_batches(tiny, tmp_path):
    from medsyn.sampling import sample_families

    result = train_lm(tiny["data"], tiny["vq"]["vq_dir"], tmp_path / "lm", steps=2, **LM)
    options = {"per_prompt": 2, "scheduler": "dpmsolver++", "steps": 20, "guidance_scale": 2.0, "batch_size": 1}
    first = sample_families({"vq-ar": result["pipeline_dir"]}, tiny["data"], tmp_path / "gen", **options).iloc[0]
    assert first["status"] == "sampled" and first["scheduler"] == "autoregressive" and first["steps"] == 64
    assert first["seconds_per_image_low"] <= first["seconds_per_image"] <= first["seconds_per_image_high"]
    assert first["seconds_total"] >= 4 * first["seconds_per_image"]  # loading and writing come on top
    again = sample_families({"vq-ar": result["pipeline_dir"]}, tiny["data"], tmp_path / "gen", **options).iloc[0]
    assert again["status"] == "kept"  # the diffusion sampler's name and steps do not apply to it
    with pytest.raises(ValueError, match="sampled differently"):
        sample_families(
            {"vq-ar": result["pipeline_dir"]}, tiny["data"], tmp_path / "gen", **{**options, "guidance_scale": 3.0}
        )


def test_lm_steps_accumulated_or_checkpointed_take_the_whole_batchs_gradient(tiny, tmp_path, monkeypatch):
    """04's `lm_gradient_accumulation_steps` and `lm_gradient_checkpointing` (what lets `paper`'s
    Dolly-v2-3b train on one GPU: benchmarks/training_memory.py): a step of 8 sequences in 2
    micro-batches of 4, and a step whose layers are recomputed in the backward pass, have the gradient
    of the step of 8 at once. With LR 0 the three runs see the same weights. Dropping the division by
    the micro-batches doubles the gradient; micro-batches of other sequences change it; a flag that
    is not passed on leaves no layer checkpointed."""
    import transformers.modeling_utils
    import transformers.models.gpt2.modeling_gpt2 as gpt2

    import medsyn.training.vq_ar as vq_ar

    recorded, calls, checkpointed_calls = [], [], []
    real_step = vq_ar.optimizer_step
    real_checkpoint = transformers.modeling_utils.checkpoint

    def recording_step(accelerator, parameters, *args):
        recorded.append([p.grad.detach().clone() for p in parameters])  # before clipping and stepping
        real_step(accelerator, parameters, *args)

    def counted_call(module, args):
        if isinstance(module, gpt2.GPT2Block):
            calls.append(module)

    monkeypatch.setattr(vq_ar, "optimizer_step", recording_step)

    def counted_checkpoint(*args, **kwargs):
        checkpointed_calls.append(1)
        return real_checkpoint(*args, **kwargs)

    monkeypatch.setattr(transformers.modeling_utils, "checkpoint", counted_checkpoint)
    no_dropout = {**TINY_LM, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
    lm = {**LM, "config": no_dropout, "lr": 0.0, "steps": 1, "checkpoint_every": 0}
    runs = {
        "whole": {},
        "accumulated": {"gradient_accumulation_steps": 2},
        "checkpointed": {"gradient_checkpointing": True},
    }
    layer_calls = []
    hook = torch.nn.modules.module.register_module_forward_pre_hook(counted_call)
    try:
        for name, options in runs.items():
            calls.clear(), checkpointed_calls.clear()
            train_lm(tiny["data"], tiny["vq"]["vq_dir"], tmp_path / name, **lm, **options)
            layer_calls.append((len(calls), len(checkpointed_calls)))
    finally:
        hook.remove()
    whole, accumulated, checkpointed = recorded
    assert any(g.abs().sum() > 0 for g in whole)
    for a, b, c in zip(whole, accumulated, checkpointed):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(c, a, rtol=1e-4, atol=1e-7)
    layers = TINY_LM["n_layer"]  # one pass; two micro-batches' passes; one pass, every layer checkpointed
    assert layer_calls == [(layers, 0), (2 * layers, 0), (layers, layers)]
    with pytest.raises(ValueError, match="batch_size 8 must split evenly over 3 accumulation steps"):
        train_lm(tiny["data"], tiny["vq"]["vq_dir"], tmp_path / "odd", **{**lm, "gradient_accumulation_steps": 3})


def test_an_lm_checkpoint_from_before_accumulation_resumes_as_one_micro_batch(tiny, tmp_path):
    """LM checkpoints written before `gradient_accumulation_steps` existed record no such key: they
    resume as the one micro-batch they were trained with (`ADDED_RECIPE_KEYS`), and not with two."""
    from medsyn.training.common import RecipeMismatchError

    vq_dir, out = tiny["vq"]["vq_dir"], tmp_path / "lm"
    train_lm(tiny["data"], vq_dir, out, steps=2, checkpoint_every=2, **LM)
    (state_path,) = out.glob("checkpoints/*/trainer_state.json")
    state = json.loads(state_path.read_text())
    del state["recipe"]["gradient_accumulation_steps"]
    state_path.write_text(json.dumps(state))
    with pytest.raises(RecipeMismatchError, match="gradient_accumulation_steps"):
        train_lm(tiny["data"], vq_dir, out, steps=3, gradient_accumulation_steps=2, **LM)
    resumed = train_lm(tiny["data"], vq_dir, out, steps=3, **LM)
    assert len(resumed["loss_history"]) == 1  # step 3 only: steps 1 and 2 were resumed
