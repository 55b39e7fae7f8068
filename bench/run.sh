#!/bin/sh
# bench/run.sh - runs the benchmark binaries given as arguments (make bench passes them all),
# the PyTorch peer (bench/torch_moe_layer.py, skipped with a note when torch is missing), and
# prints the ratios measured in this run:
#   ratio=ours_vs_torch config=C pass=fwd|fwd_bwd value=V min= max= rounds=R
#       MoE layer tokens/s, both tuned; V the median over R rounds (BENCH_ROUNDS) of the
#       ratio of one round
#   ratio=ours_vs_torch_default config=C pass=fwd|fwd_bwd value=V  both out of the box (one run)
#   ratio=layer_over_gemms config=C value=V min= max= rounds=R
#       with a BLAS=1 build of moe_layer: the layer's fwd+bwd time over its expert GEMMs
#       alone through OpenBLAS (bench=moe_layer_blas), median over the rounds
#   ratio=ours_vs_torch bench=train_lm config=dense|moe value=V min= max= rounds=R
#   ratio=ours_vs_torch_default bench=train_lm config=dense|moe value=V min= max= rounds=R
#       training tokens/s; V is the median over R rounds (BENCH_ROUNDS, default 3) of the ratio
#       of one round, min and max its range
#   ratio=ours_vs_torch bench=generate config=demo|d256 batch=1|16 value=V min= max= rounds=R
#       generation tokens/s on the KV cache (bench/generate.c, bench/torch_generate.py), tuned
# and bench/moe_layer's router-family lines (bench=moe_layer_router ... overhead_pct=, top-k
# and the family timed in alternation inside one process).
#
# Runtime settings. "tuned" (the headline): OMP_WAIT_POLICY=PASSIVE, and on AVX-512 machines
# OPENBLAS_CORETYPE=SkylakeX, for our binaries and for the peer alike (the peer also calls
# torch.set_num_threads(2)). On a shared or virtual machine, spinning OpenMP threads that
# wait at a barrier compete with whatever else runs there, which can cost several times the
# run time; PASSIVE makes them sleep instead. "default": none of those variables.
# Layer and training benchmarks alternate ours and the peer per config, so each ratio compares
# runs made seconds apart on this (often busy) machine.
PY=${PYTHON:-/usr/bin/python3}
ROUNDS=${BENCH_ROUNDS:-3} # moe_layer, train_lm, generate: rounds of (ours, peer) per config
HERE=$(dirname "$0")
log=$(mktemp)
trap 'rm -f "$log"' EXIT

AVX512=0
grep -q ' avx512f' /proc/cpuinfo 2>/dev/null && AVX512=1
tuned() { # run "$@" with the tuned variables
    if [ "$AVX512" = 1 ]; then
        env OMP_WAIT_POLICY=PASSIVE OPENBLAS_CORETYPE=SkylakeX "$@"
    else
        env OMP_WAIT_POLICY=PASSIVE "$@"
    fi
}
plain() { env -u OMP_WAIT_POLICY -u OPENBLAS_CORETYPE -u OMP_NUM_THREADS "$@"; }

TORCH=0
if [ -x "$PY" ] && "$PY" -c 'import torch' >/dev/null 2>&1; then
    TORCH=1
else
    echo "note: PyTorch not found ($PY -c 'import torch' failed): skipping bench/torch_moe_layer.py, bench/torch_train_lm.py"
fi
echo "bench=run_info tuned=\"OMP_WAIT_POLICY=PASSIVE$([ "$AVX512" = 1 ] && echo ' OPENBLAS_CORETYPE=SkylakeX')\" OMP_NUM_THREADS=${OMP_NUM_THREADS:-unset} nproc=$(nproc 2>/dev/null || echo '?') torch=$TORCH"

layer_done=0
for b in "$@"; do
    case $(basename "$b") in
    moe_layer)
        layer_done=1
        # ROUNDS rounds of (ours, the peer) per config, tuned; then once out of the box
        r=1
        while [ "$r" -le "$ROUNDS" ]; do
            for c in small medium fine; do
                tuned "$b" "$c" | sed "s/\$/ round=$r/" | tee -a "$log"
                [ "$TORCH" = 1 ] && tuned "$PY" "$HERE/torch_moe_layer.py" "$c" --setting=tuned | sed "s/\$/ round=$r/" | tee -a "$log"
            done
            r=$((r + 1))
        done
        for c in small medium fine; do
            plain "$b" "$c" | sed 's/^bench=moe_layer /bench=moe_layer setting=default /' | tee -a "$log"
            [ "$TORCH" = 1 ] && plain "$PY" "$HERE/torch_moe_layer.py" "$c" --setting=default | tee -a "$log"
        done
        # router families against top-k (issue 4), tuned: bench=moe_layer_router ... overhead_pct=
        tuned "$b" --routers | tee -a "$log"
        ;;
    train_lm)
        # ROUNDS rounds, each ours then the peer per config; a ratio per round, then the
        # median over rounds (PyTorch's step time alone varies by up to 40% run to run here)
        r=1
        while [ "$r" -le "$ROUNDS" ]; do
            for c in dense moe; do
                tuned "$b" "$c" | sed "s/\$/ round=$r/" | tee -a "$log"
                [ "$TORCH" = 1 ] && tuned "$PY" "$HERE/torch_train_lm.py" "$c" --setting=tuned | sed "s/\$/ round=$r/" | tee -a "$log"
            done
            for c in dense moe; do
                plain "$b" "$c" | sed "s/^bench=train_lm /bench=train_lm setting=default /; s/\$/ round=$r/" | tee -a "$log"
                [ "$TORCH" = 1 ] && plain "$PY" "$HERE/torch_train_lm.py" "$c" --setting=default | sed "s/\$/ round=$r/" | tee -a "$log"
            done
            r=$((r + 1))
        done
        ;;
    generate)
        # ROUNDS rounds of (ours, the peer) per config, tuned: tokens/s at batch 1 and 16 and
        # the time of one token against the context length
        r=1
        while [ "$r" -le "$ROUNDS" ]; do
            for c in demo d256; do
                tuned "$b" "$c" | sed "s/\$/ round=$r/" | tee -a "$log"
                [ "$TORCH" = 1 ] && tuned "$PY" "$HERE/torch_generate.py" "$c" --setting=tuned | sed "s/\$/ round=$r/" | tee -a "$log"
            done
            r=$((r + 1))
        done
        ;;
    *)
        tuned "$b" | tee -a "$log"
        ;;
    esac
done
if [ "$layer_done" = 0 ] && [ "$TORCH" = 1 ]; then
    tuned "$PY" "$HERE/torch_moe_layer.py" --setting=tuned | tee -a "$log"
fi

# ratios of tokens/s: ours over the peer, same setting, same run
awk '
function val(line, key,   n, i, kv, a) {
    n = split(line, a, " ")
    for (i = 1; i <= n; i++) { split(a[i], kv, "="); if (kv[1] == key) return kv[2] }
    return ""
}
/^bench=moe_layer / {
    s = (val($0, "setting") == "default") ? "default" : "tuned"
    if (s == "tuned") layer_ours[val($0, "config") "," val($0, "pass") "," val($0, "round")] = val($0, "tokens_per_s")
    else ours[s "," val($0, "config") "," val($0, "pass")] = val($0, "tokens_per_s")
}
/^bench=torch_moe_layer / {
    if (val($0, "setting") == "tuned") layer_theirs[val($0, "config") "," val($0, "pass") "," val($0, "round")] = val($0, "tokens_per_s")
    else theirs[val($0, "setting") "," val($0, "config") "," val($0, "pass")] = val($0, "tokens_per_s")
}
/^bench=moe_layer_blas / {
    blas[val($0, "config") "," val($0, "round")] = val($0, "layer_over_gemms")
}
/^bench=train_lm / {
    s = (val($0, "setting") == "default") ? "default" : "tuned"
    lm_ours[s "," val($0, "config") "," val($0, "round")] = val($0, "tokens_per_s")
}
/^bench=generate / && val($0, "path") == "" {
    gen_ours[val($0, "config") "," val($0, "batch") "," val($0, "round")] = val($0, "tokens_per_s")
}
/^bench=torch_generate / {
    gen_theirs[val($0, "config") "," val($0, "batch") "," val($0, "round")] = val($0, "tokens_per_s")
}
/^bench=torch_train_lm / {
    lm_theirs[val($0, "setting") "," val($0, "config") "," val($0, "round")] = val($0, "tokens_per_s")
}
# q[1..n] = ours[key "," r] / theirs[key "," r] for the rounds r = 1, 2, ...; returns n
function per_round(ours, theirs, key,   r, k, n) {
    n = 0
    for (r = 1; (key "," r) in ours; r++) {
        k = key "," r
        if ((k in theirs) && theirs[k] > 0) q[++n] = ours[k] / theirs[k]
    }
    return n
}
# sorts q[1..n]; sets med, lo, hi
function spread(n,   i, j, t) {
    for (i = 2; i <= n; i++) for (j = i; j > 1 && q[j - 1] > q[j]; j--) { t = q[j]; q[j] = q[j - 1]; q[j - 1] = t }
    med = (n % 2) ? q[(n + 1) / 2] : (q[n / 2] + q[n / 2 + 1]) / 2
    lo = q[1]; hi = q[n]
}
END {
    split("small medium fine", cs, " "); split("fwd fwd_bwd", ps, " "); split("tuned default", ss, " ")
    for (ci = 1; ci <= 3; ci++) for (pi = 1; pi <= 2; pi++) {
        if ((n = per_round(layer_ours, layer_theirs, cs[ci] "," ps[pi])) == 0) continue
        spread(n)
        printf("ratio=ours_vs_torch config=%s pass=%s value=%.3f min=%.3f max=%.3f rounds=%d\n", cs[ci], ps[pi], med, lo, hi, n)
    }
    for (ci = 1; ci <= 3; ci++) for (pi = 1; pi <= 2; pi++) {
        k = "default," cs[ci] "," ps[pi]
        if ((k in ours) && (k in theirs) && theirs[k] > 0)
            printf("ratio=ours_vs_torch_default config=%s pass=%s value=%.3f\n", cs[ci], ps[pi], ours[k] / theirs[k])
    }
    for (ci = 1; ci <= 3; ci++) {
        n = 0
        for (r = 1; (cs[ci] "," r) in blas; r++) q[++n] = blas[cs[ci] "," r]
        if (n == 0) continue
        spread(n)
        printf("ratio=layer_over_gemms config=%s value=%.3f min=%.3f max=%.3f rounds=%d\n", cs[ci], med, lo, hi, n)
    }
    split("dense moe", ms, " ")
    for (si = 1; si <= 2; si++) for (ci = 1; ci <= 2; ci++) {
        if ((n = per_round(lm_ours, lm_theirs, ss[si] "," ms[ci])) == 0) continue
        spread(n)
        printf("ratio=ours_vs_torch%s bench=train_lm config=%s value=%.3f min=%.3f max=%.3f rounds=%d\n",
               ss[si] == "tuned" ? "" : "_default", ms[ci], med, lo, hi, n)
    }
    split("demo d256", gc, " "); split("1 16", gb, " ")
    for (ci = 1; ci <= 2; ci++) for (bi = 1; bi <= 2; bi++) {
        if ((n = per_round(gen_ours, gen_theirs, gc[ci] "," gb[bi])) == 0) continue
        spread(n)
        printf("ratio=ours_vs_torch bench=generate config=%s batch=%s value=%.3f min=%.3f max=%.3f rounds=%d\n",
               gc[ci], gb[bi], med, lo, hi, n)
    }
}' "$log"
