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
 * out/<name>_load.png (expert load per genre, first MoE layer), out/<name>.ckpt (a model file,
 * atomically, with optimizer state, and the options, data position and RNGs as a record of named
 * fields: --resume continues bit-identically; moe_model_load reads it elsewhere), and
 * prints a generated sample at the end. `--help` lists every flag.
 *
 * Exit status 0 only when every step ran and every file was written. A NaN or infinite loss,
 * gradient norm or parameter stops the run before it saves (the last good checkpoint stays) and
 * exits 1, as does a final checkpoint that cannot be written. The log gets a row per step,
 * flushed at once; --resume keeps its rows up to the checkpoint's step and continues from there.
 *
 * Built with MOE_MPI (make builds build/examples/train_lm_mpi with mpicc), it runs under
 * mpirun -np N with --data-parallel (each rank its share of every --batch, the gradients summed
 * in rank order) or --expert-parallel (the same, and each MoE layer's experts split over the
 * ranks, tokens exchanged all-to-all). Rank 0 alone prints and writes the log, the plots and the
 * checkpoint, which a single-process run resumes, and the other way round.
 */
#define _POSIX_C_SOURCE 200809L /* files.h: mkdir(2) */
#define MOE_IMPLEMENTATION
#include "moe.h" /* defines: moe_model_*, moe_loader_*, moe_checkpoint_*, moe_adamw_step, moe_lr_cosine */
#define PLOT_IMPLEMENTATION
#include "plot.h" /* defines: plot_lines, plot_heatmap */
#include "files.h" /* defines: files_mkdirs */
#include "flags.h" /* defines: flag_*, flags_parse, flags_check */
#include "brown.h" /* defines: brown_corpus, brown_load, brown_free */

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Training options: everything that decides the run besides the model config. Stored in the
   checkpoint, so --resume continues the same run: a new member needs its line in state_fields. */
typedef struct train_options {
    int batch, seq, accum, steps, warmup, eval_every, eval_batches, log_every, load_every, save_every;
    float lr, min_lr, weight_decay, clip, beta2;
    int seed;
    char genres[256]; /* comma-separated, "" = all */
} train_options;

typedef struct train_state { /* the checkpoint's user blob, as a record of state_fields */
    train_options opt;
    moe_loader_state loader;
    moe_rng noise;
    double tokens;
} train_state;

/* THE description of train_state in a checkpoint: a record of named fields (moe_record_write),
   so the file does not depend on the struct's layout and a new option is a new line (a file
   that lacks it resumes with its default). Names are stable: never reuse one. */
#define STATE_FIELD(type, member) MOE_FIELD(type, train_state, member)
static const moe_field state_fields[] = {
    STATE_FIELD(MOE_FIELD_INT, opt.batch),
    STATE_FIELD(MOE_FIELD_INT, opt.seq),
    STATE_FIELD(MOE_FIELD_INT, opt.accum),
    STATE_FIELD(MOE_FIELD_INT, opt.steps),
    STATE_FIELD(MOE_FIELD_INT, opt.warmup),
    STATE_FIELD(MOE_FIELD_INT, opt.eval_every),
    STATE_FIELD(MOE_FIELD_INT, opt.eval_batches),
    STATE_FIELD(MOE_FIELD_INT, opt.log_every),
    STATE_FIELD(MOE_FIELD_INT, opt.load_every),
    STATE_FIELD(MOE_FIELD_INT, opt.save_every),
    STATE_FIELD(MOE_FIELD_FLOAT, opt.lr),
    STATE_FIELD(MOE_FIELD_FLOAT, opt.min_lr),
    STATE_FIELD(MOE_FIELD_FLOAT, opt.weight_decay),
    STATE_FIELD(MOE_FIELD_FLOAT, opt.clip),
    STATE_FIELD(MOE_FIELD_FLOAT, opt.beta2),
    STATE_FIELD(MOE_FIELD_INT, opt.seed),
    STATE_FIELD(MOE_FIELD_TEXT, opt.genres),
    STATE_FIELD(MOE_FIELD_INT, loader.rng.state),
    STATE_FIELD(MOE_FIELD_INT, loader.rng.inc),
    STATE_FIELD(MOE_FIELD_INT, loader.batches),
    STATE_FIELD(MOE_FIELD_INT, noise.state),
    STATE_FIELD(MOE_FIELD_INT, noise.inc),
    STATE_FIELD(MOE_FIELD_FLOAT, tokens),
};
#undef STATE_FIELD
#define N_STATE_FIELDS ((int)(sizeof state_fields / sizeof state_fields[0]))
/* the user blob: this tag, then the record (the tag tells train_lm's state from another
   program's, and from the raw train_state an earlier train_lm stored) */
static const char state_tag[8] = {'t', 'r', 'a', 'i', 'n', '_', 'l', 'm'};
#define STATE_MAX_BYTES 65536 /* a train_lm state is well under 1 KB */

typedef struct run_paths {
    const char *data_dir, *out_dir, *name, *resume, *prompt, *genres;
    int sample_bytes, quick, stop_at;
    int device; /* 0 cpu, 1 cuda */
    float temperature, top_p;
    int top_k;
    int data_parallel, expert_parallel; /* under MOE_MPI only */
} run_paths;

#ifdef MOE_MPI
static moe_mpi mpi;        /* MPI_COMM_WORLD, set up by main before anything else */
static int mpi_ranks = 1;  /* 1 = no parallelism (a single rank, or neither flag)  */
static int mpi_expert_parallel = 0;
#endif

static const char *const router_names = "topk|mixtral|sigmoid|noisy|ec";

static void apply_router(moe_layer_config *mc, int k) {
    static const moe_router_kind kind[5] = {MOE_ROUTER_TOPK, MOE_ROUTER_TOPK, MOE_ROUTER_SIGMOID, MOE_ROUTER_NOISY_TOPK, MOE_ROUTER_EXPERT_CHOICE};
    mc->router = kind[k];
    if (k <= 2) mc->renormalize = k != 0; /* topk: softmax weights; mixtral, sigmoid: renormalised */
}

static int router_index(const moe_layer_config *mc) {
    switch (mc->router) {
    case MOE_ROUTER_TOPK: return mc->renormalize ? 1 : 0;
    case MOE_ROUTER_SIGMOID: return 2;
    case MOE_ROUTER_NOISY_TOPK: return 3;
    case MOE_ROUTER_EXPERT_CHOICE: return 4;
    default: return 0;
    }
}

/* the choice flags' values before they are applied to the config */
typedef struct choices { int router, pos, balance; } choices;

/* every flag, in the help's order; the values start as the defaults */
static int make_flags(flag *f, moe_model_config *c, train_options *o, run_paths *p, choices *ch) {
    int n = 0;
    f[n++] = flag_heading("model");
    f[n++] = flag_int("--d", &c->d, 1, 16384, "model width");
    f[n++] = flag_int("--layers", &c->n_layers, 1, 256, "transformer blocks");
    f[n++] = flag_int("--heads", &c->n_heads, 1, 1024, "attention heads (divides --d)");
    f[n++] = flag_int("--d-ff", &c->d_ff, 1, 1 << 20, "dense FFN width (dense blocks)");
    f[n++] = flag_choice("--pos", &ch->pos, "learned|rope", "position encoding");
    f[n++] = flag_int("--experts", &c->moe.n_experts, 0, 1024, "experts per MoE layer; 0 = a dense model");
    f[n++] = flag_int("--top-k", &c->moe.top_k, 1, 1024, "experts per token");
    f[n++] = flag_int("--expert-ff", &c->moe.d_ff, 1, 1 << 20, "width of one expert");
    f[n++] = flag_choice("--router", &ch->router, router_names, "router: topk (softmax weights), mixtral (renormalised), sigmoid, noisy, ec (expert choice)");
    f[n++] = flag_float("--capacity", &c->moe.capacity_factor, 0, 1000, "capacity factor; 0 = dropless");
    f[n++] = flag_int("--shared", &c->moe.n_shared, 0, 64, "shared experts every token visits");
    f[n++] = flag_int("--moe-every", &c->moe_every, 0, 256, "every n-th block is MoE");
    f[n++] = flag_int("--dense-first", &c->dense_first, 0, 256, "the first n blocks stay dense");
    f[n++] = flag_choice("--balance", &ch->balance, "none|switch|mixtral|deepseek", "load-balancing loss");
    f[n++] = flag_float("--balance-coef", &c->moe.balance_coef, 0, 1000, "its coefficient");
    f[n++] = flag_float("--z-coef", &c->moe.z_coef, 0, 1000, "router z-loss coefficient");
    f[n++] = flag_heading("training");
    f[n++] = flag_int("--batch", &o->batch, 1, 65536, "sequences per micro-batch");
    f[n++] = flag_int("--seq", &o->seq, 2, 65536, "bytes per sequence");
    f[n++] = flag_int("--accum", &o->accum, 1, 1 << 20, "micro-batches per optimizer step");
    f[n++] = flag_int("--steps", &o->steps, 1, 1e9, "optimizer steps (with --resume: the run's new length)");
    f[n++] = flag_float("--lr", &o->lr, 0, 1e6, "peak learning rate (AdamW)");
    f[n++] = flag_float("--min-lr", &o->min_lr, 0, 1e6, "learning rate at the end of the cosine");
    f[n++] = flag_int("--warmup", &o->warmup, 0, 1e9, "linear warm-up steps");
    f[n++] = flag_float("--wd", &o->weight_decay, 0, 1000, "weight decay");
    f[n++] = flag_float("--clip", &o->clip, 0, 1e9, "global gradient-norm clip; 0 = off");
    f[n++] = flag_float("--beta2", &o->beta2, 0, 0.9999999, "AdamW beta2");
    f[n++] = flag_int("--seed", &o->seed, 0, 2147483647, "initialisation and data order");
    f[n++] = flag_default(flag_string("--genres", &p->genres, "a,b,c", "Brown genres to train on"), "all 15");
    f[n++] = flag_heading("output");
    f[n++] = flag_int("--eval-every", &o->eval_every, 0, 1e9, "validation every n steps (and at the end); 0 = at the end");
    f[n++] = flag_int("--eval-batches", &o->eval_batches, 1, 1e6, "validation batches per genre");
    f[n++] = flag_int("--log-every", &o->log_every, 1, 1e9, "a progress line every n steps");
    f[n++] = flag_int("--load-every", &o->load_every, 0, 1e9, "expert-load lines every n steps; 0 = none");
    f[n++] = flag_int("--save-every", &o->save_every, 0, 1e9, "a checkpoint every n steps (and at the end); 0 = at the end");
    f[n++] = flag_string("--data", &p->data_dir, "DIR", "the corpus (make data writes it)");
    f[n++] = flag_string("--out", &p->out_dir, "DIR", "output folder (created)");
    f[n++] = flag_string("--name", &p->name, "NAME", "file names: DIR/NAME.csv, .ckpt, _loss.png, _load.png");
    f[n++] = flag_string("--resume", &p->resume, "FILE", "continue the run saved in this checkpoint");
    f[n++] = flag_int("--stop-at", &p->stop_at, 0, 1e9, "save and stop after step n (--resume continues the same schedule); 0 = off");
    f[n++] = flag_int("--sample", &p->sample_bytes, 0, 1000000, "bytes generated at the end");
    f[n++] = flag_float("--temperature", &p->temperature, 0, 100, "sampling temperature; 0 = greedy");
    f[n++] = flag_int("--top-k-sample", &p->top_k, 0, 256, "sample among the k likeliest bytes; 0 = off");
    f[n++] = flag_float("--top-p", &p->top_p, 0, 1, "nucleus sampling; 1 = off");
    f[n++] = flag_string("--prompt", &p->prompt, "TEXT", "the sample's prompt");
    f[n++] = flag_switch("--quick", &p->quick, "a smoke run: at most 30 steps of batch 4 x 64, frequent logs");
    f[n++] = flag_choice("--device", &p->device, "cpu|cuda", "where to train; cuda needs the MOE_CUDA build (make cuda)");
#ifdef MOE_MPI
    f[n++] = flag_heading("MPI (under mpirun -np N)");
    f[n++] = flag_switch("--data-parallel", &p->data_parallel, "each rank its share of --batch (a multiple of N), gradients summed in rank order");
    f[n++] = flag_switch("--expert-parallel", &p->expert_parallel, "data parallel, and each MoE layer's experts split over the N ranks (N divides --experts)");
#endif
    return n;
}

static const char *const about =
    "Data: the Brown corpus as `make data` writes it, DIR/{train,val}/<genre>.txt (bytes).\n"
    "Prints a settings table, then key=value lines: one per --log-every steps (loss, aux, lr, grad\n"
    "norm, tok/s, ETA), `eval` lines with validation bits per byte, and expert-load lines every\n"
    "--load-every steps. Writes DIR/NAME.csv (a row per step), NAME_loss.png, NAME_load.png (expert\n"
    "load per genre) and NAME.ckpt (atomically, with optimizer state, data position and RNGs:\n"
    "--resume continues bit-identically), and prints a sample at the end. Exit status 1 when training\n"
    "diverges (NaN or infinite loss, gradient or parameters: the last good checkpoint stays) or a file\n"
    "cannot be written.\n"
    "  train_lm --steps 600 --name moe\n"
    "  train_lm --experts 0 --d-ff 512 --name dense\n"
    "  train_lm --resume out/moe.ckpt --steps 1200";

/* the training options before any flag */
static void default_options(train_options *o) {
    memset(o, 0, sizeof *o);
    o->batch = 16; o->seq = 128; o->accum = 1; o->steps = 600; o->warmup = 50;
    o->eval_every = 200; o->eval_batches = 4; o->log_every = 20; o->load_every = 200; o->save_every = 0;
    o->lr = 2e-3f; o->min_lr = 2e-4f; o->weight_decay = 0.1f; o->clip = 1.0f; o->beta2 = 0.99f; o->seed = 1;
}

/* defaults, then the flags; FLAGS_RUN = run, else the exit status */
static int parse_args(int argc, char **argv, moe_model_config *c, train_options *o, run_paths *p, flags_program *prog, flag *fl, choices *ch) {
    int rc;
    *c = moe_model_config_default();
    c->max_seq = 128;
    c->d = 128;
    c->n_layers = 4;
    c->n_heads = 4;
    c->d_ff = 512;
    c->moe.n_experts = 8;
    c->moe.top_k = 2;
    c->moe.d_ff = 256;
    default_options(o);
    memset(p, 0, sizeof *p);
    p->data_dir = "data/brown"; p->out_dir = "out"; p->name = "lm"; p->sample_bytes = 300;
    p->temperature = 0.8f; p->top_p = 0.95f; p->top_k = 0; p->prompt = "The "; p->genres = "";
    ch->router = router_index(&c->moe);
    ch->pos = c->pos == MOE_POS_ROPE;
    ch->balance = (int)c->moe.balance;
    *prog = flags_program_make("train_lm", "train a tiny byte-level MoE (or dense) transformer on the Brown corpus", about, fl,
                               make_flags(fl, c, o, p, ch));
    rc = flags_parse(prog, argc, argv);
    if (rc != FLAGS_RUN) return rc;
    if (flags_find(prog, &ch->router)->seen) apply_router(&c->moe, ch->router);
    if (flags_find(prog, &ch->pos)->seen) c->pos = ch->pos ? MOE_POS_ROPE : MOE_POS_LEARNED;
    if (flags_find(prog, &ch->balance)->seen) c->moe.balance = (moe_balance_loss)ch->balance;
    if (strlen(p->genres) >= sizeof o->genres) { fprintf(stderr, "train_lm: --genres is too long (at most %d bytes)\n", (int)sizeof o->genres - 1); return 2; }
    strcpy(o->genres, p->genres);
    if (c->moe.n_experts == 0) c->moe_every = 0; /* --experts 0: a dense model */
    if (p->quick) {
        o->steps = o->steps < 30 ? o->steps : 30;
        o->eval_every = 15; o->eval_batches = 1; o->log_every = 5; o->load_every = 15; o->batch = 4;
        o->seq = o->seq < 64 ? o->seq : 64;
        p->sample_bytes = 40;
    }
    if (o->seq > c->max_seq) c->max_seq = o->seq;
    return FLAGS_RUN;
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
#ifdef MOE_MPI
    if (mpi_ranks > 1)
        ROW("ranks", "%d, %s", mpi_ranks, mpi_expert_parallel ? "expert parallel (data parallel elsewhere)" : "data parallel");
    else
        ROW("ranks", "1");
#endif
    ROW("seed", "%d", o->seed);
#undef ROW
    printf("+-------------+------------------------------------------------------------+\n");
    for (i = 0; i < n; i++) printf("| %-11s | %-58s |\n", k[i], v[i]);
    printf("+-------------+------------------------------------------------------------+\n");
    fflush(stdout);
}

/* A diverged run stops before it saves: the last good checkpoint stays. Returns the exit status. */
static int diverged(long long step, const char *what, const char *ckpt, long long saved_step) {
    fprintf(stderr, "train_lm: step %lld: %s: training diverged (a lower --lr, or --clip, may help); stopped without saving this state",
            step, what);
    if (saved_step >= 0) fprintf(stderr, "; '%s' still holds step %lld\n", ckpt, saved_step);
    else fprintf(stderr, "; this run saved no checkpoint\n");
    return 1;
}

static int params_finite(const moe_store *s) {
    size_t i;
    for (i = 0; i < s->numel; i++)
        if (!isfinite(s->params[i])) return 0;
    return 1;
}

static const char log_header[] = "step,train_loss,aux,lr,grad_norm,val_bpb\n";

/* Opens the training log for appending. A new run starts it afresh, and says so when that
   replaces an earlier run's log. A resumed run keeps the rows up to the checkpoint's step and
   drops later ones (a stopped or killed run logged steps no checkpoint holds), rewriting the
   file atomically. NULL with a sentence on failure. */
static FILE *open_log(const char *path, int resume, long long start_step) {
    FILE *f = fopen(path, "rb"), *w;
    files_atomic a;
    files_err fe;
    char line[512];
    int ok = 1, kept = 0, dropped = 0;
    if (!resume || !f) {
        if (f) {
            if (fgetc(f) != EOF) fprintf(stderr, "train_lm: note: '%s' held an earlier run's log; this new run replaces it (--resume continues a run)\n", path);
            fclose(f);
        }
        w = fopen(path, "wb");
        if (!w || fputs(log_header, w) < 0 || fflush(w) != 0) {
            fprintf(stderr, "train_lm: cannot write the log '%s': %s\n", path, strerror(errno));
            if (w) fclose(w);
            return NULL;
        }
        return w;
    }
    if (!fgets(line, sizeof line, f) || strcmp(line, log_header) != 0) {
        fprintf(stderr, "train_lm: '%s' is not a train_lm log (its first line is not \"%.*s\"); move it away to resume\n", path,
                (int)strlen(log_header) - 1, log_header);
        fclose(f);
        return NULL;
    }
    if (!(w = files_atomic_open(&a, path, &fe))) {
        fprintf(stderr, "train_lm: %s\n", fe.msg);
        fclose(f);
        return NULL;
    }
    ok = fputs(log_header, w) >= 0;
    while (ok && fgets(line, sizeof line, f)) {
        char *end;
        long long s = strtoll(line, &end, 10);
        /* a whole row (a kill can cut the last one) of a step the checkpoint holds */
        if (end != line && *end == ',' && strchr(line, '\n') && s >= 1 && s <= start_step) { ok = fputs(line, w) >= 0; kept++; }
        else dropped++;
    }
    fclose(f);
    if (files_atomic_commit(&a, ok, &fe) != 0) {
        fprintf(stderr, "train_lm: %s\n", fe.msg);
        return NULL;
    }
    if (dropped) printf("log %s: kept %d rows up to step %lld, dropped %d written after that checkpoint\n", path, kept, start_step, dropped);
    w = fopen(path, "ab");
    if (!w) fprintf(stderr, "train_lm: cannot append to the log '%s': %s\n", path, strerror(errno));
    return w;
}

/* the values a record's fields are flagged default against, and a record that lacks a field
   (written before the field existed) takes */
static train_state default_state(void) {
    train_state d;
    memset(&d, 0, sizeof d);
    default_options(&d.opt);
    return d;
}

/* A model file (moe_model_save: the config as a record, parameters and Adam moments) whose
   user blob is the tag and the run's state as a record. */
static moe_status save_checkpoint(const moe_model *m, const char *path, long long step, const train_state *st, moe_err *err) {
    train_state d = default_state();
    size_t n = 0;
    unsigned char *blob;
    moe_status rc = moe_record_write(NULL, 0, &n, st, &d, state_fields, N_STATE_FIELDS, err);
    if (rc != MOE_OK) return rc;
    blob = (unsigned char *)malloc(sizeof state_tag + n);
    if (!blob) return moe_err_set(err, MOE_ERR_NOMEM, "out of memory for the training state of '%s'", path);
    memcpy(blob, state_tag, sizeof state_tag);
    rc = moe_record_write(blob + sizeof state_tag, n, &n, st, &d, state_fields, N_STATE_FIELDS, err);
    if (rc == MOE_OK) rc = moe_model_save(m, path, 1, step, blob, sizeof state_tag + n, err);
    free(blob);
    return rc;
}

/* The run's state from a checkpoint whose header moe_model_load_config returned: a tagged
   record, or the raw train_state an earlier train_lm stored (model_io read that file's raw
   config, so this build has the layout of that time). *blob gets the bytes read (the caller
   frees it), for the load to check the file still holds them. 0, or -1 with why (a phrase
   that follows the file's name). */
static int read_state(const char *path, const moe_ckpt_info *info, train_state *st, unsigned char **blob, char *why, size_t cap) {
    size_t n = (size_t)info->state_bytes, used = 0;
    moe_err e;
    *blob = NULL;
    if (info->state_bytes == 0 || info->state_bytes > STATE_MAX_BYTES) {
        snprintf(why, cap, "holds a %llu-byte user blob, not a train_lm state (another program's model file?)", (unsigned long long)info->state_bytes);
        return -1;
    }
    *blob = (unsigned char *)malloc(n);
    if (!*blob) {
        snprintf(why, cap, "cannot be read: out of memory");
        return -1;
    }
    if (moe_checkpoint_blobs(path, NULL, 0, *blob, n, &e) != MOE_OK) {
        snprintf(why, cap, "cannot be read again: %s", e.msg);
        return -1;
    }
    if (n >= sizeof state_tag && memcmp(*blob, state_tag, sizeof state_tag) == 0) {
        *st = default_state();
        if (moe_record_read(st, &used, *blob + sizeof state_tag, n - sizeof state_tag, state_fields, N_STATE_FIELDS, &e) != MOE_OK) {
            snprintf(why, cap, "holds a training state train_lm cannot read: %s", e.msg);
            return -1;
        }
        if (used != n - sizeof state_tag) {
            snprintf(why, cap, "holds %zu bytes after its training state (a corrupt file)", n - sizeof state_tag - used);
            return -1;
        }
        return 0;
    }
    if (n == sizeof *st) {
        memcpy(st, *blob, n);
        return 0;
    }
    snprintf(why, cap, "holds a %zu-byte user blob that is neither train_lm's state record nor the %zu-byte raw state of an earlier train_lm "
                       "(another program's model file, or an earlier train_lm of another layout: resume it with the train_lm that wrote it)",
             n, sizeof *st);
    return -1;
}

/* A resumed run's state is input like any other: the options must pass the flags' own checks,
   the genre list must end, the step must lie in the run and the model must be one this
   program builds; moe_model_load_config has checked the config and that the file's
   parameters are the ones it describes, before anything is allocated. 0, or -1 with why. */
static int check_resumed(flags_program *prog, const moe_model_config *c, const train_state *st, const moe_ckpt_info *info, char *why,
                         size_t cap) {
    char msg[400];
    if (!memchr(st->opt.genres, 0, sizeof st->opt.genres)) {
        snprintf(why, cap, "holds a genre list without its end (a corrupt or foreign state)");
        return -1;
    }
    if (flags_check(prog, msg, sizeof msg) != 0) { /* the flags point at cfg and opt, which now hold the file's values */
        snprintf(why, cap, "holds options no flag would accept: %s", msg);
        return -1;
    }
    if (c->vocab != 256 || c->max_seq < st->opt.seq || c->max_seq > 65536) {
        snprintf(why, cap, "holds a model this program does not build (vocab %d, max_seq %d for sequences of %d bytes)", c->vocab, c->max_seq,
                 st->opt.seq);
        return -1;
    }
    if (info->step < 0 || info->step > st->opt.steps || st->loader.batches < 0 || !(st->tokens >= 0.0 && st->tokens < 1e30)) {
        snprintf(why, cap, "holds step %lld of a %d-step run (or a negative data position): a corrupt state", info->step, st->opt.steps);
        return -1;
    }
    return 0;
}

/* 1 when a flag given on the command line asks for another model or run than the checkpoint
   holds: `what` gets the flag and its value, `saved` the checkpoint's; --steps may differ */
static int resume_conflict(flags_program *prog, const moe_model_config *user_cfg, const train_options *user_opt, const moe_model_config *cfg,
                           const train_options *opt, char *what, char *saved, size_t cap) {
    int i;
    for (i = 0; i < prog->n_flags; i++) {
        flag *f = &prog->flags[i];
        const char *p = (const char *)f->value, *mine = NULL, *theirs = NULL;
        char a[96], b[96];
        size_t size = f->kind == FLAG_FLOAT ? sizeof(float) : sizeof(int);
        if (!f->seen || f->kind == FLAG_HEADING || f->value == (const void *)&opt->steps) continue;
        if (p >= (const char *)cfg && p < (const char *)(cfg + 1)) {
            mine = (const char *)user_cfg + (p - (const char *)cfg);
            theirs = p;
        } else if (p >= (const char *)opt && p < (const char *)(opt + 1)) {
            mine = (const char *)user_opt + (p - (const char *)opt);
            theirs = p;
        } else if (strcmp(f->name, "--genres") == 0) {
            if (strcmp(user_opt->genres, opt->genres) != 0) {
                snprintf(what, cap, "--genres '%.100s'", user_opt->genres);
                snprintf(saved, cap, "--genres '%.100s'", opt->genres);
                return 1;
            }
            continue;
        } else if (f->kind == FLAG_CHOICE) { /* --router, --pos, --balance: compare what they set */
            int u = -1, t = -1;
            if (strcmp(f->name, "--router") == 0) { u = router_index(&user_cfg->moe); t = router_index(&cfg->moe); }
            else if (strcmp(f->name, "--pos") == 0) { u = user_cfg->pos == MOE_POS_ROPE; t = cfg->pos == MOE_POS_ROPE; }
            else if (strcmp(f->name, "--balance") == 0) { u = (int)user_cfg->moe.balance; t = (int)cfg->moe.balance; }
            if (u == t) continue;
            flags_format_value(f, &u, a, sizeof a);
            flags_format_value(f, &t, b, sizeof b);
            snprintf(what, cap, "%s %s", f->name, a);
            snprintf(saved, cap, "%s %s", f->name, b);
            return 1;
        } else {
            continue; /* output and sampling flags: free to change */
        }
        if (memcmp(mine, theirs, size) == 0) continue;
        flags_format_value(f, mine, a, sizeof a);
        flags_format_value(f, theirs, b, sizeof b);
        snprintf(what, cap, "%s %s", f->name, a);
        snprintf(saved, cap, "%s %s", f->name, b);
        return 1;
    }
    return 0;
}

/* --device cuda (a build with MOE_CUDA): the training steps run on the device (the model's
   CUDA twin: dense and standard top-k MoE blocks without auxiliary losses); evaluation,
   checkpoints and the sample run on the CPU from the parameters copied back first, so the
   files are the CPU's. Expert-load lines are CPU-only. */
typedef struct device_run {
    int on;
#ifdef MOE_CUDA
    moe_cuda cu;
    moe_model_cuda mc;
#endif
} device_run;

/* 0 = ready (or the CPU), else the exit status; prints why */
static int device_start(device_run *dv, int want, moe_model *m, int B, int T) {
    memset(dv, 0, sizeof *dv);
    if (!want) return 0;
#ifdef MOE_CUDA
    if (moe_cuda_init(&dv->cu, 0, MOE_CUDA_DETERMINISTIC) != MOE_OK) {
        fprintf(stderr, "train_lm: --device cuda: %s\n", dv->cu.err.msg);
        return 1;
    }
    if (moe_model_init_cuda(&dv->mc, &dv->cu, m, B, T) != MOE_OK) {
        fprintf(stderr, "train_lm: --device cuda: %s (the CUDA model: --router topk or mixtral, --balance none)\n", dv->cu.err.msg);
        moe_cuda_free(&dv->cu);
        return 2;
    }
    dv->on = 1;
    return 0;
#else
    (void)m; (void)B; (void)T;
    fprintf(stderr, "train_lm: --device cuda: this program was built without the CUDA path (MOE_CUDA); "
                    "`make cuda` builds build/cuda/train_lm with nvcc\n");
    return 2;
#endif
}

static void device_stop(device_run *dv) {
#ifdef MOE_CUDA
    if (dv->on) {
        moe_model_free_cuda(&dv->mc);
        moe_cuda_free(&dv->cu);
    }
#endif
    dv->on = 0;
}

/* the error sentence of the last failed step */
static const char *device_error(const device_run *dv, const moe_model *m) {
#ifdef MOE_CUDA
    if (dv->on) return dv->cu.err.msg;
#else
    (void)dv;
#endif
    return m->err.msg;
}

static int device_zero_grad(device_run *dv, moe_model *m) {
#ifdef MOE_CUDA
    if (dv->on) return moe_store_zero_grad_cuda(&dv->cu, &dv->mc.S) == MOE_OK;
#else
    (void)dv;
#endif
    moe_store_zero_grad(&m->S);
    return 1;
}

/* one micro-batch's forward and backward; loss and aux of it */
static int device_forward_backward(device_run *dv, moe_model *m, const int *x, const int *y, int B, int T, float scale,
                                   moe_rng *noise, double *loss, double *aux) {
#ifdef MOE_CUDA
    if (dv->on) {
        if (moe_model_forward_cuda(&dv->cu, &dv->mc, x, y, B, T) != MOE_OK || moe_model_backward_cuda(&dv->cu, &dv->mc, scale) != MOE_OK)
            return 0;
        *loss = dv->mc.loss;
        *aux = 0.0; /* the CUDA model has no auxiliary losses */
        return 1;
    }
#else
    (void)dv;
#endif
    if (moe_model_forward(m, x, y, B, T, noise) != MOE_OK || moe_model_backward(m, scale) != MOE_OK) return 0;
    *loss = m->loss;
    *aux = m->aux_loss;
    return 1;
}

/* the gradient norm before clipping (NaN when the device failed) */
static float device_clip(device_run *dv, moe_model *m, float clip) {
#ifdef MOE_CUDA
    float norm;
    if (dv->on) return moe_clip_grad_norm_cuda(&dv->cu, &dv->mc.S, clip, &norm) == MOE_OK ? norm : NAN;
#else
    (void)dv;
#endif
    return moe_clip_grad_norm(&m->S, clip);
}

static int device_adamw(device_run *dv, moe_model *m, const moe_adamw_config *adam, float lr, long long step) {
#ifdef MOE_CUDA
    if (dv->on) return moe_adamw_step_cuda(&dv->cu, &dv->mc.S, adam, lr, step) == MOE_OK;
#else
    (void)dv;
#endif
    return moe_adamw_step(&m->S, adam, lr, step) == MOE_OK;
}

/* the device's parameters and moments into the host model (before evaluating or saving) */
static int device_to_host(device_run *dv, moe_model *m) {
#ifdef MOE_CUDA
    if (dv->on && moe_store_download_cuda(&dv->cu, &dv->mc.S, &m->S) != MOE_OK) {
        fprintf(stderr, "train_lm: copying the parameters from the device: %s\n", dv->cu.err.msg);
        return 0;
    }
#else
    (void)dv;
    (void)m;
#endif
    return 1;
}

#ifdef MOE_MPI
static int train_main(int argc, char **argv);
/* MPI around the program: rank 0 alone prints (the others' stdout goes to /dev/null, their
   errors stay on stderr); a rank that fails ends the job rather than leave the others waiting */
int main(int argc, char **argv) {
    int status, size = 1;
    MPI_Init(&argc, &argv);
    if (moe_mpi_init(&mpi, MPI_COMM_WORLD, 0) != MOE_OK) {
        fprintf(stderr, "train_lm: MPI: %s\n", mpi.err.msg);
        MPI_Abort(MPI_COMM_WORLD, 1);
    }
    size = mpi.size;
    if (mpi.rank != 0 && !freopen("/dev/null", "w", stdout)) fprintf(stderr, "train_lm: rank %d: cannot silence stdout\n", mpi.rank);
    status = train_main(argc, argv);
    moe_mpi_free(&mpi);
    if (status != 0 && size > 1) MPI_Abort(MPI_COMM_WORLD, status);
    MPI_Finalize();
    return status;
}
static int train_main(int argc, char **argv) {
#else
int main(int argc, char **argv) {
#endif
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
    int *x = NULL, *y = NULL, *src = NULL, i, l;
    char path[1024], ckpt[1024];
    FILE *csv = NULL;
    float *curve_x = NULL, *curve_train = NULL, *eval_x = NULL, *eval_y = NULL, *load = NULL;
    int n_eval = 0;
    double t0, last_loss = 0.0, last_bpb = NAN, *per_genre = NULL;
    const unsigned char *srcs[BROWN_GENRES];
    flag fl[64];
    flags_program prog;
    choices ch;
    char log_path[1024];
    long long saved_step = -1;
    int first_row = 0, rows = 0; /* this rank's rows of each micro-batch */
#ifdef MOE_MPI
    moe_mpi_experts *eps = NULL;
#endif
    int rc, status = 0, save_failed = 0, log_failed = 0, plot_failed = 0;
    moe_ckpt_info resume_info;
    device_run dev;
    unsigned char *state_blob = NULL; /* the resumed checkpoint's user blob, as first read */
    memset(&resume_info, 0, sizeof resume_info);
    memset(&dev, 0, sizeof dev);
    memset(&m, 0, sizeof m);
    memset(&cp, 0, sizeof cp);
    rc = parse_args(argc, argv, &cfg, &opt, &paths, &prog, fl, &ch);
    if (rc != FLAGS_RUN) return rc;
#ifndef MOE_CUDA
    if (paths.device == 1) return device_start(&dev, 1, NULL, 0, 0); /* says why not, before loading anything */
#endif
    snprintf(ckpt, sizeof ckpt, "%s/%s.ckpt", paths.out_dir, paths.name);
    memset(&st, 0, sizeof st);
    if (paths.resume) {
        /* the run's model and options come from the checkpoint, checked like flags before
           anything is allocated for them; only --steps may extend the run */
        moe_model_config user_cfg = cfg;
        train_options user_opt = opt;
        char why[1200], saved[600];
        if (moe_model_load_config(paths.resume, &cfg, &resume_info, &err) != MOE_OK) {
            fprintf(stderr, "train_lm: resume: %s\n", err.msg);
            return 1;
        }
        if (read_state(paths.resume, &resume_info, &st, &state_blob, why, sizeof why) == 0) {
            opt = st.opt;
            if (check_resumed(&prog, &cfg, &st, &resume_info, why, sizeof why) == 0) why[0] = 0;
        }
        if (why[0]) {
            fprintf(stderr, "train_lm: resume: '%s' %s\n", paths.resume, why);
            free(state_blob);
            return 1;
        }
        ch.router = router_index(&cfg.moe);
        ch.pos = cfg.pos == MOE_POS_ROPE;
        ch.balance = (int)cfg.moe.balance;
        if (resume_conflict(&prog, &user_cfg, &user_opt, &cfg, &opt, why, saved, sizeof saved)) {
            fprintf(stderr, "train_lm: %s conflicts with '%s', saved with %s: a resumed run keeps the model and the training options "
                            "it was saved with (only --steps may extend it); drop the flag, or start a new run without --resume\n",
                    why, paths.resume, saved);
            free(state_blob);
            return 2;
        }
        if (flags_find(&prog, &opt.steps)->seen && user_opt.steps < opt.steps)
            fprintf(stderr, "train_lm: note: --steps %d is below the checkpoint's run of %d steps; the run keeps %d\n", user_opt.steps,
                    opt.steps, opt.steps);
        opt.steps = user_opt.steps > opt.steps ? user_opt.steps : opt.steps;
    }
    if (!brown_load(&cp, paths.data_dir, opt.genres)) {
        free(state_blob);
        return 1;
    }
    /* from here every exit goes through `finish`, which frees what was allocated */
    if (paths.resume) {
        /* the model as the file describes it, its parameters and moments; the file must still
           hold the config and state checked above */
        size_t n = (size_t)resume_info.state_bytes;
        unsigned char *again = (unsigned char *)malloc(n);
        if (!again) {
            fprintf(stderr, "train_lm: resume: out of memory\n");
        } else if (moe_model_load(&m, paths.resume, opt.batch, opt.seq, &start_step, again, n, &err) != MOE_OK) {
            fprintf(stderr, "train_lm: resume: %s\n", err.msg);
            status = 1;
        } else if (memcmp(again, state_blob, n) != 0 || memcmp(&m.cfg, &cfg, sizeof cfg) != 0 || start_step != resume_info.step) {
            fprintf(stderr, "train_lm: resume: '%s' changed while it was being read\n", paths.resume);
            status = 1;
        }
        if (!again) status = 1;
        free(again);
        free(state_blob);
        if (status) goto finish;
    } else if (moe_model_init(&m, &cfg, opt.batch, opt.seq) != MOE_OK) {
        fprintf(stderr, "model: %s\n", m.err.msg);
        status = 2;
        goto finish;
    }
    for (i = 0; i < cp.n; i++) srcs[i] = cp.train[i];
    if (moe_loader_init(&ld, srcs, cp.train_len, cp.n, opt.seq, (uint64_t)opt.seed, &err) != MOE_OK) {
        fprintf(stderr, "data: %s\n", err.msg);
        status = 1;
        goto finish;
    }
    if (paths.resume) {
        ld.rng = st.loader.rng;
        ld.batches = st.loader.batches;
        printf("resumed %s at step %lld\n", paths.resume, start_step);
    } else {
        moe_model_init_weights(&m, (uint64_t)opt.seed);
        moe_rng_seed(&st.noise, (uint64_t)opt.seed + 7);
    }
    rows = opt.batch;
#ifdef MOE_MPI
    if (paths.data_parallel || paths.expert_parallel) {
        /* the reduction's buffer is the model's: the context is rebuilt for it */
        moe_mpi_free(&mpi);
        if (moe_mpi_init(&mpi, MPI_COMM_WORLD, m.S.numel) != MOE_OK || moe_mpi_check_model(&mpi, &m) != MOE_OK ||
            moe_mpi_check_same(&mpi, &opt, sizeof opt, "training options") != MOE_OK ||
            moe_mpi_share(&mpi, opt.batch, &first_row, &rows) != MOE_OK) {
            if (mpi.rank == 0) fprintf(stderr, "train_lm: MPI: %s\n", mpi.err.msg); /* the same on every rank */
            status = 2;
            goto finish;
        }
        mpi_ranks = mpi.size;
        mpi_expert_parallel = paths.expert_parallel;
        if (paths.expert_parallel && cfg.moe_every > 0) {
            eps = (moe_mpi_experts *)calloc((size_t)cfg.n_layers, sizeof *eps);
            if (!eps || moe_mpi_experts_model_init(eps, &mpi, &m) != MOE_OK) {
                if (mpi.rank == 0 || !eps) fprintf(stderr, "train_lm: MPI: %s\n", eps ? m.err.msg : "out of memory");
                free(eps);
                eps = NULL;
                status = 2;
                goto finish;
            }
        }
    } else if (mpi.size > 1) {
        if (mpi.rank == 0) fprintf(stderr, "train_lm: %d ranks: give --data-parallel or --expert-parallel\n", mpi.size);
        status = 2;
        goto finish;
    }
#endif
    adam = moe_adamw_config_default();
    adam.beta2 = opt.beta2;
    adam.weight_decay = opt.weight_decay;
    print_settings(&m, &opt, &paths, &cp, start_step);
    {
        files_err fe;
        if (files_mkdirs(paths.out_dir, &fe) != 0) {
            fprintf(stderr, "train_lm: %s\n", fe.msg);
            status = 1;
            goto finish;
        }
    }
    snprintf(path, sizeof path, "%s/%s.csv", paths.out_dir, paths.name);
    snprintf(log_path, sizeof log_path, "%s", path);
#ifdef MOE_MPI
    if (mpi.rank != 0) csv = fopen("/dev/null", "w"); /* rank 0 writes the log */
    else
#endif
    csv = open_log(log_path, paths.resume != NULL, start_step);
    if (!csv) {
        status = 1;
        goto finish;
    }
    x = (int *)malloc(sizeof(int) * (size_t)opt.batch * opt.seq);
    y = (int *)malloc(sizeof(int) * (size_t)opt.batch * opt.seq);
    src = (int *)malloc(sizeof(int) * (size_t)opt.batch);
    curve_x = (float *)malloc(sizeof(float) * (size_t)opt.steps);
    curve_train = (float *)malloc(sizeof(float) * (size_t)opt.steps);
    eval_x = (float *)malloc(sizeof(float) * (size_t)(opt.steps / (opt.eval_every > 0 ? opt.eval_every : opt.steps) + 2));
    eval_y = (float *)malloc(sizeof(float) * (size_t)(opt.steps / (opt.eval_every > 0 ? opt.eval_every : opt.steps) + 2));
    per_genre = (double *)malloc(sizeof(double) * (size_t)cp.n);
    if (cfg.moe_every > 0) load = (float *)calloc((size_t)cp.n * cfg.moe.n_experts, sizeof(float));
    if (!x || !y || !src || !curve_x || !curve_train || !eval_x || !eval_y || !per_genre || (cfg.moe_every > 0 && !load)) {
        fprintf(stderr, "train_lm: out of memory\n");
        status = 1;
        goto finish;
    }
    if ((rc = device_start(&dev, paths.device == 1, &m, opt.batch, opt.seq)) != 0) {
        status = rc;
        goto finish;
    }
    t0 = moe_time_seconds();
    for (step = start_step + 1; step <= opt.steps; step++) {
        float lr = moe_lr_cosine(step - 1, opt.warmup, opt.steps, opt.lr, opt.min_lr), norm;
        double loss = 0.0, aux = 0.0;
        int a;
        if (!device_zero_grad(&dev, &m)) {
            fprintf(stderr, "step %lld: %s\n", step, device_error(&dev, &m));
            status = 1;
            goto finish;
        }
        for (a = 0; a < opt.accum; a++) {
            /* every rank draws the whole micro-batch and trains on its rows of it */
            double l1, a1;
            moe_loader_next(&ld, x, y, src, opt.batch, opt.seq);
            if (!device_forward_backward(&dev, &m, x + (size_t)first_row * opt.seq, y + (size_t)first_row * opt.seq, rows, opt.seq,
                                         1.0f / (float)(opt.accum * (opt.batch / rows)), &st.noise, &l1, &a1)) {
                fprintf(stderr, "step %lld: %s\n", step, device_error(&dev, &m));
                status = 1;
                goto finish;
            }
            loss += l1 / opt.accum;
            aux += a1 / opt.accum;
        }
#ifdef MOE_MPI
        if (mpi_ranks > 1) {
            double la[2];
            la[0] = loss;
            la[1] = aux;
            if (moe_mpi_allreduce_grads(&mpi, &m.S) != MOE_OK || moe_mpi_sum_doubles(&mpi, la, 2) != MOE_OK) {
                fprintf(stderr, "step %lld: MPI: %s\n", step, mpi.err.msg);
                status = 1;
                goto finish;
            }
            loss = la[0] / mpi_ranks;
            aux = la[1] / mpi_ranks;
        }
#endif
        norm = device_clip(&dev, &m, opt.clip);
        if (!isfinite(loss) || !isfinite(aux) || !isfinite(norm)) {
            double bad = !isfinite(loss) ? loss : !isfinite(aux) ? aux : (double)norm;
            char what[96];
            snprintf(what, sizeof what, "the %s is %s", !isfinite(loss) ? "loss" : !isfinite(aux) ? "auxiliary loss" : "gradient norm",
                     bad != bad ? "not a number" : "infinite");
            status = diverged(step, what, ckpt, saved_step);
            goto finish;
        }
        if (!device_adamw(&dev, &m, &adam, lr, step)) {
            fprintf(stderr, "step %lld: %s\n", step, device_error(&dev, &m));
            status = 1;
            goto finish;
        }
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
        if (opt.load_every > 0 && step % opt.load_every == 0 && !dev.on)
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
        if (dev.on && (((opt.eval_every > 0 && step % opt.eval_every == 0) || step == opt.steps) ||
                       ((opt.save_every > 0 && step % opt.save_every == 0) || step == paths.stop_at)) &&
            !device_to_host(&dev, &m)) {
            status = 1;
            goto finish;
        }
        if ((opt.eval_every > 0 && step % opt.eval_every == 0) || step == opt.steps) {
            last_bpb = evaluate(&m, &cp, &opt, load, per_genre);
            eval_x[n_eval] = (float)step;
            eval_y[n_eval++] = (float)last_bpb;
            printf("eval step=%lld val_bpb=%.4f\n", step, last_bpb);
        }
        /* a row per step, flushed: after a crash the log holds every finished step */
        if (fprintf(csv, "%lld,%.6f,%.6f,%.6g,%.4f,%.6f\n", step, loss, aux, (double)lr, (double)norm, last_bpb) < 0 || fflush(csv) != 0) {
            if (!log_failed) fprintf(stderr, "train_lm: writing the log '%s' failed (disk full?); training goes on\n", log_path);
            log_failed = 1;
        }
        if ((opt.save_every > 0 && step % opt.save_every == 0) || step == opt.steps || step == paths.stop_at) {
            st.opt = opt;
            st.loader.rng = ld.rng;
            st.loader.batches = ld.batches;
            if (!params_finite(&m.S)) {
                status = diverged(step, "a parameter is not finite", ckpt, saved_step);
                goto finish;
            }
            rc = MOE_OK;
#ifdef MOE_MPI
            if (mpi.rank == 0)
#endif
            rc = save_checkpoint(&m, ckpt, step, &st, &err);
#ifdef MOE_MPI
            rc = moe_mpi_root_status(&mpi, (moe_status)rc, &err); /* rank 0 wrote it; every rank learns how it went */
#endif
            if (rc != MOE_OK) {
                fprintf(stderr, "train_lm: checkpoint at step %lld: %s\n", step, err.msg);
                save_failed = 1;
            } else {
                saved_step = step;
                save_failed = 0; /* a later save supersedes a failed one */
            }
        }
        if (step == paths.stop_at) {
            if (fclose(csv) != 0) log_failed = 1;
            csv = NULL;
            if (save_failed) {
                fprintf(stderr, "train_lm: stopped at step %lld without a checkpoint of it\n", step);
                status = 1;
            } else {
                printf("stopped at step %lld; continue with --resume %s\n", step, ckpt);
                status = log_failed;
            }
            goto finish;
        }
    }
    if (fclose(csv) != 0 && !log_failed) {
        fprintf(stderr, "train_lm: writing the log '%s' failed (disk full?)\n", log_path);
        log_failed = 1;
    }
    csv = NULL;
    if (start_step >= opt.steps) last_bpb = evaluate(&m, &cp, &opt, load, per_genre);
    else last_bpb = eval_y[n_eval - 1];
    printf("\nvalidation bits per byte by genre:\n");
    for (i = 0; i < cp.n; i++) printf("  %-16s %.4f\n", cp.names[i], per_genre[i]);
    /* plots */
#ifdef MOE_MPI
    if (mpi.rank != 0) goto sample; /* rank 0 draws them */
#endif
    if (step - 1 > start_step) {
        plot_series s[2];
        plot_chart ch;
        memset(s, 0, sizeof s);
        memset(&ch, 0, sizeof ch);
        s[0].name = "train"; s[0].x = curve_x + start_step; s[0].y = curve_train + start_step; s[0].n = (int)(opt.steps - start_step);
        s[1].name = "validation"; s[1].x = eval_x; s[1].y = eval_y; s[1].n = n_eval; s[1].style = PLOT_LINE_POINTS;
        ch.title = paths.name; ch.xlabel = "step"; ch.ylabel = "bits per byte";
        snprintf(path, sizeof path, "%s/%s_loss.png", paths.out_dir, paths.name);
        if (plot_lines(path, &ch, s, n_eval > 0 ? 2 : 1) != 0) { fprintf(stderr, "train_lm: could not write %s\n", path); plot_failed = 1; }
    }
    if (load) {
        plot_heatmap_opts h;
        memset(&h, 0, sizeof h);
        h.title = "expert load per genre (first MoE layer, validation)";
        h.xlabel = "expert";
        h.row_labels = cp.names;
        h.v_min = 0.0f;
        snprintf(path, sizeof path, "%s/%s_load.png", paths.out_dir, paths.name);
        if (plot_heatmap(path, &h, load, cp.n, cfg.moe.n_experts) != 0) { fprintf(stderr, "train_lm: could not write %s\n", path); plot_failed = 1; }
    }
    /* a sample, on the KV cache (moe_model_generate_batch), by every rank (expert parallelism
       needs them all). The cache holds the trained context (opt.seq positions); when it is
       full, generation goes on from the last half of what is written (the prompt of the next
       piece), as llama.cpp's context shift does. */
#ifdef MOE_MPI
sample:
#endif
    if (paths.sample_bytes > 0 && !(cfg.moe_every > 0 && cfg.moe.router == MOE_ROUTER_EXPERT_CHOICE)) {
        int np = (int)strlen(paths.prompt), *buf = (int *)malloc(sizeof(int) * (size_t)(np + paths.sample_bytes + 1)), n;
        moe_kv_cache kc;
        moe_gen_seq q;
        moe_status st;
        if (np == 0) { paths.prompt = " "; np = 1; }
        if (np > m.max_T / 2) np = m.max_T / 2; /* a prompt longer than half the context: its start */
        for (i = 0; i < np; i++) buf[i] = (unsigned char)paths.prompt[i];
        memset(&q, 0, sizeof q);
        q.sampler.temperature = paths.temperature; q.sampler.top_k = paths.top_k; q.sampler.top_p = paths.top_p;
        q.stop = -1;
        moe_rng_seed(&q.rng, (uint64_t)opt.seed + 99);
        st = moe_kv_cache_init(&kc, &m, 1, m.max_T);
        if (st != MOE_OK) fprintf(stderr, "sample: %s\n", kc.err.msg);
        for (n = np; st == MOE_OK && n < np + paths.sample_bytes; n += q.n_out) {
            int keep = n < m.max_T / 2 ? n : m.max_T / 2, left = np + paths.sample_bytes - n;
            q.prompt = buf + n - keep;
            q.n_prompt = keep;
            q.max_new = left < m.max_T - keep + 1 ? left : m.max_T - keep + 1;
            q.out = buf + n;
            st = moe_model_generate_batch(&m, &kc, &q, 1);
            if (st != MOE_OK) fprintf(stderr, "sample: %s\n", m.err.msg);
        }
        if (st == MOE_OK) {
            printf("\nsample (temperature %.2g, top-p %.2g):\n---\n", (double)q.sampler.temperature, (double)q.sampler.top_p);
            for (i = 0; i < np + paths.sample_bytes; i++) putchar((buf[i] >= 32 && buf[i] < 127) || buf[i] == '\n' ? buf[i] : '?');
            printf("\n---\n");
        }
        moe_kv_cache_free(&kc);
        free(buf);
    }
    printf("result name=%s val_bpb=%.4f train_loss=%.4f params_total=%zu params_active=%zu tok_s=%.0f steps=%lld\n", paths.name, last_bpb,
           last_loss, moe_model_params_total(&m), moe_model_params_active(&m),
           (double)(opt.steps - start_step) * opt.batch * opt.seq * opt.accum / (moe_time_seconds() - t0 + 1e-9), (long long)opt.steps);
    printf("wrote %s/%s.csv, %s/%s_loss.png%s, %s\n", paths.out_dir, paths.name, paths.out_dir, paths.name, load ? ", *_load.png" : "", ckpt);
    /* a run whose last checkpoint or an output file failed did not do what it says: a later
       --resume would continue an older state */
    if (save_failed && saved_step >= 0) fprintf(stderr, "train_lm: the final checkpoint was not written; '%s' holds step %lld\n", ckpt, saved_step);
    else if (save_failed) fprintf(stderr, "train_lm: the final checkpoint was not written\n");
    status = save_failed || log_failed || plot_failed;
finish:
    device_stop(&dev);
    if (csv) fclose(csv);
#ifdef MOE_MPI
    if (eps) moe_mpi_experts_model_free(eps, &m);
    free(eps);
#endif
    moe_model_free(&m);
    brown_free(&cp);
    free(x); free(y); free(src); free(curve_x); free(curve_train); free(eval_x); free(eval_y); free(per_genre); free(load);
    return status;
}
