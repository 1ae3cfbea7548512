#!/usr/bin/env bash
# The CUDA checks and measurements of experiments/cuda/README.md, as one call of the device tool (a lent GPU
# machine: torch is installed there, hydra-core / omegaconf / antlr4 travel as wheels in .whl/).
#   bash experiments/cuda/run.sh [steps...]    steps: tests, train, bench, double_backward (default: bench, about 5 minutes)
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
steps=${*:-bench}
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
    bench)  # issue 18: the paper model at 256 px (eager / compiled / approx penalty / CUDA graphs, batch 16-64),
            # the small model at 32 px, the prepared store's rate (loader_img_per_s) and the paper schedule's
            # projected wall-clock. About 5 minutes; every call has its own timeout, the table is summarize.py's.
      bench="python3 -m pgan.cli.bench device=cuda warmup_steps=3 steps=8 repeats=3 loader_batches=10 data.num_workers=8"
      paper="$bench model=paper resolutions=[256] alphas=[1.0]"
      run() { local name=$1 limit=$2; shift 2; timeout "$limit" "$@" >"$OUT/bench_$name.jsonl" 2>"$OUT/bench_$name.txt" \
              || echo "bench $name: exit $?"; }
      # In order of what matters; compiling the paper model took 64 s on an H100 (2026-11-22), so the sweep over
      # batch sizes is eager and the compiled step is timed at batch 64 only (about 5 min up to the projection).
      # The baseline: the exact penalties on every step (as in the 67.8 img/s of 2026-11-22); then rpgan's
      # default since 2026-12-06, the exact penalties every 4th step. The rows after it keep that default.
      run paper256_eager_b16 40 $paper batch_size=16 loss.penalty_every=1
      run paper256_lazy4_b16 40 $paper batch_size=16
      for b in 16 32 64; do
        run paper256_approx_b$b 40 $paper batch_size=$b loss.penalty_mode=approx
      done
      run paper256_approx_graphs_b64 120 $paper batch_size=64 loss.penalty_mode=approx speed.compile=true \
        speed.compile_mode=reduce-overhead
      run small32 30 $bench resolutions=[32] alphas=[1.0] batch_size=16
      run paper_projection 60 $bench model=paper resolutions=[4,8,16,32,64,128,256] batch_size=16 \
        loss.penalty_mode=approx project=paper
      # If the call's time allows: the compiled step without CUDA graphs, to tell the two apart.
      run paper256_approx_compiled_b64 110 $paper batch_size=64 loss.penalty_mode=approx speed.compile=true
      # ... and the small model at 32 px with CUDA graphs: eager it is launch-bound (497 img/s on the H100, whatever
      # the resolution), which is what make train's run on a GPU spends its time on.
      run small32_graphs 90 $bench resolutions=[32] alphas=[1.0] batch_size=16 speed.compile=true \
        speed.compile_mode=reduce-overhead
      python3 experiments/cuda/summarize.py "$OUT" | tee "$OUT/bench_summary.md" ;;
    double_backward)  # pgan's convolution (pgan.layers.same_conv2d) against PyTorch's own double backward, in turns:
                      # the paper model's R1 pass on D and its iteration at 256 px (experiments/throughput). ~2 min
      timeout 170 python3 experiments/throughput/double_backward.py --device cuda --model paper --resolutions 256 \
        --batch 32 --variants every_step default --warmup 3 --rounds 5 --steps 4 >"$OUT/double_backward.md" \
        2>"$OUT/double_backward.txt" || echo "double_backward: exit $?"
      cat "$OUT/double_backward.md" ;;
  esac
  echo "== $step: $(( $(date +%s) - start )) s"
done
