#!/usr/bin/env bash
# Session 3, call 3, one GPU, Mamba-130m bf16. .carry/baseline = session start (7f428a2),
# .carry/prev = the tree of call 2 (no barrier before the dB/dC partial sums). GPU checks;
# one layer's scan forward+backward for backward-kernel variants; Nsight Compute on the
# default kernels (registers, occupancy, throughput, stalls); the training step (remat
# scan, layers written out) for prev against the tree, profiled; decode B=1 and B=32 for
# the session-start code against the tree (per-layer weights prepared once), profiled.
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi -L
B="timeout 240 python3 scripts/benchmark.py --warmup 2 --repeats 5"
V=pallas,pallas:bwd_recompute_decays=true,pallas:bwd_num_warps=2,pallas:bwd_recompute_decays=true:bwd_block_e=16:bwd_num_warps=2
PYTHONPATH=. $B --workloads check,scan --check-impls pallas,pallas:bwd_recompute_decays=true --impls $V \
  --scan-modes fwd+bwd --scan-repeats 10 --out "$OUT/scan-variants.json" 2>&1 | grep -E "CHECK|^scan|rror"
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
PYTHONPATH=. timeout 200 $NCU --clock-control none --kernel-name regex:"(forward|backward)_kernel" --launch-count 2 \
  --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats --section MemoryWorkloadAnalysis \
  python3 scripts/benchmark.py --workloads scan --impls pallas --scan-modes fwd+bwd --scan-repeats 1 \
  --warmup 1 --repeats 1 > "$OUT/ncu-scan.txt" 2>&1; echo "ncu rc $?"
grep -E "^  [a-z_]+kernel|Registers Per|Achieved Occupancy|Theoretical Occupancy|Block Limit|Duration|Memory Throughput|Compute \(SM\) Th|Warp Cycles Per Issued|Local Memory" "$OUT/ncu-scan.txt" | head -40
T="--workloads train --train-impls pallas --remat scan --scan-layers false"
PYTHONPATH=.carry/prev $B $T --out "$OUT/train-prev.json" 2>&1 | grep -E "^train|rror"
PYTHONPATH=. $B $T --profile 16 --out "$OUT/train-tree.json" 2>&1 | grep -E "^train|PROFILE|rror"
(cd .carry/baseline && PYTHONPATH=. timeout 240 python3 scripts/benchmark.py --warmup 2 --repeats 5 --workloads decode \
  --train-impls pallas --decode-batch 1,32 --out "$OUT/decode-baseline.json" 2>&1 | grep -E "^decode|rror")
PYTHONPATH=. $B --workloads decode --train-impls pallas --decode-batch 1,32 --profile 12 --out "$OUT/decode-tree.json" 2>&1 \
  | grep -E "^decode|PROFILE|rror"
