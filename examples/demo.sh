#!/bin/sh
# The main demo (make demo): a small MoE language model and a dense one with the same active
# parameters train on the same bytes of the Brown corpus; then a comparison table, the plots
# and a sample from each. STEPS=n shortens or lengthens it (default 600 steps per model).
set -eu
cd "$(dirname "$0")/.."
B=${BUILD:-build}
# spinning OpenMP threads stall on shared or virtual machines; sleeping ones cost nothing here
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
STEPS=${STEPS:-600}
mkdir -p out
[ -f data/brown/train/news.txt ] || sh examples/data/brown.sh
common="--steps $STEPS --d 128 --layers 4 --heads 4 --seq 128 --batch 16 --eval-every 100 --eval-batches 4"
echo "== MoE: 8 experts of width 256, top-2 (about the active size of one 512-wide FFN)"
"$B/examples/train_lm" $common --name moe --experts 8 --top-k 2 --expert-ff 256 --router mixtral | tee out/demo_moe.log
echo
echo "== dense: one SwiGLU FFN of width 512"
"$B/examples/train_lm" $common --name dense --experts 0 --d-ff 512 | tee out/demo_dense.log
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
