#!/bin/sh
# The main demo (make demo): a small MoE language model and a dense one with the same active
# parameters train on the same bytes of the Brown corpus with the same recipe; then a comparison
# table, the plots and a sample from each. STEPS=n shortens or lengthens it (default 900 steps
# per model). The full logs go to out/demo_moe.log and out/demo_dense.log; the terminal gets a
# progress line per log interval with the time left.
set -eu
cd "$(dirname "$0")/.."
B=${BUILD:-build}
# spinning OpenMP threads stall on shared or virtual machines; sleeping ones cost nothing here
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
STEPS=${STEPS:-900}
BATCH=16
SEQ=128
mkdir -p out
[ -f data/brown/train/news.txt ] || sh examples/data/brown.sh
# The recipe (both models): rotary positions, peak lr 4e-3 after 100 warm-up steps, cosine to
# 1e-4 (the MoE model, validation bits/byte at step 200: learned positions 3.57, rotary 2.91; at
# step 600 of 1100, rotary: lr 4e-3 2.53, lr 7e-3 2.61). 900 steps of 16 x 128 bytes: 1.8M bytes.
common="--steps $STEPS --d 128 --layers 4 --heads 4 --pos rope --seq $SEQ --batch $BATCH
        --lr 4e-3 --warmup 100 --min-lr 1e-4 --eval-every 250 --eval-batches 4 --log-every 50"

# train NAME LABEL INDEX FLAGS...: the full log into out/demo_NAME.log; on the terminal the
# table, one progress line per log interval (the time left for this model and for the demo, the
# model(s) after this one taken to run at this one's speed), the validation lines and the end
train() {
    name=$1 label=$2 i=$3
    shift 3
    rm -f "out/demo_$name.failed"
    { "$B/examples/train_lm" $common --name "$name" "$@" || echo failed >"out/demo_$name.failed"; } 2>&1 |
        tee "out/demo_$name.log" |
        awk -v label="[$i/2 $label]" -v i="$i" -v n=2 -v steps="$STEPS" -v bt=$((BATCH * SEQ)) '
            function mmss(s) { s = int(s + 0.5); return sprintf("%d:%02d", int(s / 60), s % 60) }
            function val(k,   j, kv) { for (j = 1; j <= NF; j++) { split($j, kv, "="); if (kv[1] == k) return kv[2] } return "" }
            /^step=/ {
                step = val("step"); tok = val("tok_s"); eta = val("eta_s")
                total = eta + (tok > 0 ? (n - i) * steps * bt / tok : 0)
                printf "%s step %5d/%d  train %.3f bits/byte  %6.0f tok/s  left: %s this model, %s the demo\n",
                       label, step, steps, val("bpb"), tok, mmss(eta), mmss(total)
                fflush(); next
            }
            /^eval / { printf "%s step %5d/%d  validation %.4f bits/byte\n", label, val("step"), steps, val("val_bpb"); fflush(); next }
            /^load / { next }
            { print; fflush() }'
    [ ! -f "out/demo_$name.failed" ]
}

echo "== 1 of 2, MoE: 8 experts of width 256, top-2 (about the active size of one 512-wide FFN)"
train moe MoE 1 --experts 8 --top-k 2 --expert-ff 256 --router mixtral
echo
echo "== 2 of 2, dense: one SwiGLU FFN of width 512"
train dense dense 2 --experts 0 --d-ff 512
"$B/examples/plot_csv" out/demo_val_bpb.png --x step --y val_bpb --title "validation bits per byte" \
    out/moe.csv=MoE out/dense.csv=dense
"$B/examples/plot_csv" out/demo_train_bpb.png --x step --y train_loss --title "training loss (nats per byte)" \
    out/moe.csv=MoE out/dense.csv=dense
echo
echo "== comparison ($STEPS steps each, same data order)"
printf '%-6s %-9s %-13s %-13s %-8s\n' model val_bpb params_total params_active tok_s
for m in moe dense; do
    grep '^result' "out/demo_$m.log" | sed 's/[a-z_]*=/ /g' |
        awk -v m=$m '{ printf "%-6s %-9s %-13s %-13s %-8s\n", m, $3, $5, $6, $7 }'
done
echo
echo "plots: out/demo_val_bpb.png out/demo_train_bpb.png out/moe_load.png (expert load per genre) out/moe_loss.png out/dense_loss.png"
