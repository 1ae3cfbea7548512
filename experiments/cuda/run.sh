#!/usr/bin/env bash
# The CUDA checks and measurements of experiments/cuda/README.md, as one call of the device tool (a lent GPU
# machine: torch is installed there, hydra-core / omegaconf / antlr4 travel as wheels in .whl/).
#   bash experiments/cuda/run.sh [steps...]    steps: tests, train, bench (default: all three, in that order)
set -u
OUT=${OUT:-/tmp/pgan-cuda-out}
mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
# The console scripts (pgan-train, ...) for the tests that run the CLI: without them those 6 tests fail with
# FileNotFoundError (the measured run of README.md had only the PYTHONPATH above; this line came after it).
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . || echo "warning: pgan's console scripts not installed"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(), 'bf16', torch.cuda.is_bf16_supported())"
steps=${*:-tests train bench}
for step in $steps; do
  start=$(date +%s)
  case $step in
    tests)  # the training tests with the tiny run on the GPU (exact resume, rollbacks, augmentation, labels)
      PGAN_TEST_DEVICE=cuda timeout 170 python3 -m pytest -q -p no:cacheprovider tests/test_train.py \
        tests/test_reliability.py tests/test_augment.py tests/test_conditional_train.py \
        tests/test_lazy_regularisation.py >"$OUT/pytest_cuda.log" 2>&1
      tail -n 25 "$OUT/pytest_cuda.log" ;;
    train)  # `make train`'s run as a researcher would launch it on a GPU (device=auto: CUDA, bf16)
      /usr/bin/time -v timeout 120 python3 -m pgan.cli.train hydra.run.dir=/tmp/runs/default log.progress_bar=false \
        >"$OUT/train_default.log" 2>&1
      grep -E "Elapsed|Maximum resident|^stage|data at|done|rror" "$OUT/train_default.log" | tail -n 12
      python3 experiments/default_run/summarize.py /tmp/runs/default 2>&1 | tee "$OUT/train_default_summary.txt" ;;
    bench)  # the training iteration: the paper's widths and the small preset, eager; the paper's compiled
      timeout 90 python3 -m pgan.cli.bench device=cuda model=paper resolutions=[64,128,256] \
        >"$OUT/bench_paper.jsonl" 2>"$OUT/bench_paper.txt"
      timeout 80 python3 -m pgan.cli.bench device=cuda resolutions=[32,64,128,256] \
        >"$OUT/bench_small.jsonl" 2>"$OUT/bench_small.txt"
      timeout 130 python3 -m pgan.cli.bench device=cuda model=paper resolutions=[64,128,256] speed.compile=true \
        >"$OUT/bench_paper_compiled.jsonl" 2>"$OUT/bench_paper_compiled.txt"
      grep -v "^\s*$" "$OUT"/bench_*.txt | grep -E "\|" | tail -n 30 ;;
  esac
  echo "== $step: $(( $(date +%s) - start )) s"
done
