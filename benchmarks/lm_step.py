"""Training-step throughput of vq-ar's compact language model (`medsyn.training.vq_ar.make_lm` with
`LM_CONFIG`: a GPT-2 over `[prompt][clues]<boi>[codes]<eoi>`) against the same GPT-2 with what
`GPT2Config` has by default: attention dropout 0.1 and the tanh GELU written as element-wise ops
("gelu_new"). With dropout, torch's scaled-dot-product attention on the CPU leaves its fused kernel
for the plain one; medsyn's configuration has none, and takes the same GELU as torch's fused op.

Random token ids of the `default` profile's sequence length (a 48-token prompt, 8 clues, 16 x 16
codes and the markers: 315), AdamW, the loss on every position; the same ids for both variants.

    python -m benchmarks.lm_step --scale cpu   # 2 cores: the default profile's batch
    python -m benchmarks.lm_step --scale gpu
"""

import time

import torch

from benchmarks.common import arguments, device_for, finish, peak_memory_gib, reset_peak_memory, row, synchronize

SETTINGS = {
    "gpu": {"batch": 64, "length": 315, "vocabulary": 1400, "warmup": 3, "steps": 10},
    "cpu": {"batch": 32, "length": 315, "vocabulary": 1400, "warmup": 2, "steps": 5},
}


def sequences_per_second(config: dict, ids: torch.Tensor, warmup: int, steps: int, device: torch.device) -> float:
    from medsyn.training.common import adamw
    from medsyn.training.vq_ar import make_lm

    torch.manual_seed(0)
    special = {"bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 2}
    model = make_lm(int(ids.max()) + 1, ids.shape[1], special, config).to(device).train()
    optimizer = adamw(list(model.parameters()), lr=1e-3)
    for step in range(warmup + steps):
        if step == warmup:
            synchronize(device)
            began = time.perf_counter()
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    synchronize(device)
    return steps * len(ids) / (time.perf_counter() - began)


def measure(args, rows: list | None = None) -> list[dict]:
    """Append one row per variant to `rows`, the baseline first; return them."""
    from medsyn.training.vq_ar import LM_CONFIG

    device = device_for(args.scale)
    s = SETTINGS[args.scale]
    ids = torch.randint(0, s["vocabulary"], (s["batch"], s["length"]), generator=torch.Generator().manual_seed(0))
    ids = ids.to(device)
    model = f"compact GPT-2 ({LM_CONFIG['n_layer']} layers × {LM_CONFIG['n_embd']}), {s['length']} tokens"
    rows = [] if rows is None else rows
    variants = [
        (
            "baseline: GPT2Config's defaults (attention dropout 0.1, gelu_new)",
            {"attn_pdrop": 0.1, "activation_function": "gelu_new"},
        ),
        ("no attention dropout", {"activation_function": "gelu_new"}),
        ("medsyn: LM_CONFIG (+ fused tanh GELU)", None),
    ]
    for variant, config in variants:
        reset_peak_memory(device)
        rate = sequences_per_second(config, ids, s["warmup"], s["steps"], device)
        print(f"  {variant}: {rate:.3g} sequences/s", flush=True)
        rows.append(
            row(
                "lm step",
                model,
                variant,
                batch=s["batch"],
                throughput=rate,
                unit="sequences/s",
                peak_memory_gib=peak_memory_gib(device) if device.type == "cuda" else None,
                note=f"{s['steps']} timed steps after {s['warmup']}, {torch.get_num_threads()} CPU threads",
            )
        )
    return rows


if __name__ == "__main__":
    arguments_ = arguments(__doc__.splitlines()[0])
    finish(measure(arguments_), arguments_, {"settings": SETTINGS[arguments_.scale]})
