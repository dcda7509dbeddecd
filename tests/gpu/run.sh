#!/bin/sh
# tests/gpu/run.sh BIN [ARGS...] - runs the GPU test program (make test-gpu /
# test-gpu-emu) and says plainly whether it passed, failed or was skipped
# because this machine has no GPU. Exit status: the program's (0 pass,
# 1 a check failed, 77 skipped: no GPU).
bin=$1
shift
"$bin" "$@"
rc=$?
case $rc in
0) echo "test-gpu: PASSED" ;;
77) echo "test-gpu: SKIPPED: no GPU on this machine (exit 77; nothing was tested)" ;;
*) echo "test-gpu: FAILED (exit $rc)" ;;
esac
exit $rc
