/* test_plot.c - examples/plot.h: writes line charts and heatmaps into a
 * temporary folder, reads the PNGs back with stb_image and checks what is in
 * them; checks that bad arguments and failed writes return an error and leave
 * an existing file alone. PLOT_TEST_KEEP=1 keeps the folder to look at.
 *
 *   gcc -std=c99 -I. -Iexamples -I/usr/include/stb tests/test_plot.c -lm
 */
#define _POSIX_C_SOURCE 200809L
#define PLOT_IMPLEMENTATION
#include "../examples/plot.h"

#if defined(__GNUC__) || defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wunused-function"
#pragma GCC diagnostic ignored "-Wmissing-field-initializers"
#pragma GCC diagnostic ignored "-Wsign-compare"
#pragma GCC diagnostic ignored "-Wunused-parameter"
#endif
#define STB_IMAGE_IMPLEMENTATION
#include <stb_image.h>
#if defined(__GNUC__) || defined(__clang__)
#pragma GCC diagnostic pop
#endif

#include <sys/stat.h>
#include <unistd.h>

#include "test.h"

static char dir[64];

static const char *at(const char *name) { /* dir/name; valid for the next 3 calls */
    static char buf[4][256];
    static int k = 0;
    k = (k + 1) % 4;
    snprintf(buf[k], sizeof buf[k], "%s/%s", dir, name);
    return buf[k];
}

static int file_exists(const char *path) {
    struct stat st;
    return stat(path, &st) == 0;
}

static int file_equals(const char *path, const char *text) {
    char buf[256];
    size_t n;
    FILE *f = fopen(path, "rb");
    if (!f) return 0;
    n = fread(buf, 1, sizeof buf, f);
    fclose(f);
    return n == strlen(text) && memcmp(buf, text, n) == 0;
}

static void write_text(const char *path, const char *text) {
    FILE *f = fopen(path, "wb");
    if (!f) return;
    fputs(text, f);
    fclose(f);
}

typedef struct image {
    int w, h;
    unsigned char *rgb;
} image;

static image load(const char *path) {
    image im;
    int comp = 0;
    im.rgb = stbi_load(path, &im.w, &im.h, &comp, 3);
    if (!im.rgb) im.w = im.h = 0;
    return im;
}

static unsigned pixel(const image *im, int x, int y) {
    const unsigned char *p = im->rgb + 3 * ((size_t)y * im->w + x);
    return (unsigned)p[0] << 16 | (unsigned)p[1] << 8 | p[2];
}

static int count_color(const image *im, int x0, int y0, int x1, int y1, unsigned color) {
    int x, y, n = 0;
    for (y = y0; y < y1; y++)
        for (x = x0; x < x1; x++) n += pixel(im, x, y) == color;
    return n;
}

/* centroid of the pixels of `color` that lie in horizontal runs of at least min_run */
static int run_centroid(const image *im, unsigned color, int min_run, double *cx, double *cy) {
    int x, y, n = 0;
    double sx = 0, sy = 0;
    for (y = 0; y < im->h; y++)
        for (x = 0; x < im->w;) {
            int e = x;
            while (e < im->w && pixel(im, e, y) == color) e++;
            if (e - x >= min_run) {
                n += e - x;
                sx += (x + e - 1) * 0.5 * (e - x);
                sy += (double)y * (e - x);
            }
            x = e > x ? e : x + 1;
        }
    if (n) *cx = sx / n, *cy = sy / n;
    return n;
}

static void test_lines(void) {
    float x[21], y[21], px[6] = {1, 2, 3, 4, 5, 6}, py[6] = {9, 8, NAN, 2, 1, 0.5f};
    plot_series s[2];
    plot_chart ch;
    image im;
    int i, mid = 0;
    TEST_BEGIN("plot_lines: line and scatter series");
    for (i = 0; i < 21; i++) x[i] = 0.5f * i, y[i] = 0.5f * i; /* y = x on [0, 10] */
    memset(s, 0, sizeof s);
    memset(&ch, 0, sizeof ch);
    s[0].name = "y = x";
    s[0].x = x, s[0].y = y, s[0].n = 21; /* automatic colour: palette[0] */
    s[1].name = "points";
    s[1].x = px, s[1].y = py, s[1].n = 6, s[1].style = PLOT_POINTS, s[1].color = 0xff00ff;
    ch.title = "Lines test", ch.xlabel = "x", ch.ylabel = "y";
    ch.width = 640, ch.height = 400;
    CHECK(plot_lines(at("lines.png"), &ch, s, 2) == PLOT_OK, "plot_lines failed");
    CHECK(!file_exists(at("lines.png.tmp")), "temporary file left behind");
    im = load(at("lines.png"));
    CHECK(im.rgb && im.w == 640 && im.h == 400, "lines.png is %dx%d, want 640x400", im.w, im.h);
    if (!im.rgb) return;
    CHECK(pixel(&im, 0, 0) == 0xffffff, "background %06x, want white", pixel(&im, 0, 0));
    /* the diagonal crosses the middle rows of the image well inside the plot area */
    for (i = im.w / 4; i < 3 * im.w / 4; i++)
        mid += count_color(&im, i, im.h / 2 - 3, i + 1, im.h / 2 + 3, 0x1f77b4) > 0;
    CHECK(mid >= 2 && mid <= 20, "line colour in %d middle columns, want a short crossing", mid);
    i = count_color(&im, 0, 0, im.w, im.h, 0x1f77b4);
    CHECK(i > 2 * 400, "only %d pixels of the line colour", i);
    i = count_color(&im, 0, 0, im.w, im.h, 0xff00ff);
    CHECK(i >= 5 * 15 && i < 10 * 40, "%d scatter pixels for 5 finite points", i);
    i = count_color(&im, 0, 0, im.w, im.h, PLOT__INK);
    CHECK(i > 500, "only %d text pixels (title, labels, ticks)", i);
    stbi_image_free(im.rgb);
}

/* the kinds of chart the examples draw, for the eye; checks that they are written */
static void test_examples(void) {
    enum { N = 600, M = 300 };
    static float step[N], train[N], val[N], len[M], reward[M], fx[50], fy[50];
    unsigned seed = 12345;
    plot_series s[3];
    plot_chart ch;
    image im;
    int i;
    TEST_BEGIN("plot_lines: log-scale loss curves, scatter with a fitted curve");
    for (i = 0; i < N; i++) {
        seed = seed * 1664525u + 1013904223u;
        step[i] = 10.0f * i;
        train[i] = 2.5f * expf(-i / 120.0f) + 0.08f + 0.05f * (float)(seed >> 8) / 16777216.0f;
        val[i] = 2.5f * expf(-i / 150.0f) + 0.15f;
    }
    train[100] = NAN, train[101] = -1.0f; /* skipped on a log axis */
    memset(s, 0, sizeof s);
    memset(&ch, 0, sizeof ch);
    s[0].name = "train", s[0].x = step, s[0].y = train, s[0].n = N;
    s[1].name = "validation", s[1].x = step, s[1].y = val, s[1].n = N;
    ch.title = "Loss", ch.xlabel = "step", ch.ylabel = "cross-entropy", ch.log_y = 1;
    CHECK(plot_lines(at("loss.png"), &ch, s, 2) == PLOT_OK, "log-scale plot failed");
    im = load(at("loss.png"));
    CHECK(im.w == 720 && im.h == 450, "default size %dx%d, want 720x450", im.w, im.h);
    stbi_image_free(im.rgb);

    for (i = 0; i < M; i++) {
        seed = seed * 1664525u + 1013904223u;
        len[i] = 20.0f + 480.0f * (float)(seed >> 8) / 16777216.0f;
        seed = seed * 1664525u + 1013904223u;
        reward[i] = 1.5f - 0.004f * len[i] + 0.6f * ((float)(seed >> 8) / 16777216.0f - 0.5f);
    }
    for (i = 0; i < 50; i++) fx[i] = 20.0f + 480.0f * i / 49.0f, fy[i] = 1.5f - 0.004f * fx[i];
    memset(s, 0, sizeof s);
    memset(&ch, 0, sizeof ch);
    s[0].name = "samples", s[0].x = len, s[0].y = reward, s[0].n = M, s[0].style = PLOT_POINTS;
    s[1].name = "fit: 1.5 - 0.004 len", s[1].x = fx, s[1].y = fy, s[1].n = 50;
    ch.title = "Reward vs length", ch.xlabel = "response length (tokens)", ch.ylabel = "reward";
    CHECK(plot_lines(at("scatter.png"), &ch, s, 2) == PLOT_OK, "scatter plot failed");

    TEST_BEGIN("plot_lines: nothing finite, fixed ranges, one point");
    for (i = 0; i < 6; i++) fy[i] = NAN;
    memset(s, 0, sizeof s);
    s[0].y = fy, s[0].n = 6;
    CHECK(plot_lines(at("nan.png"), NULL, s, 1) == PLOT_OK, "all-NaN series should still plot");
    memset(&ch, 0, sizeof ch);
    ch.x_min = -1, ch.x_max = 1, ch.y_min = 0.5f, ch.y_max = 0.25f; /* y: automatic */
    s[0].y = val, s[0].n = N; /* x 0..599 mostly outside [-1, 1]: clipped */
    s[1].y = val, s[1].n = 1, s[1].style = PLOT_LINE_POINTS;
    CHECK(plot_lines(at("clip.png"), &ch, s, 2) == PLOT_OK, "fixed-range plot failed");
    ch.log_y = 1, ch.y_min = -1, ch.y_max = 10;
    CHECK(plot_lines(at("clip.png"), &ch, s, 2) == PLOT_ERR_ARG, "log axis from -1 accepted");
}

static void test_heatmap(void) {
    /* unique maximum at row 1, column 2; unique minimum at row 2, column 0 */
    static const float v[3 * 4] = {0.4f, 0.5f, 0.3f, 0.6f, 0.45f, 0.2f, 0.9f, 0.35f,
                                    -0.1f, 0.25f, NAN, 0.55f};
    static const char *rows[3] = {"layer 0", "layer 1", "layer 2"};
    static const char *cols[4] = {"e0", "e1", "e2", "e3"};
    static float load_[8 * 64];
    plot_heatmap_opts o;
    image im;
    double hx = 0, hy = 0, lx = 0, ly = 0;
    int n_hi, n_lo, i;
    TEST_BEGIN("plot_heatmap: extreme cells carry the colour map's end colours");
    CHECK(plot_colormap(1.0) == 0xfde725 && plot_colormap(0.0) == 0x440154 &&
              plot_colormap(7.0) == 0xfde725 && plot_colormap(NAN) == 0x440154,
          "colour map ends %06x %06x", plot_colormap(1.0), plot_colormap(0.0));
    memset(&o, 0, sizeof o);
    o.title = "Heat", o.xlabel = "expert", o.ylabel = "layer";
    o.row_labels = rows, o.col_labels = cols, o.cell = 40;
    CHECK(plot_heatmap(at("heat.png"), &o, v, 3, 4) == PLOT_OK, "plot_heatmap failed");
    im = load(at("heat.png"));
    CHECK(im.rgb && im.w > 4 * 40 && im.h > 3 * 40 && im.w < 400 && im.h < 300,
          "heat.png is %dx%d", im.w, im.h);
    if (!im.rgb) return;
    /* cells are 40 pixels wide; the colour bar is narrower, so runs >= 30 are cells */
    n_hi = run_centroid(&im, 0xfde725, 30, &hx, &hy);
    n_lo = run_centroid(&im, 0x440154, 30, &lx, &ly);
    CHECK(n_hi == 40 * 40, "%d pixels of the top colour in cells, want one 40x40 cell", n_hi);
    CHECK(n_lo == 40 * 40, "%d pixels of the bottom colour in cells, want one", n_lo);
    CHECK(fabs((hx - lx) - 2 * 40) < 0.5 && fabs((hy - ly) + 40) < 0.5,
          "max cell is (%+.1f, %+.1f) px from the min cell, want (+80, -40)", hx - lx, hy - ly);
    n_hi = run_centroid(&im, PLOT__NAN_CELL, 30, &hx, &hy);
    CHECK(n_hi == 40 * 40 && fabs(hx - lx - 2 * 40) < 0.5 && fabs(hy - ly) < 0.5,
          "NaN cell: %d grey pixels at (%+.1f, %+.1f) from the min", n_hi, hx - lx, hy - ly);
    i = count_color(&im, 0, 0, im.w, im.h, 0xfde725);
    CHECK(i > n_lo, "colour bar top missing (%d top-colour pixels)", i);
    stbi_image_free(im.rgb);

    TEST_BEGIN("plot_heatmap: expert load, index labels, annotations");
    for (i = 0; i < 8 * 64; i++) load_[i] = (float)((i * 37) % 64) / 64.0f + (i / 64) * 0.05f;
    memset(&o, 0, sizeof o);
    o.title = "Expert load", o.xlabel = "expert", o.ylabel = "layer";
    CHECK(plot_heatmap(at("load.png"), &o, load_, 8, 64) == PLOT_OK, "8x64 heatmap failed");
    memset(&o, 0, sizeof o);
    o.annotate = 1, o.v_min = 0, o.v_max = 1;
    CHECK(plot_heatmap(at("annot.png"), &o, v, 3, 4) == PLOT_OK, "annotated heatmap failed");
}

static void test_font(void) {
    plot_canvas c;
    int i, j, same = 0, blank = 0;
    TEST_BEGIN("font: 95 distinct glyphs, text width");
    CHECK(plot_text_width("abc", 1) == 17 && plot_text_width("abc", 2) == 34 &&
              plot_text_width("", 1) == 0 && plot_text_width(NULL, 1) == 0,
          "text widths %d %d", plot_text_width("abc", 1), plot_text_width("abc", 2));
    if (plot_canvas_init(&c, 6 * 95, 8, 0xffffff) != PLOT_OK) return;
    for (i = 32; i < 127; i++) {
        char s[2];
        s[0] = (char)i, s[1] = 0;
        plot_draw_text(&c, 6 * (i - 32), 0, s, 1, 0, 0);
    }
    for (i = 1; i < 95; i++) { /* every glyph but the space has ink and differs from the others */
        int ink = 0;
        for (j = 0; j < 8 * 5; j++) ink += c.rgb[3 * (c.w * (j / 5) + 6 * i + j % 5)] == 0;
        blank += ink == 0;
        for (j = 1; j < i; j++) {
            int r, d = 0;
            for (r = 0; r < 8; r++)
                d |= memcmp(c.rgb + 3 * (c.w * r + 6 * i), c.rgb + 3 * (c.w * r + 6 * j), 15);
            same += d == 0;
        }
    }
    CHECK(blank == 0 && same == 0, "%d blank glyphs, %d identical pairs", blank, same);
    plot_canvas_free(&c);
}

static void test_errors(void) {
    float y[3] = {1, 2, 3};
    plot_series s[2];
    plot_chart ch;
    image im;
    char keep[256];
    int i;
    TEST_BEGIN("bad arguments: an error, and an existing file stays as it was");
    snprintf(keep, sizeof keep, "%s", at("keep.png"));
    write_text(keep, "sentinel");
    memset(s, 0, sizeof s);
    memset(&ch, 0, sizeof ch);
    s[0].y = y, s[0].n = 3, s[1] = s[0];
    CHECK(plot_lines(keep, &ch, s, 0) != 0, "n_series 0 accepted");
    CHECK(plot_lines(keep, &ch, s, -1) != 0, "n_series -1 accepted");
    CHECK(plot_lines(keep, &ch, NULL, 1) != 0, "NULL series accepted");
    CHECK(plot_lines(NULL, &ch, s, 1) != 0 && plot_lines("", &ch, s, 1) != 0, "no path accepted");
    s[1].n = 0;
    CHECK(plot_lines(keep, &ch, s, 2) != 0, "series with n = 0 accepted");
    s[1].n = 3, s[1].y = NULL;
    CHECK(plot_lines(keep, &ch, s, 2) != 0, "series with NULL y accepted");
    s[1].y = y, s[1].style = 7;
    CHECK(plot_lines(keep, &ch, s, 2) != 0, "unknown style accepted");
    ch.width = 20;
    CHECK(plot_lines(keep, &ch, s, 1) != 0, "20 pixel wide chart accepted");
    ch.width = -5;
    CHECK(plot_lines(keep, &ch, s, 1) != 0, "negative width accepted");
    ch.width = 0;
    CHECK(plot_heatmap(keep, NULL, NULL, 2, 2) != 0, "NULL heatmap values accepted");
    CHECK(plot_heatmap(keep, NULL, y, 0, 2) != 0 && plot_heatmap(keep, NULL, y, 1, -3) != 0,
          "empty heatmap accepted");
    CHECK(file_equals(keep, "sentinel"), "a failed call changed %s", keep);
    CHECK(!file_exists(at("keep.png.tmp")), "a failed call left keep.png.tmp");

    TEST_BEGIN("failed writes: an error, and an existing file stays as it was");
    CHECK(plot_lines(at("no/such/dir/x.png"), NULL, s, 1) == PLOT_ERR_IO,
          "write into a missing folder did not fail with PLOT_ERR_IO");
    mkdir(at("keep.png.tmp"), 0700); /* the temporary file cannot be created */
    CHECK(plot_lines(keep, NULL, s, 1) == PLOT_ERR_IO, "blocked temporary file not reported");
    CHECK(file_equals(keep, "sentinel"), "a failed write changed %s", keep);
    CHECK(file_exists(at("keep.png.tmp")), "the folder in the way was removed");
    rmdir(at("keep.png.tmp"));
    CHECK(plot_lines(keep, NULL, s, 1) == PLOT_OK, "writing over an existing file failed");
    im = load(keep);
    CHECK(im.w == 720 && im.h == 450, "replaced file is %dx%d, not the new chart", im.w, im.h);
    stbi_image_free(im.rgb);
    i = plot_canvas_save(NULL, keep);
    CHECK(i == PLOT_ERR_ARG, "plot_canvas_save(NULL) returned %d", i);
}

static void cleanup(void) {
    static const char *names[] = {"lines.png", "loss.png", "scatter.png", "nan.png", "clip.png",
                                  "heat.png", "load.png", "annot.png", "keep.png", "keep.png.tmp"};
    size_t i;
    if (getenv("PLOT_TEST_KEEP")) {
        printf("   kept %s\n", dir);
        return;
    }
    for (i = 0; i < sizeof names / sizeof names[0]; i++) remove(at(names[i]));
    rmdir(dir);
}

int main(void) {
    (void)test_grad, (void)test_close, (void)test_shared_data; /* harness parts unused here */
    snprintf(dir, sizeof dir, "/tmp/plot_test_XXXXXX");
    if (!mkdtemp(dir)) {
        CHECK(0, "mkdtemp failed");
        return test_summary();
    }
    test_lines();
    test_examples();
    test_heatmap();
    test_font();
    test_errors();
    cleanup();
    return test_summary();
}
