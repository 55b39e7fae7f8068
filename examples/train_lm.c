/* train_lm.c - train a tiny byte-level MoE (or dense) transformer on the Brown corpus.
 *
 *   make data                      # once: data/brown/{train,val}/<genre>.txt
 *   build/examples/train_lm --steps 600 --name moe
 *   build/examples/train_lm --experts 0 --d-ff 512 --name dense
 *   build/examples/train_lm --resume out/moe.ckpt --steps 1200
 *
 * Prints a settings table, then key=value lines: one per --log-every steps (loss, aux, lr,
 * grad norm, tok/s, ETA), `eval` lines with validation bits per byte, and an expert-load line
 * per MoE layer every --load-every steps. Writes out/<name>.csv, out/<name>_loss.png,
 * out/<name>_load.png (expert load per genre, first MoE layer), out/<name>.ckpt (atomically,
 * with optimizer state, data position and RNGs: --resume continues bit-identically), and
 * prints a generated sample at the end. `--help` lists every flag.
 */
#define _POSIX_C_SOURCE 200809L /* files.h: mkdir(2) */
#define MOE_IMPLEMENTATION
#include "moe.h" /* defines: moe_model_*, moe_loader_*, moe_checkpoint_*, moe_adamw_step, moe_lr_cosine */
#define PLOT_IMPLEMENTATION
#include "plot.h" /* defines: plot_lines, plot_heatmap */
#include "files.h" /* defines: files_mkdirs */
#include "brown.h" /* defines: brown_corpus, brown_load, brown_free */

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Training options: everything that decides the run besides the model config. Stored in the
   checkpoint, so --resume continues the same run. */
typedef struct train_options {
    int batch, seq, accum, steps, warmup, eval_every, eval_batches, log_every, load_every, save_every;
    float lr, min_lr, weight_decay, clip, beta2;
    int seed;
    char genres[256]; /* comma-separated, "" = all */
} train_options;

typedef struct train_state { /* the checkpoint's state blob */
    train_options opt;
    moe_loader_state loader;
    moe_rng noise;
    double tokens;
} train_state;

typedef struct run_paths {
    const char *data_dir, *out_dir, *name, *resume, *prompt;
    int sample_bytes, quick, stop_at;
    float temperature, top_p;
    int top_k;
} run_paths;

static void usage(void) {
    printf("train_lm: train a tiny byte-level MoE transformer on the Brown corpus\n"
           "model:    --d N --layers N --heads N --d-ff N (dense FFN width) --seq N (max length)\n"
           "          --pos learned|rope --experts N (0 = dense model) --top-k N --expert-ff N\n"
           "          --router topk|mixtral|sigmoid|noisy|ec --capacity CF (0 = dropless)\n"
           "          --shared N --moe-every N --dense-first N --balance none|switch|mixtral|deepseek\n"
           "          --balance-coef X --z-coef X\n"
           "training: --batch N --accum N --steps N --lr X --min-lr X --warmup N --wd X --clip X\n"
           "          --beta2 X --seed N --genres a,b,c (default: all 15)\n"
           "output:   --eval-every N --eval-batches N --log-every N --load-every N --save-every N\n"
           "          --data DIR (data/brown) --out DIR (out) --name NAME (lm) --resume FILE\n"
           "          --sample N --temperature X --top-k-sample N --top-p X --prompt TEXT --quick\n"
           "          --stop-at N (save and stop after step N; --resume continues the same schedule)\n");
}

static int parse_router(moe_layer_config *mc, const char *v) {
    if (strcmp(v, "topk") == 0) { mc->router = MOE_ROUTER_TOPK; mc->renormalize = 0; }
    else if (strcmp(v, "mixtral") == 0) { mc->router = MOE_ROUTER_TOPK; mc->renormalize = 1; }
    else if (strcmp(v, "sigmoid") == 0) { mc->router = MOE_ROUTER_SIGMOID; mc->renormalize = 1; }
    else if (strcmp(v, "noisy") == 0) mc->router = MOE_ROUTER_NOISY_TOPK;
    else if (strcmp(v, "ec") == 0) mc->router = MOE_ROUTER_EXPERT_CHOICE;
    else return 0;
    return 1;
}

static int parse_balance(moe_layer_config *mc, const char *v) {
    const char *names[4] = {"none", "switch", "mixtral", "deepseek"};
    int i;
    for (i = 0; i < 4; i++)
        if (strcmp(v, names[i]) == 0) { mc->balance = (moe_balance_loss)i; return 1; }
    return 0;
}

static int parse_args(int argc, char **argv, moe_model_config *c, train_options *o, run_paths *p) {
    int i;
    *c = moe_model_config_default();
    c->max_seq = 128;
    c->d = 128;
    c->n_layers = 4;
    c->n_heads = 4;
    c->d_ff = 512;
    c->moe.n_experts = 8;
    c->moe.top_k = 2;
    c->moe.d_ff = 256;
    memset(o, 0, sizeof *o);
    o->batch = 16; o->seq = 128; o->accum = 1; o->steps = 600; o->warmup = 50;
    o->eval_every = 200; o->eval_batches = 4; o->log_every = 20; o->load_every = 200; o->save_every = 0;
    o->lr = 2e-3f; o->min_lr = 2e-4f; o->weight_decay = 0.1f; o->clip = 1.0f; o->beta2 = 0.99f; o->seed = 1;
    memset(p, 0, sizeof *p);
    p->data_dir = "data/brown"; p->out_dir = "out"; p->name = "lm"; p->sample_bytes = 300;
    p->temperature = 0.8f; p->top_p = 0.95f; p->top_k = 0; p->prompt = "The ";
    for (i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (strcmp(a, "--help") == 0 || strcmp(a, "-h") == 0) { usage(); exit(0); }
        if (strcmp(a, "--quick") == 0) { p->quick = 1; continue; }
        if (!v) { fprintf(stderr, "option %s needs a value\n", a); return 0; }
        i++;
#define INT_OPT(flag, field) if (strcmp(a, flag) == 0) { field = atoi(v); continue; }
#define FLT_OPT(flag, field) if (strcmp(a, flag) == 0) { field = (float)atof(v); continue; }
        INT_OPT("--d", c->d) INT_OPT("--layers", c->n_layers) INT_OPT("--heads", c->n_heads)
        INT_OPT("--d-ff", c->d_ff) INT_OPT("--experts", c->moe.n_experts) INT_OPT("--top-k", c->moe.top_k)
        INT_OPT("--expert-ff", c->moe.d_ff) INT_OPT("--shared", c->moe.n_shared) INT_OPT("--moe-every", c->moe_every)
        INT_OPT("--dense-first", c->dense_first) FLT_OPT("--capacity", c->moe.capacity_factor)
        FLT_OPT("--balance-coef", c->moe.balance_coef) FLT_OPT("--z-coef", c->moe.z_coef)
        INT_OPT("--batch", o->batch) INT_OPT("--seq", o->seq) INT_OPT("--accum", o->accum) INT_OPT("--steps", o->steps)
        INT_OPT("--warmup", o->warmup) INT_OPT("--eval-every", o->eval_every) INT_OPT("--eval-batches", o->eval_batches)
        INT_OPT("--log-every", o->log_every) INT_OPT("--load-every", o->load_every) INT_OPT("--save-every", o->save_every)
        FLT_OPT("--lr", o->lr) FLT_OPT("--min-lr", o->min_lr) FLT_OPT("--wd", o->weight_decay) FLT_OPT("--clip", o->clip)
        FLT_OPT("--beta2", o->beta2) INT_OPT("--seed", o->seed) INT_OPT("--sample", p->sample_bytes)
        INT_OPT("--stop-at", p->stop_at)
        FLT_OPT("--temperature", p->temperature) INT_OPT("--top-k-sample", p->top_k) FLT_OPT("--top-p", p->top_p)
#undef INT_OPT
#undef FLT_OPT
        if (strcmp(a, "--pos") == 0) {
            if (strcmp(v, "learned") == 0) c->pos = MOE_POS_LEARNED;
            else if (strcmp(v, "rope") == 0) c->pos = MOE_POS_ROPE;
            else { fprintf(stderr, "--pos learned|rope, not '%s'\n", v); return 0; }
        } else if (strcmp(a, "--router") == 0) {
            if (!parse_router(&c->moe, v)) { fprintf(stderr, "unknown router '%s'\n", v); return 0; }
        } else if (strcmp(a, "--balance") == 0) {
            if (!parse_balance(&c->moe, v)) { fprintf(stderr, "unknown balance loss '%s'\n", v); return 0; }
        } else if (strcmp(a, "--genres") == 0) {
            if (strlen(v) >= sizeof o->genres) { fprintf(stderr, "--genres is too long\n"); return 0; }
            strcpy(o->genres, v);
        } else if (strcmp(a, "--data") == 0) p->data_dir = v;
        else if (strcmp(a, "--out") == 0) p->out_dir = v;
        else if (strcmp(a, "--name") == 0) p->name = v;
        else if (strcmp(a, "--resume") == 0) p->resume = v;
        else if (strcmp(a, "--prompt") == 0) p->prompt = v;
        else { fprintf(stderr, "unknown option '%s' (--help lists them)\n", a); return 0; }
    }
    if (c->moe.n_experts == 0) c->moe_every = 0; /* --experts 0: a dense model */
    if (p->quick) {
        o->steps = o->steps < 30 ? o->steps : 30;
        o->eval_every = 15; o->eval_batches = 1; o->log_every = 5; o->load_every = 15; o->batch = 4;
        o->seq = o->seq < 64 ? o->seq : 64;
        p->sample_bytes = 40;
    }
    if (o->seq > c->max_seq) c->max_seq = o->seq;
    if (o->batch < 1 || o->seq < 2 || o->accum < 1 || o->steps < 1 || o->log_every < 1) {
        fprintf(stderr, "batch, accum, steps, log-every must be >= 1 and seq >= 2\n");
        return 0;
    }
    return 1;
}

/* validation bits per byte over eval_batches batches of each genre; fills load (genres x E)
   with the first MoE layer's expert shares per genre when load != NULL */
static double evaluate(moe_model *m, const brown_corpus *cp, const train_options *o, float *load, double *per_genre) {
    int *x = (int *)malloc(sizeof(int) * (size_t)o->batch * o->seq), *y = (int *)malloc(sizeof(int) * (size_t)o->batch * o->seq);
    double total_nats = 0.0, total_tokens = 0.0;
    int g, l, moe_l = -1, E = m->cfg.moe.n_experts;
    for (l = 0; l < m->cfg.n_layers; l++)
        if (m->blocks[l].is_moe) { moe_l = l; break; }
    for (g = 0; g < cp->n; g++) {
        size_t start = 0;
        double nats = 0.0, tokens = 0.0;
        int bi, e;
        if (load && moe_l >= 0)
            for (e = 0; e < E; e++) load[g * E + e] = 0.0f;
        for (bi = 0; bi < o->eval_batches; bi++) {
            int rows = moe_loader_sequential(cp->val[g], cp->val_len[g], &start, x, y, o->batch, o->seq);
            if (rows == 0) break;
            moe_model_forward(m, x, y, rows, o->seq, NULL);
            nats += m->loss * rows * o->seq;
            tokens += (double)rows * o->seq;
            if (load && moe_l >= 0) {
                const moe_layer *L = &m->blocks[moe_l].moe;
                for (e = 0; e < E; e++) load[g * E + e] += (float)(L->routed.offset[e + 1] - L->routed.offset[e]);
            }
        }
        if (load && moe_l >= 0) {
            float s = 0.0f;
            for (e = 0; e < E; e++) s += load[g * E + e];
            for (e = 0; e < E; e++) load[g * E + e] = s > 0 ? load[g * E + e] / s : 0.0f;
        }
        if (per_genre) per_genre[g] = tokens > 0 ? nats / tokens / log(2.0) : NAN;
        total_nats += nats;
        total_tokens += tokens;
    }
    free(x);
    free(y);
    return total_tokens > 0 ? total_nats / total_tokens / log(2.0) : NAN;
}

static void print_settings(const moe_model *m, const train_options *o, const run_paths *p, const brown_corpus *cp, long long start_step) {
    const moe_model_config *c = &m->cfg;
    const char *routers[5] = {"topk", "sigmoid", "noisy", "ec", "?"};
    char v[32][96];
    const char *k[32];
    int n = 0, i, moe_layers = 0;
    size_t act_mem = 0;
    for (i = 0; i < c->n_layers; i++) moe_layers += m->blocks[i].is_moe;
    /* activation floats per block (x, ln1, qkv, att, atty, x2, ln2, ffn) */
    act_mem = (size_t)o->batch * o->seq * (size_t)c->d * 9 + (size_t)o->batch * c->n_heads * o->seq * o->seq;
    act_mem *= (size_t)c->n_layers * sizeof(float);
#define ROW(key, ...) do { k[n] = key; snprintf(v[n], sizeof v[n], __VA_ARGS__); n++; } while (0)
    ROW("model", "d %d, layers %d, heads %d, %s positions", c->d, c->n_layers, c->n_heads, c->pos == MOE_POS_ROPE ? "rotary" : "learned");
    if (moe_layers)
        ROW("MoE layers", "%d of %d: E %d, k %d, expert d_ff %d, shared %d", moe_layers, c->n_layers, c->moe.n_experts, c->moe.top_k, c->moe.d_ff, c->moe.n_shared);
    if (moe_layers < c->n_layers) ROW("dense FFN", "d_ff %d", c->d_ff);
    if (moe_layers)
        ROW("router", "%s%s, capacity %s, balance %d x %.3g, z %.3g", routers[c->moe.router < 4 ? c->moe.router : 4],
            c->moe.router == MOE_ROUTER_TOPK ? (c->moe.renormalize ? " (renormalised)" : " (softmax)") : "",
            c->moe.capacity_factor > 0 ? "set" : "dropless", (int)c->moe.balance, (double)c->moe.balance_coef, (double)c->moe.z_coef);
    ROW("parameters", "%zu total, %zu active per token", moe_model_params_total(m), moe_model_params_active(m));
    ROW("activations", "%.1f MiB (+ gradients of one block)", act_mem / 1048576.0);
    ROW("batch", "%d x %d bytes, accumulation %d", o->batch, o->seq, o->accum);
    ROW("optimizer", "AdamW lr %.2g -> %.2g, warm-up %d, wd %.2g, beta2 %.3g, clip %.2g", (double)o->lr, (double)o->min_lr, o->warmup,
        (double)o->weight_decay, (double)o->beta2, (double)o->clip);
    ROW("steps", "%lld to %d", start_step, o->steps);
    ROW("data", "%s, %d genres%s", p->data_dir, cp->n, o->genres[0] ? " (chosen)" : "");
    ROW("threads", "%d", moe_num_threads());
    ROW("seed", "%d", o->seed);
#undef ROW
    printf("+-------------+------------------------------------------------------------+\n");
    for (i = 0; i < n; i++) printf("| %-11s | %-58s |\n", k[i], v[i]);
    printf("+-------------+------------------------------------------------------------+\n");
    fflush(stdout);
}

int main(int argc, char **argv) {
    moe_model_config cfg;
    train_options opt;
    run_paths paths;
    train_state st;
    brown_corpus cp;
    moe_model m;
    moe_loader ld;
    moe_adamw_config adam;
    moe_err err;
    long long step = 0, start_step = 0;
    int *x, *y, *src, i, l;
    char path[1024], ckpt[1024];
    FILE *csv;
    float *curve_x, *curve_train, *eval_x, *eval_y, *load = NULL;
    int n_eval = 0;
    double t0, last_loss = 0.0, last_bpb = NAN, *per_genre;
    const unsigned char *srcs[BROWN_GENRES];
    if (!parse_args(argc, argv, &cfg, &opt, &paths)) return 2;
    snprintf(ckpt, sizeof ckpt, "%s/%s.ckpt", paths.out_dir, paths.name);
    memset(&st, 0, sizeof st);
    if (paths.resume) {
        int steps = opt.steps;
        if (moe_checkpoint_blobs(paths.resume, &cfg, sizeof cfg, &st, sizeof st, &err) != MOE_OK) {
            fprintf(stderr, "resume: %s\n", err.msg);
            return 1;
        }
        /* the run's options come from the checkpoint; only --steps may extend it */
        opt = st.opt;
        opt.steps = steps > opt.steps ? steps : opt.steps;
    }
    if (!brown_load(&cp, paths.data_dir, opt.genres)) return 1;
    if (moe_model_init(&m, &cfg, opt.batch, opt.seq) != MOE_OK) { fprintf(stderr, "model: %s\n", m.err.msg); return 2; }
    for (i = 0; i < cp.n; i++) srcs[i] = cp.train[i];
    if (moe_loader_init(&ld, srcs, cp.train_len, cp.n, opt.seq, (uint64_t)opt.seed, &err) != MOE_OK) { fprintf(stderr, "data: %s\n", err.msg); return 1; }
    if (paths.resume) {
        train_state saved;
        if (moe_checkpoint_load(paths.resume, &m.S, &start_step, &cfg, NULL, sizeof cfg, &saved, sizeof saved, &err) != MOE_OK) {
            fprintf(stderr, "resume: %s\n", err.msg);
            return 1;
        }
        ld.rng = saved.loader.rng;
        ld.batches = saved.loader.batches;
        st.noise = saved.noise;
        st.tokens = saved.tokens;
        printf("resumed %s at step %lld\n", paths.resume, start_step);
    } else {
        moe_model_init_weights(&m, (uint64_t)opt.seed);
        moe_rng_seed(&st.noise, (uint64_t)opt.seed + 7);
    }
    adam = moe_adamw_config_default();
    adam.beta2 = opt.beta2;
    adam.weight_decay = opt.weight_decay;
    print_settings(&m, &opt, &paths, &cp, start_step);
    {
        files_err fe;
        if (files_mkdirs(paths.out_dir, &fe) != 0) { fprintf(stderr, "%s\n", fe.msg); return 1; }
    }
    snprintf(path, sizeof path, "%s/%s.csv", paths.out_dir, paths.name);
    csv = fopen(path, paths.resume ? "a" : "w");
    if (!csv) { fprintf(stderr, "cannot write %s\n", path); return 1; }
    if (!paths.resume) fprintf(csv, "step,train_loss,aux,lr,grad_norm,val_bpb\n");
    x = (int *)malloc(sizeof(int) * (size_t)opt.batch * opt.seq);
    y = (int *)malloc(sizeof(int) * (size_t)opt.batch * opt.seq);
    src = (int *)malloc(sizeof(int) * (size_t)opt.batch);
    curve_x = (float *)malloc(sizeof(float) * (size_t)opt.steps);
    curve_train = (float *)malloc(sizeof(float) * (size_t)opt.steps);
    eval_x = (float *)malloc(sizeof(float) * (size_t)(opt.steps / (opt.eval_every > 0 ? opt.eval_every : opt.steps) + 2));
    eval_y = (float *)malloc(sizeof(float) * (size_t)(opt.steps / (opt.eval_every > 0 ? opt.eval_every : opt.steps) + 2));
    per_genre = (double *)malloc(sizeof(double) * (size_t)cp.n);
    if (cfg.moe_every > 0) load = (float *)calloc((size_t)cp.n * cfg.moe.n_experts, sizeof(float));
    t0 = moe_time_seconds();
    for (step = start_step + 1; step <= opt.steps; step++) {
        float lr = moe_lr_cosine(step - 1, opt.warmup, opt.steps, opt.lr, opt.min_lr), norm;
        double loss = 0.0, aux = 0.0;
        int a;
        moe_store_zero_grad(&m.S);
        for (a = 0; a < opt.accum; a++) {
            moe_loader_next(&ld, x, y, src, opt.batch, opt.seq);
            if (moe_model_forward(&m, x, y, opt.batch, opt.seq, &st.noise) != MOE_OK ||
                moe_model_backward(&m, 1.0f / (float)opt.accum) != MOE_OK) {
                fprintf(stderr, "step %lld: %s\n", step, m.err.msg);
                return 1;
            }
            loss += m.loss / opt.accum;
            aux += m.aux_loss / opt.accum;
        }
        norm = moe_clip_grad_norm(&m.S, opt.clip);
        moe_adamw_step(&m.S, &adam, lr, step);
        st.tokens += (double)opt.batch * opt.seq * opt.accum;
        curve_x[step - 1] = (float)step;
        curve_train[step - 1] = (float)(loss / log(2.0));
        last_loss = loss;
        if (step % opt.log_every == 0 || step == start_step + 1) {
            double el = moe_time_seconds() - t0, done = (double)(step - start_step);
            printf("step=%lld loss=%.4f bpb=%.4f aux=%.4f lr=%.2e grad_norm=%.3f tok_s=%.0f eta_s=%.0f\n", step, loss,
                   loss / log(2.0), aux, (double)lr, (double)norm, done * opt.batch * opt.seq * opt.accum / el,
                   el / done * (double)(opt.steps - step));
            fflush(stdout);
        }
        if (opt.load_every > 0 && step % opt.load_every == 0)
            for (l = 0; l < cfg.n_layers; l++) {
                const moe_routing_stats *s = &m.blocks[l].moe.stats;
                int e;
                if (!m.blocks[l].is_moe) continue;
                printf("load layer=%d entropy=%.3f gate_entropy=%.3f drop_rate=%.3f shares=", l, (double)s->load_entropy,
                       (double)s->gate_entropy, (double)s->drop_rate);
                for (e = 0; e < cfg.moe.n_experts; e++) printf("%s%.3f", e ? "," : "", (double)s->load[e]);
                printf("\n");
            }
        last_bpb = NAN;
        if ((opt.eval_every > 0 && step % opt.eval_every == 0) || step == opt.steps) {
            last_bpb = evaluate(&m, &cp, &opt, load, per_genre);
            eval_x[n_eval] = (float)step;
            eval_y[n_eval++] = (float)last_bpb;
            printf("eval step=%lld val_bpb=%.4f\n", step, last_bpb);
        }
        fprintf(csv, "%lld,%.6f,%.6f,%.6g,%.4f,%.6f\n", step, loss, aux, (double)lr, (double)norm, last_bpb);
        if ((opt.save_every > 0 && step % opt.save_every == 0) || step == opt.steps || step == paths.stop_at) {
            st.opt = opt;
            st.loader.rng = ld.rng;
            st.loader.batches = ld.batches;
            if (moe_checkpoint_save(ckpt, &m.S, 1, step, &m.cfg, sizeof m.cfg, &st, sizeof st, &err) != MOE_OK)
                fprintf(stderr, "checkpoint: %s\n", err.msg);
        }
        if (step == paths.stop_at) {
            printf("stopped at step %lld; continue with --resume %s\n", step, ckpt);
            moe_model_free(&m);
            return 0;
        }
    }
    fclose(csv);
    if (start_step >= opt.steps) last_bpb = evaluate(&m, &cp, &opt, load, per_genre);
    else last_bpb = eval_y[n_eval - 1];
    printf("\nvalidation bits per byte by genre:\n");
    for (i = 0; i < cp.n; i++) printf("  %-16s %.4f\n", cp.names[i], per_genre[i]);
    /* plots */
    if (step - 1 > start_step) {
        plot_series s[2];
        plot_chart ch;
        memset(s, 0, sizeof s);
        memset(&ch, 0, sizeof ch);
        s[0].name = "train"; s[0].x = curve_x + start_step; s[0].y = curve_train + start_step; s[0].n = (int)(opt.steps - start_step);
        s[1].name = "validation"; s[1].x = eval_x; s[1].y = eval_y; s[1].n = n_eval; s[1].style = PLOT_LINE_POINTS;
        ch.title = paths.name; ch.xlabel = "step"; ch.ylabel = "bits per byte";
        snprintf(path, sizeof path, "%s/%s_loss.png", paths.out_dir, paths.name);
        if (plot_lines(path, &ch, s, n_eval > 0 ? 2 : 1) != 0) fprintf(stderr, "could not write %s\n", path);
    }
    if (load) {
        plot_heatmap_opts h;
        memset(&h, 0, sizeof h);
        h.title = "expert load per genre (first MoE layer, validation)";
        h.xlabel = "expert";
        h.row_labels = cp.names;
        h.v_min = 0.0f;
        snprintf(path, sizeof path, "%s/%s_load.png", paths.out_dir, paths.name);
        if (plot_heatmap(path, &h, load, cp.n, cfg.moe.n_experts) != 0) fprintf(stderr, "could not write %s\n", path);
    }
    /* a sample */
    if (paths.sample_bytes > 0 && !(cfg.moe_every > 0 && cfg.moe.router == MOE_ROUTER_EXPERT_CHOICE)) {
        int np = (int)strlen(paths.prompt), *buf = (int *)malloc(sizeof(int) * (size_t)(np + paths.sample_bytes + 1));
        moe_sampler sp;
        moe_rng r;
        if (np == 0) { paths.prompt = " "; np = 1; }
        for (i = 0; i < np; i++) buf[i] = (unsigned char)paths.prompt[i];
        sp.temperature = paths.temperature; sp.top_k = paths.top_k; sp.top_p = paths.top_p;
        moe_rng_seed(&r, (uint64_t)opt.seed + 99);
        if (moe_model_generate(&m, buf, np, paths.sample_bytes, buf, &sp, &r) == MOE_OK) {
            printf("\nsample (temperature %.2g, top-p %.2g):\n---\n", (double)sp.temperature, (double)sp.top_p);
            for (i = 0; i < np + paths.sample_bytes; i++) putchar((buf[i] >= 32 && buf[i] < 127) || buf[i] == '\n' ? buf[i] : '?');
            printf("\n---\n");
        } else {
            fprintf(stderr, "sample: %s\n", m.err.msg);
        }
        free(buf);
    }
    printf("result name=%s val_bpb=%.4f train_loss=%.4f params_total=%zu params_active=%zu tok_s=%.0f steps=%lld\n", paths.name, last_bpb,
           last_loss, moe_model_params_total(&m), moe_model_params_active(&m),
           (double)(opt.steps - start_step) * opt.batch * opt.seq * opt.accum / (moe_time_seconds() - t0 + 1e-9), (long long)opt.steps);
    printf("wrote %s/%s.csv, %s/%s_loss.png%s, %s\n", paths.out_dir, paths.name, paths.out_dir, paths.name, load ? ", *_load.png" : "", ckpt);
    moe_model_free(&m);
    brown_free(&cp);
    free(x); free(y); free(src); free(curve_x); free(curve_train); free(eval_x); free(eval_y); free(per_genre); free(load);
    return 0;
}
