#!/bin/sh
# tests/gpu/prepare.sh - run HERE (the build machine, Debian, nvcc): builds
# the GPU test and bench against the real CUDA objects in build-gpu/, copies
# the two binaries and the Debian packages of every shared library they need
# (glibc and its loader included, so that they run on an image whose own
# glibc or libraries differ) into .gpu/ (ignored through .git/info/exclude),
# and prints the one device-tool call that runs tests/gpu/device.sh there.
# CUDA's own libraries (cudart, cuBLAS, cuBLASLt: hundreds of MB) are NOT
# carried: device.sh finds the GPU machine's (CUDA 13 toolkit or PyTorch's
# nvidia-* wheels). Needs network for apt-get download.
set -eu
cd "$(dirname "$0")/../.."
BUILD=build-gpu
[ -x "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc" ] || { echo "prepare: no nvcc" >&2; exit 1; }
make --no-print-directory BUILD=$BUILD $BUILD/gpu/test_gpu $BUILD/gpu/bench_gpu
rm -rf .gpu
mkdir -p .gpu/bin .gpu/debs
cp $BUILD/gpu/test_gpu $BUILD/gpu/bench_gpu .gpu/bin/
grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude

# The packages that own each library the binaries load (not CUDA's, which the
# device has), plus libc6 for the loader itself.
pkgs=libc6
for lib in $(ldd .gpu/bin/test_gpu .gpu/bin/bench_gpu | awk '$2 == "=>" && $3 ~ /^\// {print $3}' | sort -u); do
    case $lib in
    */cuda*/*|*libcuda.so*|*libcublas*|*libcudart*) continue ;;
    esac
    # dpkg knows the path as packaged: /lib/... or /usr/lib/... (usrmerge)
    pkg=""
    for p in "$lib" "$(readlink -f "$lib")" "/usr$lib" "${lib#/usr}"; do
        [ -n "$pkg" ] || pkg=$(dpkg -S "$p" 2>/dev/null | head -n 1 | cut -d: -f1)
    done
    [ -n "$pkg" ] || { echo "prepare: no package owns $lib" >&2; exit 1; }
    pkgs="$pkgs $pkg"
done
pkgs=$(echo $pkgs | tr ' ' '\n' | sort -u | tr '\n' ' ')
echo "prepare: packages: $pkgs"
(cd .gpu/debs && apt-get download $pkgs)
ldd .gpu/bin/test_gpu .gpu/bin/bench_gpu > .gpu/ldd-here.txt
du -sh .gpu
size=$(du -sm .gpu | cut -f1)
[ "$size" -lt 60 ] || { echo "prepare: .gpu is ${size} MiB, over what the device tool carries" >&2; exit 1; }
cat <<MSG

prepare: ready. Run on the GPU machine in ONE call of the device tool:
  command:   tests/gpu/device.sh
  carry:     [".gpu"]
  timeout_s: 560
Everything lands in \$OUT: nvidia-smi.txt, test_gpu.txt (the table), bench/bench.md,
bench/*.log, summary.txt.
MSG
