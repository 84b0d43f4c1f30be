# Sourced by the device scripts of this folder: unpack the binaries, find cuBLAS, and a `run`
# helper that runs a command under a time limit, its stdout to $OUT/results.txt and the tail of
# its stderr to $OUT/log.txt, each under a header with the run's name and wall time.
set -u
export LOG=$OUT/log.txt RES=$OUT/results.txt
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
mkdir -p /tmp/b /tmp/o
for x in bench train; do [ -f .devbench/$x.xz ] || continue
  [ -x /tmp/b/$x ] || { xz -dc .devbench/$x.xz > /tmp/b/$x && chmod +x /tmp/b/$x; }
done
# libcublas: the system's (ldconfig), else the CUDA toolkit's or the pip wheel's.
CUBLAS=$(ldconfig -p | grep -o '/[^ ]*libcublas\.so[.0-9]*$' | head -1)
[ -z "$CUBLAS" ] && CUBLAS=$(find /usr/local /opt /usr/lib -name 'libcublas.so.*' 2>/dev/null | grep -v Lt | head -1)
[ -n "$CUBLAS" ] && export LD_LIBRARY_PATH=$(dirname "$CUBLAS"):${LD_LIBRARY_PATH:-}
# libcupti (cuBLAS runs on cubecl's stream, which CUPTI reports): the toolkit's, else any.
CUPTI=$(ldconfig -p | grep -o '/[^ ]*libcupti\.so[.0-9]*$' | head -1)
[ -z "$CUPTI" ] && CUPTI=$(find /usr/local /opt /usr/lib -name 'libcupti.so*' 2>/dev/null | head -1)
[ -n "$CUPTI" ] && export LD_LIBRARY_PATH=$(dirname "$CUPTI"):$LD_LIBRARY_PATH
run() { # name timeout cmd...
  local name=$1 t=$2; shift 2
  local s=$(date +%s%N)
  echo "== $name ($(date -u +%H:%M:%S)): $*" | tee -a $LOG >> $RES
  timeout $t "$@" > /tmp/o/$name.out 2> /tmp/o/$name.err
  local rc=$?
  echo "== $name rc=$rc wall_ms=$(( ($(date +%s%N) - s) / 1000000 ))" | tee -a $LOG >> $RES
  tail -c 2500 /tmp/o/$name.err >> $LOG; cat /tmp/o/$name.out >> $RES
}
