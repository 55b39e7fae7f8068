/* plot.h - a tiny single-header PNG plotting helper for the examples.
 *
 * Line charts (several named series, lines and/or scatter points, nice ticks,
 * optional log-scale y, legend) and heatmaps (viridis-like colour map, row and
 * column labels, colour bar), drawn on an RGB8 canvas with a built-in 5x8
 * bitmap font and written with stb_image_write.
 *
 *   #define PLOT_IMPLEMENTATION      // in exactly one .c file
 *   #include "plot.h"                // needs -I/usr/include/stb
 *
 *   float loss[100]; ...
 *   plot_series s; plot_chart c;
 *   memset(&s, 0, sizeof s); memset(&c, 0, sizeof c);
 *   s.name = "train"; s.y = loss; s.n = 100;          // x NULL: 0..n-1
 *   c.title = "loss"; c.xlabel = "step"; c.log_y = 1;
 *   if (plot_lines("out/loss.png", &c, &s, 1) != 0) ...;
 *
 * Every function that writes a file returns 0 (PLOT_OK) on success and a
 * negative PLOT_ERR_* code on failure; nothing is printed and nothing aborts.
 * Files are written to "<path>.tmp", synced (POSIX) and renamed onto <path>,
 * so a failed call or a crash never destroys an existing file. Non-finite
 * values are skipped (a line joins the points on either side); heatmap cells
 * that are NaN are drawn grey.
 * The implementation defines STB_IMAGE_WRITE_IMPLEMENTATION (static), so a
 * translation unit with PLOT_IMPLEMENTATION must not include stb_image_write.h
 * itself. No global mutable state: calls are safe from several threads.
 * PLOT_STATIC (in every file) makes all functions static; PLOTDEF overrides
 * the declaration qualifier.
 */
#ifndef PLOT_H
#define PLOT_H

#ifndef PLOTDEF
#ifdef PLOT_STATIC
#define PLOTDEF static
#else
#define PLOTDEF extern
#endif
#endif

#ifdef __cplusplus
extern "C" {
#endif

enum { PLOT_OK = 0, PLOT_ERR_ARG = -1, PLOT_ERR_NOMEM = -2, PLOT_ERR_IO = -3 };

/* plot_series.style */
enum { PLOT_LINE = 0, PLOT_POINTS = 1, PLOT_LINE_POINTS = 2 };

/* plot_chart.legend */
enum {
    PLOT_LEGEND_AUTO = 0, /* the corner of the plot area that hides the least data */
    PLOT_LEGEND_NONE,
    PLOT_LEGEND_TOP_RIGHT,
    PLOT_LEGEND_TOP_LEFT,
    PLOT_LEGEND_BOTTOM_RIGHT,
    PLOT_LEGEND_BOTTOM_LEFT
};

typedef struct plot_series {
    const char *name; /* legend text; NULL or "" keeps the series out of the legend */
    const float *x;   /* n x values, or NULL for 0, 1, ..., n-1 */
    const float *y;   /* n y values (required) */
    int n;            /* number of points, > 0 */
    int style;        /* PLOT_LINE (0), PLOT_POINTS or PLOT_LINE_POINTS */
    unsigned color;   /* 0xRRGGBB; 0 takes the next palette colour (black: 0x010101) */
} plot_series;

typedef struct plot_chart {
    const char *title, *xlabel, *ylabel; /* each may be NULL */
    int width, height;                   /* image size in pixels; 0 means 720 x 450 */
    int log_y;                           /* non-zero: log10 y axis; y <= 0 is skipped */
    int legend;                          /* PLOT_LEGEND_* */
    float x_min, x_max;                  /* fixed x range when x_min < x_max, else automatic */
    float y_min, y_max;                  /* fixed y range when y_min < y_max, else automatic */
} plot_chart;

typedef struct plot_heatmap_opts {
    const char *title, *xlabel, *ylabel; /* each may be NULL */
    const char *const *row_labels;       /* rows strings, or NULL for row indices */
    const char *const *col_labels;       /* cols strings, or NULL for column indices */
    int cell;                            /* square cells of this many pixels; 0: automatic */
    int annotate;                        /* non-zero: print each value in its cell if it fits */
    float v_min, v_max;                  /* colour range when v_min < v_max, else data min/max */
} plot_heatmap_opts;

/* One chart of n_series series; chart may be NULL for defaults. */
PLOTDEF int plot_lines(const char *path, const plot_chart *chart, const plot_series *series,
                       int n_series);

/* values: rows x cols, row-major, row 0 drawn at the top; opts may be NULL. */
PLOTDEF int plot_heatmap(const char *path, const plot_heatmap_opts *opts, const float *values,
                         int rows, int cols);

/* The colour map: t in [0, 1] (clamped) to 0xRRGGBB; 0 is dark purple, 1 yellow. */
PLOTDEF unsigned plot_colormap(double t);

/* The canvas underneath, for custom drawings. Coordinates are pixels, (0,0) is
 * the top-left pixel; drawing is limited to the clip rectangle. */
typedef struct plot_canvas {
    int w, h;
    unsigned char *rgb;                     /* w * h * 3 bytes, top row first */
    int clip_x0, clip_y0, clip_x1, clip_y1; /* drawing limited to [x0,x1) x [y0,y1) */
} plot_canvas;

PLOTDEF int plot_canvas_init(plot_canvas *c, int w, int h, unsigned background); /* 0 or error */
PLOTDEF void plot_canvas_free(plot_canvas *c);
PLOTDEF void plot_canvas_clip(plot_canvas *c, int x, int y, int w, int h); /* w or h <= 0: all */
PLOTDEF void plot_fill_rect(plot_canvas *c, int x, int y, int w, int h, unsigned color);
PLOTDEF void plot_draw_line(plot_canvas *c, double x0, double y0, double x1, double y1,
                            int thickness, unsigned color);
PLOTDEF void plot_fill_circle(plot_canvas *c, double cx, double cy, double r, unsigned color);
/* Printable ASCII, 6*scale pixels a character, 8*scale tall; others show '?'.
 * (x, y) is the top-left of the text's box; vertical text reads bottom to top. */
PLOTDEF int plot_text_width(const char *s, int scale);
PLOTDEF void plot_draw_text(plot_canvas *c, int x, int y, const char *s, int scale, int vertical,
                            unsigned color);
PLOTDEF int plot_canvas_save(const plot_canvas *c, const char *path); /* PNG via "<path>.tmp" */

#ifdef __cplusplus
}
#endif

#endif /* PLOT_H */

/* ------------------------------------------------------------------------- */
#ifdef PLOT_IMPLEMENTATION
#ifndef PLOT_IMPLEMENTATION_DONE
#define PLOT_IMPLEMENTATION_DONE

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#if defined(__unix__) || defined(__APPLE__)
#include <fcntl.h>  /* open: the directory, to sync a rename */
#include <unistd.h> /* fsync */
#define PLOT__POSIX 1
#if !defined(__cplusplus) && defined(__STRICT_ANSI__)
extern int fileno(FILE *); /* POSIX; hidden by strict -std=c99 headers */
#endif
#endif

#if defined(__GNUC__) || defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wunused-function"
#pragma GCC diagnostic ignored "-Wmissing-field-initializers"
#pragma GCC diagnostic ignored "-Wsign-compare"
#pragma GCC diagnostic ignored "-Wunused-parameter"
#endif
#define STB_IMAGE_WRITE_STATIC
#define STB_IMAGE_WRITE_IMPLEMENTATION
#include <stb_image_write.h>
#if defined(__GNUC__) || defined(__clang__)
#pragma GCC diagnostic pop
#endif

/* 5x8 glyphs for ASCII 32..126: 8 rows (the last for descenders), bit 4 = left column. */
static const unsigned char plot__font[95][8] = {
    {0x00,0x00,0x00,0x00,0x00,0x00,0x00,0x00}, {0x04,0x04,0x04,0x04,0x04,0x00,0x04,0x00}, /* sp ! */
    {0x0a,0x0a,0x0a,0x00,0x00,0x00,0x00,0x00}, {0x0a,0x0a,0x1f,0x0a,0x1f,0x0a,0x0a,0x00}, /* " # */
    {0x04,0x0f,0x14,0x0e,0x05,0x1e,0x04,0x00}, {0x18,0x19,0x02,0x04,0x08,0x13,0x03,0x00}, /* $ % */
    {0x0c,0x12,0x14,0x08,0x15,0x12,0x0d,0x00}, {0x04,0x04,0x08,0x00,0x00,0x00,0x00,0x00}, /* & ' */
    {0x02,0x04,0x08,0x08,0x08,0x04,0x02,0x00}, {0x08,0x04,0x02,0x02,0x02,0x04,0x08,0x00}, /* ( ) */
    {0x00,0x04,0x15,0x0e,0x15,0x04,0x00,0x00}, {0x00,0x04,0x04,0x1f,0x04,0x04,0x00,0x00}, /* * + */
    {0x00,0x00,0x00,0x00,0x00,0x04,0x04,0x08}, {0x00,0x00,0x00,0x1f,0x00,0x00,0x00,0x00}, /* , - */
    {0x00,0x00,0x00,0x00,0x00,0x0c,0x0c,0x00}, {0x00,0x01,0x02,0x04,0x08,0x10,0x00,0x00}, /* . / */
    {0x0e,0x11,0x13,0x15,0x19,0x11,0x0e,0x00}, {0x04,0x0c,0x04,0x04,0x04,0x04,0x0e,0x00}, /* 0 1 */
    {0x0e,0x11,0x01,0x02,0x04,0x08,0x1f,0x00}, {0x1f,0x02,0x04,0x02,0x01,0x11,0x0e,0x00}, /* 2 3 */
    {0x02,0x06,0x0a,0x12,0x1f,0x02,0x02,0x00}, {0x1f,0x10,0x1e,0x01,0x01,0x11,0x0e,0x00}, /* 4 5 */
    {0x06,0x08,0x10,0x1e,0x11,0x11,0x0e,0x00}, {0x1f,0x01,0x02,0x04,0x08,0x08,0x08,0x00}, /* 6 7 */
    {0x0e,0x11,0x11,0x0e,0x11,0x11,0x0e,0x00}, {0x0e,0x11,0x11,0x0f,0x01,0x02,0x0c,0x00}, /* 8 9 */
    {0x00,0x0c,0x0c,0x00,0x0c,0x0c,0x00,0x00}, {0x00,0x0c,0x0c,0x00,0x0c,0x0c,0x08,0x00}, /* : ; */
    {0x02,0x04,0x08,0x10,0x08,0x04,0x02,0x00}, {0x00,0x00,0x1f,0x00,0x1f,0x00,0x00,0x00}, /* < = */
    {0x08,0x04,0x02,0x01,0x02,0x04,0x08,0x00}, {0x0e,0x11,0x01,0x02,0x04,0x00,0x04,0x00}, /* > ? */
    {0x0e,0x11,0x01,0x0d,0x15,0x15,0x0e,0x00}, {0x0e,0x11,0x11,0x1f,0x11,0x11,0x11,0x00}, /* @ A */
    {0x1e,0x11,0x11,0x1e,0x11,0x11,0x1e,0x00}, {0x0e,0x11,0x10,0x10,0x10,0x11,0x0e,0x00}, /* B C */
    {0x1c,0x12,0x11,0x11,0x11,0x12,0x1c,0x00}, {0x1f,0x10,0x10,0x1e,0x10,0x10,0x1f,0x00}, /* D E */
    {0x1f,0x10,0x10,0x1e,0x10,0x10,0x10,0x00}, {0x0e,0x11,0x10,0x17,0x11,0x11,0x0f,0x00}, /* F G */
    {0x11,0x11,0x11,0x1f,0x11,0x11,0x11,0x00}, {0x0e,0x04,0x04,0x04,0x04,0x04,0x0e,0x00}, /* H I */
    {0x07,0x02,0x02,0x02,0x02,0x12,0x0c,0x00}, {0x11,0x12,0x14,0x18,0x14,0x12,0x11,0x00}, /* J K */
    {0x10,0x10,0x10,0x10,0x10,0x10,0x1f,0x00}, {0x11,0x1b,0x15,0x15,0x11,0x11,0x11,0x00}, /* L M */
    {0x11,0x11,0x19,0x15,0x13,0x11,0x11,0x00}, {0x0e,0x11,0x11,0x11,0x11,0x11,0x0e,0x00}, /* N O */
    {0x1e,0x11,0x11,0x1e,0x10,0x10,0x10,0x00}, {0x0e,0x11,0x11,0x11,0x15,0x12,0x0d,0x00}, /* P Q */
    {0x1e,0x11,0x11,0x1e,0x14,0x12,0x11,0x00}, {0x0f,0x10,0x10,0x0e,0x01,0x01,0x1e,0x00}, /* R S */
    {0x1f,0x04,0x04,0x04,0x04,0x04,0x04,0x00}, {0x11,0x11,0x11,0x11,0x11,0x11,0x0e,0x00}, /* T U */
    {0x11,0x11,0x11,0x11,0x11,0x0a,0x04,0x00}, {0x11,0x11,0x11,0x15,0x15,0x15,0x0a,0x00}, /* V W */
    {0x11,0x11,0x0a,0x04,0x0a,0x11,0x11,0x00}, {0x11,0x11,0x0a,0x04,0x04,0x04,0x04,0x00}, /* X Y */
    {0x1f,0x01,0x02,0x04,0x08,0x10,0x1f,0x00}, {0x0e,0x08,0x08,0x08,0x08,0x08,0x0e,0x00}, /* Z [ */
    {0x00,0x10,0x08,0x04,0x02,0x01,0x00,0x00}, {0x0e,0x02,0x02,0x02,0x02,0x02,0x0e,0x00}, /* \ ] */
    {0x04,0x0a,0x11,0x00,0x00,0x00,0x00,0x00}, {0x00,0x00,0x00,0x00,0x00,0x00,0x00,0x1f}, /* ^ _ */
    {0x08,0x04,0x02,0x00,0x00,0x00,0x00,0x00}, {0x00,0x00,0x0e,0x01,0x0f,0x11,0x0f,0x00}, /* ` a */
    {0x10,0x10,0x16,0x19,0x11,0x11,0x1e,0x00}, {0x00,0x00,0x0e,0x10,0x10,0x11,0x0e,0x00}, /* b c */
    {0x01,0x01,0x0d,0x13,0x11,0x11,0x0f,0x00}, {0x00,0x00,0x0e,0x11,0x1f,0x10,0x0e,0x00}, /* d e */
    {0x06,0x09,0x08,0x1c,0x08,0x08,0x08,0x00}, {0x00,0x00,0x0f,0x11,0x11,0x0f,0x01,0x0e}, /* f g */
    {0x10,0x10,0x16,0x19,0x11,0x11,0x11,0x00}, {0x04,0x00,0x0c,0x04,0x04,0x04,0x0e,0x00}, /* h i */
    {0x02,0x00,0x06,0x02,0x02,0x02,0x12,0x0c}, {0x10,0x10,0x12,0x14,0x18,0x14,0x12,0x00}, /* j k */
    {0x0c,0x04,0x04,0x04,0x04,0x04,0x0e,0x00}, {0x00,0x00,0x1a,0x15,0x15,0x11,0x11,0x00}, /* l m */
    {0x00,0x00,0x16,0x19,0x11,0x11,0x11,0x00}, {0x00,0x00,0x0e,0x11,0x11,0x11,0x0e,0x00}, /* n o */
    {0x00,0x00,0x1e,0x11,0x11,0x1e,0x10,0x10}, {0x00,0x00,0x0f,0x11,0x11,0x0f,0x01,0x01}, /* p q */
    {0x00,0x00,0x16,0x19,0x10,0x10,0x10,0x00}, {0x00,0x00,0x0f,0x10,0x0e,0x01,0x1e,0x00}, /* r s */
    {0x08,0x08,0x1c,0x08,0x08,0x09,0x06,0x00}, {0x00,0x00,0x11,0x11,0x11,0x13,0x0d,0x00}, /* t u */
    {0x00,0x00,0x11,0x11,0x11,0x0a,0x04,0x00}, {0x00,0x00,0x11,0x11,0x15,0x15,0x0a,0x00}, /* v w */
    {0x00,0x00,0x11,0x0a,0x04,0x0a,0x11,0x00}, {0x00,0x00,0x11,0x11,0x11,0x0f,0x01,0x0e}, /* x y */
    {0x00,0x00,0x1f,0x02,0x04,0x08,0x1f,0x00}, {0x02,0x04,0x04,0x08,0x04,0x04,0x02,0x00}, /* z { */
    {0x04,0x04,0x04,0x04,0x04,0x04,0x04,0x00}, {0x08,0x04,0x04,0x02,0x04,0x04,0x08,0x00}, /* | } */
    {0x00,0x00,0x08,0x15,0x02,0x00,0x00,0x00}, /* ~ */
};

static const unsigned plot__palette[10] = {0x1f77b4, 0xd62728, 0x2ca02c, 0xff7f0e, 0x9467bd,
                                           0x8c564b, 0xe377c2, 0x17becf, 0x7f7f7f, 0xbcbd22};
/* viridis at t = 0, 1/8, ..., 1 */
static const unsigned plot__viridis[9] = {0x440154, 0x472c7a, 0x3b518b, 0x2c718e, 0x21908d,
                                          0x27ad81, 0x5cc863, 0xaadc32, 0xfde725};

#define PLOT__INK 0x202020u
#define PLOT__GRID 0xe4e4e4u
#define PLOT__FRAME 0x606060u
#define PLOT__NAN_CELL 0xc8c8c8u
#define PLOT__MAX_PIXELS 16384
#define PLOT__MAX_TICKS 64

#ifdef PLOT_STATIC /* a static copy need not use every function */
#if defined(__GNUC__) || defined(__clang__)
#define PLOT__IMPL static __attribute__((unused))
#else
#define PLOT__IMPL static
#endif
#else
#define PLOT__IMPL
#endif

static int plot__finite(double v) { return v == v && v - v == 0.0; }
static int plot__imin(int a, int b) { return a < b ? a : b; }
static int plot__imax(int a, int b) { return a > b ? a : b; }
static int plot__has(const char *s) { return s && s[0]; }

/* ---- canvas -------------------------------------------------------------- */

PLOT__IMPL int plot_canvas_init(plot_canvas *c, int w, int h, unsigned background) {
    size_t i, n;
    if (!c) return PLOT_ERR_ARG;
    memset(c, 0, sizeof *c);
    if (w <= 0 || h <= 0 || w > PLOT__MAX_PIXELS || h > PLOT__MAX_PIXELS) return PLOT_ERR_ARG;
    n = (size_t)w * (size_t)h;
    c->rgb = (unsigned char *)malloc(n * 3);
    if (!c->rgb) return PLOT_ERR_NOMEM;
    c->w = w;
    c->h = h;
    for (i = 0; i < n; i++) {
        c->rgb[3 * i + 0] = (unsigned char)(background >> 16);
        c->rgb[3 * i + 1] = (unsigned char)(background >> 8);
        c->rgb[3 * i + 2] = (unsigned char)background;
    }
    plot_canvas_clip(c, 0, 0, 0, 0);
    return PLOT_OK;
}

PLOT__IMPL void plot_canvas_free(plot_canvas *c) {
    if (!c) return;
    free(c->rgb);
    c->rgb = NULL;
    c->w = c->h = 0;
}

PLOT__IMPL void plot_canvas_clip(plot_canvas *c, int x, int y, int w, int h) {
    if (!c) return;
    if (w <= 0 || h <= 0) {
        x = y = 0;
        w = c->w;
        h = c->h;
    }
    c->clip_x0 = plot__imax(x, 0);
    c->clip_y0 = plot__imax(y, 0);
    c->clip_x1 = plot__imin(x + w, c->w);
    c->clip_y1 = plot__imin(y + h, c->h);
}

static void plot__pixel(plot_canvas *c, int x, int y, unsigned color) {
    unsigned char *p;
    if (x < c->clip_x0 || y < c->clip_y0 || x >= c->clip_x1 || y >= c->clip_y1) return;
    p = c->rgb + 3 * ((size_t)y * (size_t)c->w + (size_t)x);
    p[0] = (unsigned char)(color >> 16);
    p[1] = (unsigned char)(color >> 8);
    p[2] = (unsigned char)color;
}

PLOT__IMPL void plot_fill_rect(plot_canvas *c, int x, int y, int w, int h, unsigned color) {
    int x0, y0, x1, y1, i, j;
    if (!c || !c->rgb) return;
    x0 = plot__imax(x, c->clip_x0), y0 = plot__imax(y, c->clip_y0);
    x1 = plot__imin(x + w, c->clip_x1), y1 = plot__imin(y + h, c->clip_y1);
    for (j = y0; j < y1; j++)
        for (i = x0; i < x1; i++) plot__pixel(c, i, j, color);
}

/* Liang-Barsky: clip the segment to the box; 0 when nothing is left */
static int plot__clip_seg(double *x0, double *y0, double *x1, double *y1, double xmin,
                          double ymin, double xmax, double ymax) {
    double dx = *x1 - *x0, dy = *y1 - *y0, t0 = 0.0, t1 = 1.0;
    double p[4] = {-dx, dx, -dy, dy};
    double q[4] = {*x0 - xmin, xmax - *x0, *y0 - ymin, ymax - *y0};
    int k;
    for (k = 0; k < 4; k++) {
        if (p[k] == 0.0) {
            if (q[k] < 0.0) return 0;
        } else {
            double r = q[k] / p[k];
            if (p[k] < 0.0) {
                if (r > t1) return 0;
                if (r > t0) t0 = r;
            } else {
                if (r < t0) return 0;
                if (r < t1) t1 = r;
            }
        }
    }
    *x1 = *x0 + t1 * dx;
    *y1 = *y0 + t1 * dy;
    *x0 = *x0 + t0 * dx;
    *y0 = *y0 + t0 * dy;
    return 1;
}

PLOT__IMPL void plot_draw_line(plot_canvas *c, double x0, double y0, double x1, double y1,
                               int thickness, unsigned color) {
    int t = thickness < 1 ? 1 : thickness > 64 ? 64 : thickness, off = (t - 1) / 2, i, n;
    if (!c || !c->rgb || !plot__finite(x0) || !plot__finite(y0) || !plot__finite(x1) ||
        !plot__finite(y1))
        return;
    if (!plot__clip_seg(&x0, &y0, &x1, &y1, c->clip_x0 - t, c->clip_y0 - t, c->clip_x1 + t,
                        c->clip_y1 + t))
        return;
    n = (int)ceil(fabs(x1 - x0) > fabs(y1 - y0) ? fabs(x1 - x0) : fabs(y1 - y0));
    for (i = 0; i <= n; i++) {
        double f = n ? (double)i / n : 0.0;
        int px = (int)floor(x0 + (x1 - x0) * f + 0.5) - off;
        int py = (int)floor(y0 + (y1 - y0) * f + 0.5) - off;
        plot_fill_rect(c, px, py, t, t, color);
    }
}

PLOT__IMPL void plot_fill_circle(plot_canvas *c, double cx, double cy, double r, unsigned color) {
    int x, y, x0, x1, y0, y1;
    if (!c || !c->rgb || !plot__finite(cx) || !plot__finite(cy) || !(r >= 0.0 && r < 1e4))
        return;
    if (cx < c->clip_x0 - r - 1 || cx > c->clip_x1 + r || cy < c->clip_y0 - r - 1 ||
        cy > c->clip_y1 + r)
        return;
    x0 = (int)floor(cx - r), x1 = (int)ceil(cx + r);
    y0 = (int)floor(cy - r), y1 = (int)ceil(cy + r);
    for (y = y0; y <= y1; y++)
        for (x = x0; x <= x1; x++)
            if ((x - cx) * (x - cx) + (y - cy) * (y - cy) <= r * r + 0.25)
                plot__pixel(c, x, y, color);
}

PLOT__IMPL int plot_text_width(const char *s, int scale) {
    size_t n = s ? strlen(s) : 0;
    scale = scale < 1 ? 1 : scale > 64 ? 64 : scale;
    if (n == 0) return 0;
    if (n > 4096) n = 4096;
    return (int)n * 6 * scale - scale;
}

PLOT__IMPL void plot_draw_text(plot_canvas *c, int x, int y, const char *s, int scale,
                               int vertical, unsigned color) {
    int tw = plot_text_width(s, scale), k, row, col;
    scale = scale < 1 ? 1 : scale > 64 ? 64 : scale;
    for (k = 0; s && s[k] && k < 4096; k++) {
        unsigned ch = (unsigned char)s[k];
        const unsigned char *g = plot__font[(ch >= 32 && ch <= 126 ? ch : '?') - 32];
        for (row = 0; row < 8; row++)
            for (col = 0; col < 5; col++) {
                int u = k * 6 * scale + col * scale, v = row * scale;
                if (!(g[row] & (0x10 >> col))) continue;
                if (vertical)
                    plot_fill_rect(c, x + v, y + tw - u - scale, scale, scale, color);
                else
                    plot_fill_rect(c, x + u, y + v, scale, scale, color);
            }
    }
}

/* Encode, write "<path>.tmp", check every step, then rename onto path. */
PLOT__IMPL int plot_canvas_save(const plot_canvas *c, const char *path) {
    size_t len;
    char *tmp;
    unsigned char *png;
    int png_len = 0, ok;
    FILE *f;
    if (!c || !c->rgb || c->w <= 0 || c->h <= 0 || !plot__has(path)) return PLOT_ERR_ARG;
    len = strlen(path);
    tmp = (char *)malloc(len + 5);
    if (!tmp) return PLOT_ERR_NOMEM;
    memcpy(tmp, path, len);
    memcpy(tmp + len, ".tmp", 5);
    png = stbi_write_png_to_mem(c->rgb, c->w * 3, c->w, c->h, 3, &png_len);
    if (!png) {
        free(tmp);
        return PLOT_ERR_NOMEM;
    }
    f = fopen(tmp, "wb");
    if (!f) {
        STBIW_FREE(png);
        free(tmp);
        return PLOT_ERR_IO;
    }
    ok = fwrite(png, 1, (size_t)png_len, f) == (size_t)png_len;
    ok = (fflush(f) == 0) && ok;
#ifdef PLOT__POSIX
    ok = ok && fsync(fileno(f)) == 0; /* on disk before the rename makes it the file */
#endif
    ok = (fclose(f) == 0) && ok;
    STBIW_FREE(png);
#ifdef _WIN32
    if (ok) remove(path); /* rename() does not replace files there */
#endif
    if (!ok || rename(tmp, path) != 0) {
        remove(tmp);
        free(tmp);
        return PLOT_ERR_IO;
    }
#ifdef PLOT__POSIX
    { /* the rename is durable once the directory is synced */
        char *slash = strrchr(tmp, '/');
        int fd;
        if (slash) slash[slash == tmp] = 0; /* tmp becomes the directory ("/" for "/x.png") */
        fd = open(slash ? tmp : ".", O_RDONLY);
        if (fd >= 0) {
            fsync(fd);
            close(fd);
        }
    }
#endif
    free(tmp);
    return PLOT_OK;
}

PLOT__IMPL unsigned plot_colormap(double t) {
    double f;
    int i, k;
    unsigned a, b, out = 0;
    if (!(t > 0.0)) t = 0.0; /* NaN too */
    if (t > 1.0) t = 1.0;
    f = t * 8.0;
    i = (int)f;
    if (i > 7) i = 7;
    f -= i;
    a = plot__viridis[i];
    b = plot__viridis[i + 1];
    for (k = 16; k >= 0; k -= 8) {
        double ca = (a >> k) & 255, cb = (b >> k) & 255;
        out |= (unsigned)floor(ca + (cb - ca) * f + 0.5) << k;
    }
    return out;
}

/* ---- axes ---------------------------------------------------------------- */

/* %.*g without the exponent's '+' and leading zeros: 1e6, 2.5e-5 */
static void plot__num(char *buf, size_t n, double v, int digits) {
    char *p;
    snprintf(buf, n, "%.*g", digits, v);
    p = strchr(buf, 'e');
    if (!p) return;
    p++;
    if (*p == '+') memmove(p, p + 1, strlen(p));
    if (*p == '-') p++;
    while (p[0] == '0' && p[1]) memmove(p, p + 1, strlen(p));
}

typedef struct plot__axis {
    double lo, hi; /* drawn range, in log10 units on a log axis */
    int n;         /* ticks */
    double v[PLOT__MAX_TICKS];
    char label[PLOT__MAX_TICKS][24];
} plot__axis;

/* linear ticks at 1, 2 or 5 times a power of ten; `expand` widens lo/hi onto ticks */
static void plot__ticks_linear(plot__axis *a, int target, int expand) {
    double span, raw, mag, f, step, k, k0, k1, big;
    int decimals, digits;
    if (!(a->hi > a->lo)) {
        double d = fabs(a->lo) * 0.1;
        if (!(d > 0.0)) d = 1.0;
        a->lo -= d;
        a->hi += d;
    }
    span = a->hi - a->lo;
    raw = span / (target < 2 ? 2 : target);
    mag = pow(10.0, floor(log10(raw)));
    f = raw / mag;
    step = (f < 1.5 ? 1.0 : f < 3.0 ? 2.0 : f < 7.0 ? 5.0 : 10.0) * mag;
    if (expand) { /* the tolerance keeps float data such as 0.3f from adding a step */
        a->lo = floor(a->lo / step + 1e-4) * step;
        a->hi = ceil(a->hi / step - 1e-4) * step;
    }
    k0 = ceil(a->lo / step - 1e-4);
    k1 = floor(a->hi / step + 1e-4);
    big = fabs(a->lo) > fabs(a->hi) ? fabs(a->lo) : fabs(a->hi);
    decimals = step >= 1.0 ? 0 : (int)ceil(-log10(step) - 1e-9);
    digits = (int)floor(log10(big)) - (int)floor(log10(step) + 1e-9) + 1; /* to tell ticks apart */
    a->n = 0;
    for (k = k0; k <= k1 && a->n < PLOT__MAX_TICKS; k++) {
        double v = k * step + 0.0; /* + 0.0 turns -0 into 0 */
        a->v[a->n] = v;
        if (big >= 1e6 || step < 1e-4)
            plot__num(a->label[a->n], sizeof a->label[0], v, digits < 2 ? 2 : digits);
        else
            snprintf(a->label[a->n], sizeof a->label[0], "%.*f", decimals, v);
        a->n++;
    }
}

/* log ticks at m * 10^d, m in {1..9}, {1, 2, 5} or {1} by span; every `every`-th decade */
static void plot__ticks_log(plot__axis *a, int target, int expand) {
    static const int m9[9] = {1, 2, 3, 4, 5, 6, 7, 8, 9}, m3[3] = {1, 2, 5};
    const int *m;
    int nm, d, every, i, found_hi = 0;
    double span, lo, hi;
    if (!(a->hi > a->lo)) {
        a->lo -= 0.5;
        a->hi += 0.5;
    }
    span = a->hi - a->lo;
    nm = span <= 1.0 ? 9 : span <= 2.5 ? 3 : 1;
    m = nm == 9 ? m9 : m3;
    every = (int)ceil(span / (target < 2 ? 2 : target) - 1e-9);
    if (every < 1) every = 1;
    lo = a->lo;
    hi = a->hi;
    for (d = (int)floor(a->lo) - every; expand && d <= (int)ceil(a->hi) + every; d++)
        for (i = 0; i < nm && d % every == 0; i++) { /* candidates ascend */
            double v = log10((double)m[i]) + d;
            if (v <= a->lo + 1e-4) lo = v;
            if (!found_hi && v >= a->hi - 1e-4) hi = v, found_hi = 1;
        }
    a->lo = lo;
    a->hi = hi;
    a->n = 0;
    for (d = (int)floor(a->lo) - every; d <= (int)ceil(a->hi) + every; d++)
        for (i = 0; i < nm && d % every == 0 && a->n < PLOT__MAX_TICKS; i++) {
            double v = log10((double)m[i]) + d;
            if (v < a->lo - 1e-4 || v > a->hi + 1e-4) continue;
            a->v[a->n] = v;
            if (d >= -3 && d <= 4)
                snprintf(a->label[a->n], sizeof a->label[0], "%.*f", d < 0 ? -d : 0,
                         m[i] * pow(10.0, d));
            else
                snprintf(a->label[a->n], sizeof a->label[0], "%de%d", m[i], d);
            a->n++;
        }
}

/* y tick labels right-aligned left of the plot, x labels centred below; crowded ones skipped */
static void plot__draw_axes(plot_canvas *c, const plot__axis *ax, const plot__axis *ay, int px,
                            int py, int pw, int ph) {
    int i, last = -100000;
    plot_fill_rect(c, px, py, pw, ph, 0xffffffu);
    for (i = 0; i < ay->n; i++) {
        int y = py + ph - 1 - (int)floor((ay->v[i] - ay->lo) / (ay->hi - ay->lo) * (ph - 1) + 0.5);
        plot_fill_rect(c, px, y, pw, 1, PLOT__GRID);
        plot_fill_rect(c, px - 4, y, 4, 1, PLOT__FRAME);
        if (i > 0 && last - y < 11) continue;
        plot_draw_text(c, px - 7 - plot_text_width(ay->label[i], 1), y - 3, ay->label[i], 1, 0,
                       PLOT__INK);
        last = y;
    }
    for (i = 0, last = -100000; i < ax->n; i++) {
        int x = px + (int)floor((ax->v[i] - ax->lo) / (ax->hi - ax->lo) * (pw - 1) + 0.5);
        int w = plot_text_width(ax->label[i], 1);
        plot_fill_rect(c, x, py, 1, ph, PLOT__GRID);
        plot_fill_rect(c, x, py + ph, 1, 4, PLOT__FRAME);
        if (i > 0 && x - w / 2 < last + 8) continue;
        plot_draw_text(c, x - w / 2, py + ph + 7, ax->label[i], 1, 0, PLOT__INK);
        last = x - w / 2 + w;
    }
    plot_fill_rect(c, px - 1, py - 1, pw + 2, 1, PLOT__FRAME);
    plot_fill_rect(c, px - 1, py + ph, pw + 2, 1, PLOT__FRAME);
    plot_fill_rect(c, px - 1, py - 1, 1, ph + 2, PLOT__FRAME);
    plot_fill_rect(c, px + pw, py - 1, 1, ph + 2, PLOT__FRAME);
}

typedef struct plot__map {
    double x0, xs, y0, ys; /* pixel = x0 + (value - lo) * xs */
    double xlo, ylo;
    int log_y;
} plot__map;

/* point i of a series as data values (y in log10 units on a log axis); 0 if skipped */
static int plot__value(int log_y, const plot_series *s, int i, double *x, double *y) {
    *x = s->x ? (double)s->x[i] : (double)i;
    *y = (double)s->y[i];
    if (log_y) {
        if (!(*y > 0.0)) return 0;
        *y = log10(*y);
    }
    return plot__finite(*x) && plot__finite(*y);
}

static int plot__point(const plot__map *m, const plot_series *s, int i, double *px, double *py) {
    double x, y;
    if (!plot__value(m->log_y, s, i, &x, &y)) return 0;
    *px = m->x0 + (x - m->xlo) * m->xs;
    *py = m->y0 - (y - m->ylo) * m->ys;
    return 1;
}

static unsigned plot__series_color(const plot_series *series, int k) {
    int i, auto_k = 0;
    if (series[k].color) return series[k].color;
    for (i = 0; i < k; i++) auto_k += series[i].color == 0;
    return plot__palette[auto_k % 10];
}

/* how much data a box would hide: pixels of line inside it plus points */
static double plot__covered(const plot__map *m, const plot_series *series, int n_series, int bx,
                            int by, int bw, int bh) {
    double score = 0.0, x0 = 0, y0 = 0, x1, y1;
    int k, i, have;
    for (k = 0; k < n_series; k++)
        for (i = 0, have = 0; i < series[k].n; i++) {
            if (!plot__point(m, &series[k], i, &x1, &y1)) continue;
            if (x1 >= bx && x1 < bx + bw && y1 >= by && y1 < by + bh) score += 4.0;
            if (have && series[k].style != PLOT_POINTS) {
                double a = x0, b = y0, cx = x1, cy = y1;
                if (plot__clip_seg(&a, &b, &cx, &cy, bx, by, bx + bw, by + bh))
                    score += sqrt((cx - a) * (cx - a) + (cy - b) * (cy - b));
            }
            x0 = x1, y0 = y1, have = 1;
        }
    return score;
}

static void plot__draw_legend(plot_canvas *c, const plot__map *m, const plot_series *series,
                              int n_series, int where, int px, int py, int pw, int ph) {
    int k, n = 0, tw = 0, bw, bh, bx[4], by[4], pick = 0, row = 0;
    for (k = 0; k < n_series; k++)
        if (plot__has(series[k].name)) {
            n++;
            tw = plot__imax(tw, plot_text_width(series[k].name, 1));
        }
    if (n == 0 || where == PLOT_LEGEND_NONE) return;
    bw = 6 + 22 + 6 + tw + 8;
    bh = 6 + 12 * n;
    bx[0] = bx[2] = px + pw - bw - 8; /* top-right, top-left, bottom-right, bottom-left */
    bx[1] = bx[3] = px + 8;
    by[0] = by[1] = py + 8;
    by[2] = by[3] = py + ph - bh - 8;
    if (where >= PLOT_LEGEND_TOP_RIGHT && where <= PLOT_LEGEND_BOTTOM_LEFT) {
        pick = where - PLOT_LEGEND_TOP_RIGHT;
    } else {
        double best = 1e300;
        for (k = 0; k < 4; k++) {
            double s = plot__covered(m, series, n_series, bx[k], by[k], bw, bh);
            if (s < best - 1e-9) best = s, pick = k;
        }
    }
    plot_fill_rect(c, bx[pick] - 1, by[pick] - 1, bw + 2, bh + 2, 0xb0b0b0u);
    plot_fill_rect(c, bx[pick], by[pick], bw, bh, 0xffffffu);
    for (k = 0; k < n_series; k++) {
        int x = bx[pick] + 6, y = by[pick] + 6 + 12 * row + 3;
        unsigned col = plot__series_color(series, k);
        if (!plot__has(series[k].name)) continue;
        if (series[k].style != PLOT_POINTS) plot_draw_line(c, x, y, x + 21, y, 2, col);
        if (series[k].style != PLOT_LINE) plot_fill_circle(c, x + 10.5, y + 0.5, 2.6, col);
        plot_draw_text(c, x + 28, y - 3, series[k].name, 1, 0, PLOT__INK);
        row++;
    }
}

PLOT__IMPL int plot_lines(const char *path, const plot_chart *chart, const plot_series *series,
                          int n_series) {
    plot_chart ch;
    plot__axis ax, ay;
    plot__map m;
    plot_canvas c;
    int k, i, w, h, left, right, top, bottom, pw, ph, lw = 0, rc, have;
    double xlo = 1e300, xhi = -1e300, ylo = 1e300, yhi = -1e300;
    if (!plot__has(path) || !series || n_series <= 0) return PLOT_ERR_ARG;
    for (k = 0; k < n_series; k++)
        if (series[k].n <= 0 || !series[k].y || series[k].style < PLOT_LINE ||
            series[k].style > PLOT_LINE_POINTS)
            return PLOT_ERR_ARG;
    if (chart) ch = *chart;
    else memset(&ch, 0, sizeof ch);
    w = ch.width > 0 ? ch.width : 720;
    h = ch.height > 0 ? ch.height : 450;
    if (ch.width < 0 || ch.height < 0 || w > PLOT__MAX_PIXELS || h > PLOT__MAX_PIXELS)
        return PLOT_ERR_ARG;
    if ((ch.x_min < ch.x_max && !(plot__finite(ch.x_min) && plot__finite(ch.x_max))) ||
        (ch.y_min < ch.y_max && !(plot__finite(ch.y_min) && plot__finite(ch.y_max))) ||
        (ch.log_y && ch.y_min < ch.y_max && !(ch.y_min > 0.0f)))
        return PLOT_ERR_ARG;

    /* data ranges (log10 units on a log y axis) */
    memset(&m, 0, sizeof m);
    m.log_y = ch.log_y != 0;
    for (k = 0; k < n_series; k++)
        for (i = 0; i < series[k].n; i++) {
            double x, y;
            if (!plot__value(m.log_y, &series[k], i, &x, &y)) continue;
            if (x < xlo) xlo = x;
            if (x > xhi) xhi = x;
            if (y < ylo) ylo = y;
            if (y > yhi) yhi = y;
        }
    if (xlo > xhi) xlo = 0.0, xhi = 1.0; /* nothing finite to draw */
    if (ylo > yhi) ylo = 0.0, yhi = 1.0;
    ax.lo = xlo, ax.hi = xhi, ay.lo = ylo, ay.hi = yhi;
    if (ch.x_min < ch.x_max) ax.lo = ch.x_min, ax.hi = ch.x_max;
    if (ch.y_min < ch.y_max) {
        ay.lo = m.log_y ? log10((double)ch.y_min) : ch.y_min;
        ay.hi = m.log_y ? log10((double)ch.y_max) : ch.y_max;
    }
    plot__ticks_linear(&ax, (w - 120) / 90, !(ch.x_min < ch.x_max));
    if (m.log_y) plot__ticks_log(&ay, (h - 90) / 45, !(ch.y_min < ch.y_max));
    else plot__ticks_linear(&ay, (h - 90) / 45, !(ch.y_min < ch.y_max));

    /* layout */
    for (i = 0; i < ay.n; i++) lw = plot__imax(lw, plot_text_width(ay.label[i], 1));
    top = plot__has(ch.title) ? 10 + 16 + 10 : 12;
    left = 8 + (plot__has(ch.ylabel) ? 8 + 8 : 0) + lw + 8;
    bottom = 7 + 8 + 6 + (plot__has(ch.xlabel) ? 8 + 6 : 0);
    right = ax.n ? plot__imax(16, plot_text_width(ax.label[ax.n - 1], 1) / 2 + 6) : 16;
    pw = w - left - right;
    ph = h - top - bottom;
    if (pw < 16 || ph < 16) return PLOT_ERR_ARG;
    rc = plot_canvas_init(&c, w, h, 0xffffffu);
    if (rc) return rc;
    plot__draw_axes(&c, &ax, &ay, left, top, pw, ph);
    if (plot__has(ch.title)) {
        int tw = plot_text_width(ch.title, 2);
        plot_draw_text(&c, plot__imax(4, left + (pw - tw) / 2), 10, ch.title, 2, 0, PLOT__INK);
    }
    if (plot__has(ch.xlabel))
        plot_draw_text(&c, left + (pw - plot_text_width(ch.xlabel, 1)) / 2, h - 8 - 8, ch.xlabel,
                       1, 0, PLOT__INK);
    if (plot__has(ch.ylabel))
        plot_draw_text(&c, 8, top + (ph - plot_text_width(ch.ylabel, 1)) / 2, ch.ylabel, 1, 1,
                       PLOT__INK);

    /* data, clipped to the plot area */
    m.x0 = left, m.xlo = ax.lo, m.xs = (pw - 1) / (ax.hi - ax.lo);
    m.y0 = top + ph - 1, m.ylo = ay.lo, m.ys = (ph - 1) / (ay.hi - ay.lo);
    plot_canvas_clip(&c, left, top, pw, ph);
    for (k = 0; k < n_series; k++) {
        const plot_series *s = &series[k];
        unsigned col = plot__series_color(series, k);
        double x0 = 0, y0 = 0, x1, y1;
        int count = 0;
        for (i = 0, have = 0; i < s->n; i++) {
            if (!plot__point(&m, s, i, &x1, &y1)) continue;
            if (have && s->style != PLOT_POINTS) plot_draw_line(&c, x0, y0, x1, y1, 2, col);
            x0 = x1, y0 = y1, have = 1, count++;
        }
        for (i = 0; i < s->n; i++) /* markers on top; a lone point of a line too */
            if ((s->style != PLOT_LINE || count == 1) && plot__point(&m, s, i, &x1, &y1))
                plot_fill_circle(&c, x1, y1, 2.6, col);
    }
    plot_canvas_clip(&c, 0, 0, 0, 0);
    plot__draw_legend(&c, &m, series, n_series, ch.legend, left, top, pw, ph);
    rc = plot_canvas_save(&c, path);
    plot_canvas_free(&c);
    return rc;
}

/* ---- heatmap ------------------------------------------------------------- */

/* smallest of 1, 2, 5, 10, 20, 50, ... that is >= x */
static int plot__stride(double x) {
    int base = 1;
    while (base < 100000000) {
        if (x <= base) return base;
        if (x <= 2 * base) return 2 * base;
        if (x <= 5 * base) return 5 * base;
        base *= 10;
    }
    return base;
}

static const char *plot__label(const char *const *labels, int i, char *buf, size_t n) {
    if (labels) return labels[i] ? labels[i] : "";
    snprintf(buf, n, "%d", i);
    return buf;
}

PLOT__IMPL int plot_heatmap(const char *path, const plot_heatmap_opts *opts, const float *values,
                            int rows, int cols) {
    plot_heatmap_opts o;
    plot_canvas c;
    char buf[32], vlab[3][32];
    double vmin = 1e300, vmax = -1e300;
    int r, q, i, cw, ch, rstride, cstride = 1, cvert = 0, rlw = 0, clh = 8, cmaxw = 0, blw = 0;
    int top, left, gw, gh, bx, bh, body, w, h, rc;
    if (!plot__has(path) || !values || rows <= 0 || cols <= 0 || rows > 4096 || cols > 4096)
        return PLOT_ERR_ARG;
    if (opts) o = *opts;
    else memset(&o, 0, sizeof o);
    if (o.cell < 0 || o.cell > 256 ||
        (o.v_min < o.v_max && !(plot__finite(o.v_min) && plot__finite(o.v_max))))
        return PLOT_ERR_ARG;
    cw = ch = o.cell;
    if (!o.cell) { /* fill about 640 x 400, cells at most 48 and at most 3:1 */
        cw = plot__imax(1, plot__imin(48, 640 / cols));
        ch = plot__imax(1, plot__imin(48, 400 / rows));
        cw = plot__imin(cw, 3 * ch);
        ch = plot__imin(ch, 3 * cw);
    }
    gw = cw * cols;
    gh = ch * rows;
    if (gw > PLOT__MAX_PIXELS - 400 || gh > PLOT__MAX_PIXELS - 400) return PLOT_ERR_ARG;
    for (i = 0; i < rows * cols; i++) {
        double v = values[i];
        if (!plot__finite(v)) continue;
        if (v < vmin) vmin = v;
        if (v > vmax) vmax = v;
    }
    if (o.v_min < o.v_max) vmin = o.v_min, vmax = o.v_max;
    else if (vmin > vmax) vmin = 0.0, vmax = 1.0; /* all NaN */
    else if (vmin == vmax) { /* one value: the middle colour */
        double d = fabs(vmin) * 0.1 > 0.5 ? fabs(vmin) * 0.1 : 0.5;
        vmin -= d, vmax += d;
    }

    /* labels: every rstride-th row and cstride-th column, so that none collide */
    rstride = plot__stride(10.0 / ch);
    for (r = 0; r < rows; r += rstride)
        rlw = plot__imax(rlw, plot_text_width(plot__label(o.row_labels, r, buf, sizeof buf), 1));
    for (q = 0; q < cols; q++) {
        const char *s = plot__label(o.col_labels, q, buf, sizeof buf);
        cmaxw = plot__imax(cmaxw, plot_text_width(s, 1));
    }
    if (cmaxw + 3 > cw) {
        if (o.col_labels) { /* names: turn them, keep as many as fit */
            cvert = 1;
            cstride = plot__stride(10.0 / cw);
            for (q = 0, clh = 0; q < cols; q += cstride)
                clh = plot__imax(clh, plot_text_width(o.col_labels[q], 1));
        } else { /* indices: flat, every cstride-th */
            cstride = plot__stride((cmaxw + 8.0) / cw);
        }
    }
    plot__num(vlab[0], sizeof vlab[0], vmax, 3);
    plot__num(vlab[1], sizeof vlab[1], 0.5 * (vmin + vmax), 3);
    plot__num(vlab[2], sizeof vlab[2], vmin, 3);
    for (i = 0; i < 3; i++) blw = plot__imax(blw, plot_text_width(vlab[i], 1));

    /* layout: title / row labels, grid, colour bar / column labels / x label */
    top = plot__has(o.title) ? 10 + 16 + 10 : 12;
    left = 10 + (plot__has(o.ylabel) ? 16 : 0) + rlw + 6;
    bx = left + gw + 14;
    bh = plot__imax(gh, 80);
    body = plot__imax(gh + 5 + clh, bh);
    w = plot__imax(bx + 14 + 6 + blw + 12, plot_text_width(o.title, 2) + 20);
    h = top + body + (plot__has(o.xlabel) ? 8 + 8 : 0) + 12;
    rc = plot_canvas_init(&c, w, h, 0xffffffu);
    if (rc) return rc;

    for (r = 0; r < rows; r++)
        for (q = 0; q < cols; q++) {
            double v = values[(size_t)r * (size_t)cols + (size_t)q];
            unsigned col = plot__finite(v) ? plot_colormap((v - vmin) / (vmax - vmin))
                                           : PLOT__NAN_CELL;
            int x = left + q * cw, y = top + r * ch, tw;
            plot_fill_rect(&c, x, y, cw, ch, col);
            if (!o.annotate || ch < 10 || !plot__finite(v)) continue;
            plot__num(buf, sizeof buf, v, 3);
            if (plot_text_width(buf, 1) > cw - 2) plot__num(buf, sizeof buf, v, 2);
            tw = plot_text_width(buf, 1);
            if (tw > cw - 2) continue;
            plot_draw_text(&c, x + (cw - tw) / 2, y + ch / 2 - 3, buf, 1, 0,
                           (0.299 * (col >> 16) + 0.587 * ((col >> 8) & 255) +
                            0.114 * (col & 255)) > 140.0
                               ? 0x000000u
                               : 0xffffffu);
        }
    for (r = 0; r < rows; r += rstride) {
        const char *s = plot__label(o.row_labels, r, buf, sizeof buf);
        plot_draw_text(&c, left - 6 - plot_text_width(s, 1), top + r * ch + ch / 2 - 3, s, 1, 0,
                       PLOT__INK);
    }
    for (q = 0; q < cols; q += cstride) {
        const char *s = plot__label(o.col_labels, q, buf, sizeof buf);
        int x = left + q * cw + cw / 2, tw = plot_text_width(s, 1);
        if (cvert) plot_draw_text(&c, x - 3, top + gh + 5, s, 1, 1, PLOT__INK);
        else plot_draw_text(&c, x - tw / 2, top + gh + 5, s, 1, 0, PLOT__INK);
    }

    /* colour bar with max, middle and min */
    for (i = 0; i < bh; i++)
        plot_fill_rect(&c, bx, top + i, 14, 1, plot_colormap((double)(bh - 1 - i) / (bh - 1)));
    plot_fill_rect(&c, bx - 1, top - 1, 16, 1, PLOT__FRAME);
    plot_fill_rect(&c, bx - 1, top + bh, 16, 1, PLOT__FRAME);
    plot_fill_rect(&c, bx - 1, top - 1, 1, bh + 2, PLOT__FRAME);
    plot_fill_rect(&c, bx + 14, top - 1, 1, bh + 2, PLOT__FRAME);
    plot_draw_text(&c, bx + 20, top, vlab[0], 1, 0, PLOT__INK);
    plot_draw_text(&c, bx + 20, top + bh / 2 - 3, vlab[1], 1, 0, PLOT__INK);
    plot_draw_text(&c, bx + 20, top + bh - 7, vlab[2], 1, 0, PLOT__INK);

    if (plot__has(o.title))
        plot_draw_text(&c, plot__imax(4, (left + bx + 14 - plot_text_width(o.title, 2)) / 2), 10,
                       o.title, 2, 0, PLOT__INK);
    if (plot__has(o.ylabel))
        plot_draw_text(&c, 10, plot__imax(2, top + (gh - plot_text_width(o.ylabel, 1)) / 2),
                       o.ylabel, 1, 1, PLOT__INK);
    if (plot__has(o.xlabel))
        plot_draw_text(&c, left + (gw - plot_text_width(o.xlabel, 1)) / 2, top + body + 8,
                       o.xlabel, 1, 0, PLOT__INK);
    rc = plot_canvas_save(&c, path);
    plot_canvas_free(&c);
    return rc;
}

#endif /* PLOT_IMPLEMENTATION_DONE */
#endif /* PLOT_IMPLEMENTATION */
