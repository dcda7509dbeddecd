#!/bin/sh
# tests/gpu/device.sh - run THERE, on the GPU machine the device tool lends,
# as ONE command from the repository root with .gpu/ carried (made here by
# tests/gpu/prepare.sh). Unpacks the carried Debian packages into
# /tmp/strata-root (never into /), finds the machine's CUDA 13 libraries
# (toolkit or PyTorch's nvidia-* wheels) and its driver's libcuda, then runs
# nvidia-smi, test_gpu (the table of `make test-gpu`) and bench/gpu/run.sh,
# writing everything to $OUT:
#   env.txt  nvidia-smi.txt  ldd.txt  test_gpu.txt  bench/bench.md  bench/*.log
#   summary.txt (test_gpu's table, the bench table, exit codes)
# The binaries run under the carried glibc's loader with an explicit library
# path, so the image's own glibc and missing -dev packages do not matter; if
# that cannot start them, the image's loader is tried with LD_LIBRARY_PATH.
# Whole run: test_gpu at most TEST_SECONDS (200), the bench at most what is
# left of TOTAL_SECONDS (520), well inside the tool's 600 s per command.
set -u
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/strata-gpu-out}
TOTAL=${TOTAL_SECONDS:-520}
TEST_SECONDS=${TEST_SECONDS:-200}
ROOT=/tmp/strata-root
start=$(date +%s)
mkdir -p "$OUT" "$ROOT"
exec 3>&1
log() { echo "device: $*" | tee -a "$OUT/summary.txt" >&3; }
: > "$OUT/summary.txt"

[ -d .gpu/bin ] && [ -d .gpu/debs ] || { log ".gpu/ missing: run tests/gpu/prepare.sh here and carry .gpu"; exit 1; }

# --- unpack the carried packages -------------------------------------------------
for deb in .gpu/debs/*.deb; do
    if command -v dpkg-deb > /dev/null 2>&1; then
        dpkg-deb -x "$deb" "$ROOT"
    else # an ar archive holding data.tar.{xz,gz,zst}
        python3 - "$deb" "$ROOT" <<'PY'
import io, sys, tarfile
data = open(sys.argv[1], "rb").read()
assert data[:8] == b"!<arch>\n", "not an ar archive"
pos = 8
while pos < len(data):
    name = data[pos:pos + 16].decode().strip().rstrip("/")
    size = int(data[pos + 48:pos + 58].decode().strip())
    body = data[pos + 60:pos + 60 + size]
    pos += 60 + size + (size & 1)
    if name.startswith("data.tar"):
        if name.endswith(".zst"):
            import zstandard
            body = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(body)).read()
            mode = "r:"
        else:
            mode = "r:*"
        tarfile.open(fileobj=io.BytesIO(body), mode=mode).extractall(sys.argv[2])
PY
    fi || log "could not unpack $deb"
done

# --- the machine's CUDA libraries and driver ------------------------------------
cuda_dirs=""
for d in ${CUDA_HOME:-/usr/local/cuda}/lib64 /usr/local/cuda-13*/lib64 /usr/local/cuda/targets/x86_64-linux/lib; do
    [ -e "$d/libcublas.so.13" ] && cuda_dirs="$cuda_dirs:$d"
done
# PyTorch's wheels: site-packages/nvidia/{cublas,cuda_runtime,...}/lib (cu13 may be nvidia/cu13/lib)
for d in $(python3 -c 'import os, nvidia; [print(os.path.join(p, s, "lib")) for p in nvidia.__path__ for s in sorted(os.listdir(p))]' 2>/dev/null); do
    ls "$d"/libcublas*.so.13 "$d"/libcudart.so.13 > /dev/null 2>&1 && cuda_dirs="$cuda_dirs:$d"
done
if [ -z "$cuda_dirs" ]; then
    for f in $(find /usr /opt /root /home -name 'libcublas.so.13*' 2>/dev/null | head -n 3) \
             $(find /usr /opt /root /home -name 'libcudart.so.13*' 2>/dev/null | head -n 3); do
        cuda_dirs="$cuda_dirs:$(dirname "$f")"
    done
fi
drv=$(ldconfig -p 2>/dev/null | awk '/libcuda\.so\.1 /{print $NF; exit}')
[ -n "$drv" ] || drv=$(find /usr/lib /usr/lib64 /usr/local/nvidia /usr/lib/x86_64-linux-gnu -name 'libcuda.so.1' 2>/dev/null | head -n 1)
drv_dir=${drv:+$(dirname "$drv")}
ours="$ROOT/lib/x86_64-linux-gnu:$ROOT/usr/lib/x86_64-linux-gnu:$ROOT/usr/lib/x86_64-linux-gnu/openblas-pthread"
LIBPATH="$ours${cuda_dirs}${drv_dir:+:$drv_dir}"
LOADER=$ROOT/lib64/ld-linux-x86-64.so.2
[ -x "$LOADER" ] || LOADER=$ROOT/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2

{
    echo "started $(date -u +%FT%TZ)"; uname -a; cat /etc/os-release 2>/dev/null | head -n 2
    ldd --version 2>&1 | head -n 1
    echo "CUDA library dirs:$cuda_dirs"; echo "driver: ${drv:-not found}"; echo "LIBPATH=$LIBPATH"
    python3 -c 'import torch; print("torch", torch.__version__, torch.version.cuda)' 2>&1
} > "$OUT/env.txt"
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || log "nvidia-smi failed (exit $?)"
head -n 12 "$OUT/nvidia-smi.txt" >&3

# --- how to start the binaries ------------------------------------------------------
# The carried loader first: test_gpu --bad-option exits 2 (usage) once every
# library resolved, before touching the GPU.
RUN=""
if [ -x "$LOADER" ]; then
    "$LOADER" --library-path "$LIBPATH" .gpu/bin/test_gpu --probe > /dev/null 2>"$OUT/probe.txt"
    [ $? -eq 2 ] && RUN="$LOADER --library-path $LIBPATH"
fi
if [ -z "$RUN" ]; then
    LD_LIBRARY_PATH="$(echo "$LIBPATH" | sed "s|$ROOT/lib/x86_64-linux-gnu:||")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    export LD_LIBRARY_PATH
    .gpu/bin/test_gpu --probe > /dev/null 2>>"$OUT/probe.txt"
    [ $? -eq 2 ] || { log "neither loader starts test_gpu: see probe.txt, ldd.txt"; ldd .gpu/bin/test_gpu > "$OUT/ldd.txt" 2>&1; exit 1; }
    log "running with the image's loader and LD_LIBRARY_PATH"
else
    log "running with the carried loader"
fi
$RUN --list .gpu/bin/test_gpu > "$OUT/ldd.txt" 2>&1 || ldd .gpu/bin/test_gpu > "$OUT/ldd.txt" 2>&1

# --- make test-gpu ---------------------------------------------------------------------
log "test_gpu (at most ${TEST_SECONDS}s)"
timeout -k 5 "$TEST_SECONDS" $RUN .gpu/bin/test_gpu > "$OUT/test_gpu.txt" 2> "$OUT/test_gpu.log"
test_rc=$?
sed -n '/^check /,$p' "$OUT/test_gpu.txt" | tee -a "$OUT/summary.txt" >&3
log "test_gpu exit $test_rc ($(( $(date +%s) - start ))s so far)"
[ $test_rc -eq 0 ] || tail -n 20 "$OUT/test_gpu.log" >&3

# --- the benchmark -----------------------------------------------------------------------
left=$(( TOTAL - ($(date +%s) - start) - 10 ))
if [ "$left" -gt 60 ]; then
    log "bench (at most ${left}s)"
    BENCH_SECONDS=$left BENCH_OUT="$OUT/bench" BENCH_GPU_BIN=.gpu/bin/bench_gpu BENCH_RUN="$RUN" \
        PYTHON=python3 bench/gpu/run.sh > "$OUT/bench.txt" 2>&1
    log "bench exit $?"
    cat "$OUT/bench/bench.md" 2>/dev/null | tee -a "$OUT/summary.txt" >&3
else
    log "bench skipped: ${left}s left"
fi
log "done in $(( $(date +%s) - start ))s; test_gpu exit $test_rc"
exit $test_rc
