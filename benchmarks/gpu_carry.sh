#!/usr/bin/env bash
# gpu_suite.sh on a lent device machine that takes 64 MiB of files per call: what two calls carry,
# how they are received there, and how the outputs come home.
#
#   bash benchmarks/gpu_carry.sh pack [MODEL_GGUF] [DATA_DIR]   # here: -> .gpu/call1, .gpu/call2
#   bash benchmarks/gpu_carry.sh unpack .gpu/callN             # there, one call each, back to back
#   bash benchmarks/gpu_carry.sh run OUT                       # there, in the second call: the suite
#   bash benchmarks/gpu_carry.sh land TARBALL                  # here: its outputs into the repo
#
# Each call carries the repository (~14 MB) too, so the 98 MB GGUF goes in two parts (PART1_MB,
# default 46, with the task data and wheels; the rest in the second). `pack` needs the package
# registry for the wheels the device image lacks (ml-collections, gguf, tensorboardX; SKIP_WHEELS=1
# to leave them out) and the four task folders of DATA_DIR (default ../shared/cl_benchmark), 4 MB
# as tar.xz. `unpack` puts everything under $GPU_SUITE_HOME (default /tmp/lbcl_gpu) on the
# machine, which a warm machine keeps between calls. `run` runs gpu_suite.sh on it with
# SUITE_LIMIT (default 540 s: a call's 600 s less the joins and packing) and writes one tarball and
# the log to OUT (a device call brings back 8 files at most): the suite's outputs and the grid's
# records, which `land` puts in benchmarks/results/ and benchmarks/results/generative_cells_gpu/.
set -euo pipefail
cd "$(dirname "$0")/.."
HOME_DIR=${GPU_SUITE_HOME:-/tmp/lbcl_gpu}
PACK=${GPU_CARRY_DIR:-.gpu}  # where `pack` writes (ignored by git)
TASKS="TC/dbpedia TC/agnews SC/amazon SC/yelp"

case "${1:-}" in
  pack)
    model=${2:-$(python3 -c "from lbcl_jax.models import gguf; print(gguf.smollm2_gguf_path() or '')")}
    data=${3:-../shared/cl_benchmark}
    [ -f "$model" ] || { echo "error: MODEL=$model: no such file" >&2; exit 2; }
    for t in $TASKS; do
      [ -f "$data/$t/train.json" ] || { echo "error: DATA_DIR=$data: no $t/train.json" >&2; exit 2; }
    done
    cut=$(( ${PART1_MB:-46} * 1000000 ))
    rm -rf "$PACK.tmp" && mkdir -p "$PACK.tmp"/call1/parts "$PACK.tmp"/call2/parts "$PACK.tmp"/call1/whl
    head -c "$cut" "$model" > "$PACK.tmp"/call1/parts/smollm2.gguf.part00
    tail -c +$(( cut + 1 )) "$model" > "$PACK.tmp"/call2/parts/smollm2.gguf.part01
    # The archive holds cl_benchmark/<group>/<task>, whatever DATA_DIR's own folder is called.
    tar cJf "$PACK.tmp"/call1/data.tar.xz -C "$data" --transform 's,^,cl_benchmark/,' $TASKS
    if [ -z "${SKIP_WHEELS:-}" ]; then
      python3 -m pip download -q --no-deps --only-binary=:all: -d "$PACK.tmp"/call1/whl \
          ml-collections==1.1.0 gguf==0.19.0 tensorboardX==2.6.5
    fi
    # Each call carries the tracked tree too; a call over 64 MiB is refused by the device tool.
    repo=$(git ls-files -z | du -cb --files0-from=- | tail -1 | cut -f1)
    for c in call1 call2; do
      size=$(( repo + $(du -sb "$PACK.tmp"/$c | cut -f1) ))
      if [ "$size" -gt $(( 64 * 1048576 )) ]; then
        rm -rf "$PACK.tmp"
        echo "error: $c would carry $size bytes with the repository (over 64 MiB):" \
             "move PART1_MB=${PART1_MB:-46} (the first call also holds the data and wheels)" >&2
        exit 2
      fi
      echo "$c: $size bytes with the repository"
    done
    rm -rf "$PACK" && mv "$PACK.tmp" "$PACK"  # whole or not at all
    echo "device calls: carry $PACK/call1 with 'bash benchmarks/gpu_carry.sh unpack $PACK/call1';" \
         "then at once carry $PACK/call2 with 'bash benchmarks/gpu_carry.sh unpack $PACK/call2 &&" \
         "bash benchmarks/gpu_carry.sh run \$OUT'"
    ;;
  unpack)
    src=${2:?usage: gpu_carry.sh unpack .gpu/callN}
    mkdir -p "$HOME_DIR/parts" "$HOME_DIR/whl"
    cp "$src"/parts/* "$HOME_DIR/parts/"
    if [ -f "$src/data.tar.xz" ]; then tar xJf "$src/data.tar.xz" -C "$HOME_DIR"; fi
    if [ -d "$src/whl" ]; then cp "$src"/whl/* "$HOME_DIR/whl/" 2>/dev/null || true; fi
    ls -l "$HOME_DIR/parts"
    ;;
  run)
    out=${2:?usage: gpu_carry.sh run OUT}
    mkdir -p "$out" "$HOME_DIR/out"
    status=0
    SUITE_LIMIT=${SUITE_LIMIT:-540} DATA_DIR="$HOME_DIR/cl_benchmark" WHEELS="$HOME_DIR/whl" \
        PYTHONUNBUFFERED=1 \
        bash benchmarks/gpu_suite.sh "$HOME_DIR/parts" "$HOME_DIR/out" 2>&1 \
        | tee "$out/gpu_suite.log" || status=$?
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv >> "$out/gpu_suite.log" \
        2>&1 || true
    rm -rf "$HOME_DIR/out/generative_cells_gpu"
    cp -r benchmarks/results/generative_cells_gpu "$HOME_DIR/out/" 2>/dev/null || true
    tar czf "$out/gpu_suite_out.tgz" -C "$HOME_DIR/out" .
    exit "$status"
    ;;
  land)
    tarball=${2:?usage: gpu_carry.sh land TARBALL}
    tmp=$(mktemp -d)
    tar xzf "$tarball" -C "$tmp"
    # Records are added, never overwritten: a committed cell stays as it was.
    mkdir -p benchmarks/results/generative_cells_gpu
    if [ -d "$tmp/generative_cells_gpu" ]; then
      cp -n "$tmp"/generative_cells_gpu/*.json benchmarks/results/generative_cells_gpu/ 2>/dev/null \
          || true
      rm -rf "$tmp/generative_cells_gpu"
    fi
    find "$tmp" -maxdepth 1 -type f -exec cp {} benchmarks/results/ \;
    rm -rf "$tmp"
    # The report again, from every committed and landed record.
    python3 benchmarks/generative_cl.py --scale=gpu --report_only --orders=1,2,3 > /dev/null
    echo "GPU records: $(ls benchmarks/results/generative_cells_gpu | wc -l)"
    ;;
  *)
    echo "usage: bash benchmarks/gpu_carry.sh pack|unpack|run|land ... (see the file's head)" >&2
    exit 2
    ;;
esac
