/* amalgamate.c - builds a single-file header from its parts (SQLite's way: one ordered list).

       amalgamate src/moe/PARTS moe.h            writes moe.h (only when it changes)
       amalgamate --check src/moe/PARTS moe.h    exit 1, with a sentence, when moe.h is stale

   The list file names the anchor prefix ("prefix moe") and the parts in order, one per line:
   "<name> <summary>", an indented line continuing the summary. Part <name> is the file
   <name>.h beside the list: its declarations, a line holding only the comment "@implementation"
   (the marker, dropped from the output), then its implementation. The output is, in order and byte for byte:

       header_top.h      with its "@toc" line replaced by the table of contents of the list
       the declarations of every part
       header_impl.h     closes the declarations, opens the implementation half
       the implementation of every part
       header_end.h      closes the implementation, revision history, licence

   Text only, no rewriting: a reader of the header sees exactly the parts. Every part must
   open with its anchor ">>prefix:name", so one search finds a section in both halves.
   Plain C99, no shell, no dependencies: `cc -std=c99 -o amalgamate src/amalgamate.c`. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAX_PARTS 128
#define MAX_SUMMARY 8

typedef struct {
    char name[64];
    char summary[MAX_SUMMARY][128];
    int n_summary;
} part;

typedef struct { /* a growable byte buffer */
    char *p;
    size_t n, cap;
} buf;

static void die(const char *what, const char *detail) {
    fprintf(stderr, "amalgamate: %s%s%s\n", what, detail ? " " : "", detail ? detail : "");
    exit(2);
}

static void buf_add(buf *b, const char *s, size_t n) {
    if (b->n + n + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 1 << 16;
        char *p;
        while (cap < b->n + n + 1) cap *= 2;
        p = (char *)realloc(b->p, cap);
        if (!p) die("out of memory", NULL);
        b->p = p;
        b->cap = cap;
    }
    memcpy(b->p + b->n, s, n);
    b->n += n;
    b->p[b->n] = 0;
}

static void buf_str(buf *b, const char *s) { buf_add(b, s, strlen(s)); }

/* the whole file, NUL-terminated; NULL when it cannot be read (missing is allowed for --check) */
static char *read_file(const char *path, size_t *len) {
    FILE *f = fopen(path, "rb");
    buf b = {NULL, 0, 0};
    char chunk[1 << 14];
    size_t got;
    if (!f) return NULL;
    while ((got = fread(chunk, 1, sizeof chunk, f)) > 0) buf_add(&b, chunk, got);
    if (ferror(f)) die("read error on", path);
    fclose(f);
    if (!b.p) buf_add(&b, "", 0);
    *len = b.n;
    return b.p;
}

static char *read_required(const char *dir, const char *name, size_t *len) {
    char path[1024];
    char *s;
    if ((size_t)snprintf(path, sizeof path, "%s/%s", dir, name) >= sizeof path) die("path too long:", name);
    s = read_file(path, len);
    if (!s) die("cannot read", path);
    if (*len == 0 || s[*len - 1] != '\n') die("a part must end with a newline:", path);
    return s;
}

static int parse_list(const char *text, char *prefix, part *parts) {
    int n = 0, line_no = 0;
    const char *p = text;
    prefix[0] = 0;
    while (*p) {
        const char *e = strchr(p, '\n');
        size_t len = e ? (size_t)(e - p) : strlen(p);
        char line[256];
        line_no++;
        if (len >= sizeof line) die("list line too long", NULL);
        memcpy(line, p, len);
        line[len] = 0;
        p += len + (e ? 1 : 0);
        if (line[0] == '#' || line[strspn(line, " \t")] == 0) continue;
        if (strncmp(line, "prefix ", 7) == 0) {
            if (sscanf(line + 7, "%15s", prefix) != 1) die("bad prefix line", NULL);
        } else if (line[0] == ' ' || line[0] == '\t') {
            const char *s = line + strspn(line, " \t");
            if (n == 0) die("a continuation line before the first part", NULL);
            if (parts[n - 1].n_summary == MAX_SUMMARY) die("summary too long for part", parts[n - 1].name);
            if (strlen(s) >= sizeof parts[0].summary[0]) die("summary line too long:", s);
            strcpy(parts[n - 1].summary[parts[n - 1].n_summary++], s);
        } else {
            part *q = &parts[n];
            const char *s;
            size_t nl = strcspn(line, " \t");
            if (n == MAX_PARTS) die("too many parts", NULL);
            if (nl >= sizeof q->name) die("part name too long:", line);
            memcpy(q->name, line, nl);
            q->name[nl] = 0;
            s = line + nl + strspn(line + nl, " \t");
            if (strlen(s) >= sizeof q->summary[0]) die("summary line too long:", s);
            strcpy(q->summary[0], s);
            q->n_summary = 1;
            n++;
        }
    }
    if (!prefix[0]) die("the list has no \"prefix NAME\" line", NULL);
    if (n == 0) die("the list names no parts", NULL);
    return n;
}

/* "       1. core        >>moe:core      summary", continuation lines aligned under it */
static void add_toc(buf *out, const char *prefix, const part *parts, int n) {
    int i, j, wname = 0, wanchor = 0;
    char line[512];
    for (i = 0; i < n; i++) {
        int a = (int)(strlen(prefix) + strlen(parts[i].name) + 3);
        if ((int)strlen(parts[i].name) > wname) wname = (int)strlen(parts[i].name);
        if (a > wanchor) wanchor = a;
    }
    wname += 3;
    wanchor = wanchor + 1 < 16 ? 16 : wanchor + 1;
    for (i = 0; i < n; i++) {
        char anchor[128];
        if (snprintf(anchor, sizeof anchor, ">>%s:%s", prefix, parts[i].name) >= (int)sizeof anchor ||
            snprintf(line, sizeof line, "%8d. %-*s%-*s%s\n", i + 1, wname, parts[i].name, wanchor, anchor,
                     parts[i].summary[0]) >= (int)sizeof line)
            die("table of contents line too long for part", parts[i].name);
        buf_str(out, line);
        for (j = 1; j < parts[i].n_summary; j++) {
            if (snprintf(line, sizeof line, "%*s%s\n", 10 + wname + wanchor, "", parts[i].summary[j]) >= (int)sizeof line)
                die("table of contents line too long for part", parts[i].name);
            buf_str(out, line);
        }
    }
}

/* the first anchor in [s, e) is ">>prefix:name", not a longer name */
static int opens_with_anchor(const char *s, const char *e, const char *prefix, const char *name) {
    char anchor[128];
    const char *a = strstr(s, ">>");
    size_t n;
    if (snprintf(anchor, sizeof anchor, ">>%s:%s", prefix, name) >= (int)sizeof anchor) return 0;
    n = strlen(anchor);
    if (!a || a >= e || strncmp(a, anchor, n) != 0) return 0;
    return !(a[n] == '_' || (a[n] >= 'a' && a[n] <= 'z') || (a[n] >= '0' && a[n] <= '9'));
}

int main(int argc, char **argv) {
    static part parts[MAX_PARTS];
    static const char *impl_of[MAX_PARTS];
    static char *text_of[MAX_PARTS];
    const char *marker = "/* @implementation */\n";
    int check = 0, n, i;
    char prefix[16], dir[1024], tmp[1100];
    const char *list_path, *out_path, *slash;
    char *list, *top, *mid, *end, *old, *at;
    size_t len, old_len;
    buf out = {NULL, 0, 0};
    FILE *f;

    if (argc == 4 && strcmp(argv[1], "--check") == 0) {
        check = 1;
        argv++;
        argc--;
    }
    if (argc != 3) {
        fprintf(stderr, "usage: amalgamate [--check] <dir>/PARTS <header.h>\n");
        return 2;
    }
    list_path = argv[1];
    out_path = argv[2];
    slash = strrchr(list_path, '/');
    if (!slash) strcpy(dir, ".");
    else {
        if ((size_t)(slash - list_path) >= sizeof dir) die("path too long:", list_path);
        memcpy(dir, list_path, (size_t)(slash - list_path));
        dir[slash - list_path] = 0;
    }
    list = read_file(list_path, &len);
    if (!list) die("cannot read the list", list_path);
    n = parse_list(list, prefix, parts);

    top = read_required(dir, "header_top.h", &len);
    mid = read_required(dir, "header_impl.h", &len);
    end = read_required(dir, "header_end.h", &len);

    /* the top, its @toc line replaced */
    at = strstr(top, "\n@toc\n");
    if (!at) die("header_top.h has no line \"@toc\"", NULL);
    buf_add(&out, top, (size_t)(at - top) + 1);
    add_toc(&out, prefix, parts, n);
    buf_str(&out, at + 6);

    for (i = 0; i < n; i++) { /* declarations, checked for their anchor and the marker */
        char name[128];
        char *m;
        if (snprintf(name, sizeof name, "%s.h", parts[i].name) >= (int)sizeof name) die("part name too long:", parts[i].name);
        text_of[i] = read_required(dir, name, &len);
        m = strstr(text_of[i], marker);
        if (!m || (m != text_of[i] && m[-1] != '\n')) die("no line \"/* @implementation */\" in part", name);
        if (strstr(m + strlen(marker), marker)) die("two implementation markers in part", name);
        if (!opens_with_anchor(text_of[i], m, prefix, parts[i].name))
            die("the declarations do not open with their anchor >>prefix:name in part", name);
        if (!opens_with_anchor(m, m + strlen(m), prefix, parts[i].name))
            die("the implementation does not open with its anchor >>prefix:name in part", name);
        buf_add(&out, text_of[i], (size_t)(m - text_of[i]));
        impl_of[i] = m + strlen(marker);
    }
    buf_str(&out, mid);
    for (i = 0; i < n; i++) buf_str(&out, impl_of[i]);
    buf_str(&out, end);

    old = read_file(out_path, &old_len);
    if (old && old_len == out.n && memcmp(old, out.p, out.n) == 0) return 0;
    if (check) {
        fprintf(stderr, "%s is not the amalgamation of %s: edit the parts, not the header, then run "
                        "`make amalgamate` and commit both\n", out_path, list_path);
        return 1;
    }
    if ((size_t)snprintf(tmp, sizeof tmp, "%s.tmp", out_path) >= sizeof tmp) die("path too long:", out_path);
    f = fopen(tmp, "wb");
    if (!f) die("cannot write", tmp);
    if (fwrite(out.p, 1, out.n, f) != out.n || fclose(f) != 0) {
        remove(tmp);
        die("write error on", tmp);
    }
    if (rename(tmp, out_path) != 0) {
        remove(tmp);
        die("cannot rename onto", out_path);
    }
    printf("amalgamate: wrote %s (%d parts, %lu bytes)\n", out_path, n, (unsigned long)out.n);
    return 0;
}
