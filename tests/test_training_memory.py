"""benchmarks/training_memory.py: the saved-tensor count against hand counts and against real
tensors, and the `paper` profile's micro-batches against the committed count."""

import pandas as pd
import pytest
import torch

from benchmarks import training_memory
from benchmarks.common import RESULTS_DIR


def test_saved_bytes_are_the_activations_autograd_keeps_counted_by_hand():
    """Linear → ReLU → Linear on n rows: the first layer keeps its input (n × a), ReLU keeps its output
    (n × b), which the second layer keeps too (one storage, counted once), with its weight for the
    gradient of that input; the first layer's weight is not kept (x needs no gradient). The models'
    own weights are left out when named. Counting a shared storage twice fails this."""
    n, a, b, c = 5, 7, 11, 3
    model = torch.nn.Sequential(torch.nn.Linear(a, b), torch.nn.ReLU(), torch.nn.Linear(b, c))
    x = torch.randn(n, a)
    own = list(model.parameters())
    assert training_memory.saved_bytes(lambda: model(x), own) == (n * a + n * b) * 4
    assert training_memory.saved_bytes(lambda: model(x)) == (n * a + n * b + b * c) * 4


def test_fake_tensors_count_what_real_tensors_save_under_autocast():
    """The count runs on fake tensors (nothing computed); on a small SDXL-shaped U-Net under bf16
    autocast it agrees with the same forward pass on real tensors to 0.5 %: only the norms' mean and
    variance differ in dtype (float32 on real CPU tensors, bf16 on fake ones), a few kB. Fake tensors
    that CPU autocast does not reach (left on the meta device, say) save float32 activations and no
    fused attention: 3.7 times the count. The fake models hold the real ones' parameters, trainable as they are."""
    from diffusers import UNet2DConditionModel

    config = {
        "sample_size": 16,
        "block_out_channels": [32, 64],
        "layers_per_block": 1,
        "cross_attention_dim": 32,
        "attention_head_dim": 8,
        "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    }

    def build():
        unet = UNet2DConditionModel(**config).train()

        def loss(b):
            with training_memory.autocast():
                out = unet(torch.randn(b, 4, 16, 16), torch.randint(0, 1000, (b,)), torch.randn(b, 7, 32)).sample
            return out.float().square().mean()

        return [unet], loss

    models, real_loss = build()
    for b in (1, 3):
        real = training_memory.saved_bytes(lambda b=b: real_loss(b), list(models[0].parameters()))
        mode, fake_models, trainable, fake_loss = training_memory.fake(build)
        counted = training_memory.activation_bytes(mode, fake_models, fake_loss, b)
        assert counted == pytest.approx(real, rel=5e-3), (b, counted, real)
    assert len(trainable) == len(list(models[0].parameters())) and all(p.requires_grad for p in trainable)
    assert training_memory.resident_bytes(*fake_models) == training_memory.resident_bytes(*models)


def test_largest_micro_batch_is_the_last_that_fits():
    assert training_memory.largest_micro_batch(lambda b: b <= 37) == 37
    assert training_memory.largest_micro_batch(lambda b: b <= 1) == 1
    assert training_memory.largest_micro_batch(lambda b: False) == 0
    assert training_memory.largest_micro_batch(lambda b: True, most=100) == 100


def test_the_paper_profiles_micro_batches_are_those_counted_and_fit():
    """`benchmarks/results/training_memory.csv` was counted for `paper.yaml` as it is: the same batch,
    accumulation and checkpointing for every large loop, each within the device. A profile changed
    without counting again fails here (run `python -m benchmarks.training_memory --readme`)."""
    counted = pd.read_csv(RESULTS_DIR / "training_memory.csv", index_col="loop")
    for loop in training_memory.paper_loops(training_memory._profile("paper")):
        row = counted.loc[loop["name"]]
        assert (row["batch"], row["accumulation"], bool(row["checkpointing"])) == (
            loop["batch"],
            loop["accumulation"],
            loop["checkpointing"],
        ), loop["name"]
        assert row["micro_batch"] <= row["largest_micro_batch"] and row["fits"], loop["name"]


def test_the_gpu_measurement_trains_each_loop_on_the_device_it_is_given(monkeypatch):
    """`--measure` (on a GPU) builds a loop's models on the device and takes two optimizer steps at its
    micro-batch under that device's autocast. On the CPU, where no allocator counts, the peak is NaN,
    but the path is the GPU's: the compact U-Net's and the tokenizer's weights move, their forward
    passes ran in bf16."""
    dtypes = []
    real_autocast = training_memory.autocast

    def recorded_autocast():
        context = real_autocast()
        dtypes.append((context.device, context.fast_dtype))
        return context

    monkeypatch.setattr(training_memory, "autocast", recorded_autocast)
    for build in (
        lambda: training_memory._compact_unet(8, 4, 32, 4),
        lambda: training_memory._autoencoder("vq", 32, {"block_out_channels": [16, 32], "norm_num_groups": 8}, 16, 0.2),
    ):
        built = []

        def keep(build=build, built=built):
            models, loss = build()
            built.append([p.detach().clone() for p in models[0].parameters()])
            built.append(list(models[0].parameters()))
            return models, loss

        loop = {"build": keep, "batch": 4, "accumulation": 2, "ema": True}
        peak = training_memory.measured_peak(loop, torch.device("cpu"))
        assert peak != peak  # NaN: no allocator to read on the CPU
        before, after = built
        assert any(not torch.equal(a, b) for a, b in zip(before, after))  # two steps were taken
    assert dtypes == [("cpu", torch.bfloat16)] * 4


def test_measured_peaks_join_the_count_where_the_micro_batch_is_the_same(tmp_path):
    count = pd.DataFrame(
        {
            "loop": ["a", "b", "calibration"],
            "micro_batch": [4, 8, 8],
            "measured_gib": [float("nan"), float("nan"), 54.0],
        }
    ).set_index("loop")
    pd.DataFrame({"loop": ["a", "b"], "micro_batch": [4, 16], "measured_gib": [30.5, 70.0]}).to_csv(
        tmp_path / "gpu.csv", index=False
    )
    joined = training_memory.with_measured(count, tmp_path / "gpu.csv")
    assert joined.loc["a", "measured_gib"] == 30.5
    assert joined["measured_gib"].isna().loc["b"]  # measured at another micro-batch: not this count's
    assert joined.loc["calibration", "measured_gib"] == 54.0
    assert training_memory.with_measured(count, tmp_path / "absent.csv") is count
