#!/bin/sh
# bench/profile.sh - where the time of a training step goes, by phase: perf samples (with call
# stacks) of bench/train_lm built with frame pointers, each sample put in the phase of the
# innermost function of its stack that names one, and the threads' idle time as what is left of
# threads x wall time once the samples are counted.
#
#   sh bench/profile.sh [dense|moe] [REPS]          (default: dense, 40 timed steps)
#
# Lines:
#   bench=train_lm ...                              the benchmark's own line
#   bench=profile config=C threads= steps_s= cpu_s= samples=
#   bench=profile config=C phase=P cpu_pct= wall_pct=
#       cpu_pct: share of the steps' CPU samples (setup excluded); wall_pct: share of threads
#       x wall time of the steps, so the wall_pct of the phases and of idle add up to 100
#   bench=profile config=C phase=idle wall_pct=     threads waiting (barriers, serial parts)
#   bench=profile config=C part=gemm_kernel cpu_pct= the GEMM's packing and micro-kernel, in
#       whichever phase they ran;  part=page_faults cpu_pct=  the kernel's page-fault handling
#       (the first touch of the buffers, in the two warm-up steps: hence REPS of 40)
# Phases (innermost named function first): attention (scores, softmax, weighted sum and their
# products), ffn (the FFN's GEMMs and SwiGLU: the expert bank, or the dense FFN, which is a
# bank of one expert), routing (router, top-k, assignment,
# combine, balance loss), norm (RMSNorm), cross_entropy (head softmax and loss), linear (the
# other products: QKV, output, dense FFN, LM head), optimizer (AdamW, clipping), zero_grad,
# model (embeddings, residuals, glue), omp_runtime (libgomp, where the stack names nothing
# else), kernel (system calls, scheduling), other. Setup (weight init) is left out.
# perf is Debian's linux-perf; where it is missing or may not sample
# (kernel.perf_event_paranoid), one line says so and the script exits 0.
set -u
HERE=$(dirname "$0")
ROOT=$HERE/..
CONFIG=${1:-dense}
REPS=${2:-40}
FREQ=${PROFILE_FREQ:-1000}
CC=${CC:-cc}
if ! command -v perf >/dev/null 2>&1; then
    echo "bench=profile skipped=\"perf is missing (Debian: linux-perf)\""
    exit 0
fi
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
# the benchmark's own flags plus frame pointers, so that perf can walk the stacks
if ! $CC -std=c99 -O3 -ffp-contract=fast -march=native -fopenmp -fno-omit-frame-pointer -I"$ROOT" -I"$ROOT/examples" \
    "$ROOT/bench/train_lm.c" -o "$dir/train_lm" -lm; then
    echo "bench=profile error=\"bench/train_lm.c did not build\"" >&2
    exit 2
fi
if ! perf record -q -g -F "$FREQ" -o "$dir/perf.data" "$dir/train_lm" --reps "$REPS" "$CONFIG" >"$dir/out" 2>"$dir/err"; then
    echo "bench=profile skipped=\"perf record failed: $(head -n 1 "$dir/err")\""
    exit 0
fi
cat "$dir/out"
total=$(perf report -i "$dir/perf.data" --stdio --header-only 2>/dev/null | awk '/Event count/ { print $NF }')
[ -n "$total" ] || total=$(perf report -i "$dir/perf.data" --stdio 2>/dev/null | awk '/^# Event count/ { print $NF; exit }')
perf script -i "$dir/perf.data" -F tid,ip,sym 2>/dev/null | awk -v config="$CONFIG" -v total="$total" \
    -v line="$(grep '^bench=train_lm' "$dir/out")" '
function val(s, k,   a, n, i) {
    n = split(s, a, " ")
    for (i = 1; i <= n; i++) if (index(a[i], k "=") == 1) return substr(a[i], length(k) + 2)
    return ""
}
function named(f) { # the phase a function names, or ""
    if (f ~ /init_weights|^__cos|^__sin|_log_fma|^__ieee754_log|moe_rng/) return "setup"
    if (f ~ /^moe_attention_|^moe__att/) return "attention"
    if (f ~ /^moe_experts_|^moe__experts|^moe__expert_|swiglu/) return "ffn"
    if (f ~ /^moe_rmsnorm_/) return "norm"
    if (f ~ /crossentropy|cross_entropy/) return "cross_entropy"
    if (f ~ /adamw|clip_grad|grad_norm/) return "optimizer"
    if (f ~ /zero_grad/) return "zero_grad"
    if (f ~ /^moe_router|^moe__router|topk|^moe_combine|^moe_layer_|^moe__layer|route|balance|dispatch|assign/) return "routing"
    if (f ~ /^moe_matmul_|^moe__gemm_parallel/) return "linear"
    if (f ~ /^moe_model_|^moe__block|^moe__model|embed|residual/) return "model"
    if (f ~ /^(main|bench_config)$/) return "top"
    return ""
}
function flush(   i, p, f, kern, gemm, fault) {
    if (nf == 0) return
    p = ""; kern = 0; gemm = 0; fault = 0
    for (i = 1; i <= nf; i++) {
        f = fr[i]; sub(/\._omp_fn.*$/, "", f); sub(/\.(constprop|part|isra|cold).*$/, "", f)
        if (i == 1 && (f ~ /gemm_micro|gemm_packed|pack_b_panels|pack_a/)) gemm = 1
        if (f ~ /exc_page_fault/) fault = 1
        if (i == 1 && kfr[1]) kern = 1
        p = named(f)
        if (p != "") break
    }
    if (p == "top") p = (fr[1] ~ /memset|memmove|memcpy/) ? "zero_grad" : "model"
    if (p == "") p = (fr[1] ~ /^0x|unknown/ || lib) ? "omp_runtime" : kern ? "kernel" : "other"
    n_all++
    if (p == "setup") { nf = 0; return }
    share[p]++; n_step++
    if (gemm) n_gemm++
    if (fault) n_fault++
    nf = 0
}
/^[ \t]*[0-9]+[ \t]*$/ { flush(); lib = 0; next }
/^[ \t]+[0-9a-f]+ / {
    nf++; fr[nf] = $2; kfr[nf] = ($1 ~ /^ffffffff/)
    if ($0 ~ /GOMP_|gomp/) lib = 1
    next
}
/^$/ { flush() }
END {
    flush()
    threads = val(line, "threads"); steps = val(line, "steps_s")
    if (threads == "" || steps == "" || n_all == 0) { print "bench=profile error=\"no train_lm line or no samples\""; exit 1 }
    cpu = total / 1e9 * n_step / n_all
    avail = threads * steps
    printf("bench=profile config=%s threads=%d steps_s=%.3f cpu_s=%.3f samples=%d\n", config, threads, steps, cpu, n_step)
    n = split("attention ffn routing norm cross_entropy linear optimizer zero_grad model omp_runtime kernel other", order, " ")
    for (i = 1; i <= n; i++) {
        p = order[i]
        if (!(p in share)) continue
        printf("bench=profile config=%s phase=%s cpu_pct=%.1f wall_pct=%.1f\n", config, p, 100 * share[p] / n_step,
               100 * share[p] / n_step * cpu / avail)
    }
    printf("bench=profile config=%s phase=idle wall_pct=%.1f\n", config, avail > cpu ? 100 * (avail - cpu) / avail : 0)
    printf("bench=profile config=%s part=gemm_kernel cpu_pct=%.1f\n", config, 100 * n_gemm / n_step)
    printf("bench=profile config=%s part=page_faults cpu_pct=%.1f\n", config, 100 * n_fault / n_step)
}'
