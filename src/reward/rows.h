/* ============================================================================================
   >>rwd:rows  multi-objective rows from CSV or JSON Lines; missing values are NaN
   ============================================================================================
   Absolute-rating data sets rate each response on only some objectives (ArmoRM's mix, arXiv
   2406.12845 section 3: HelpSteer rates five, BeaverTails only safety), so a missing value is
   data, not an error. The caller names the columns it wants: numbers (NaN where missing) and
   texts. Missing number: an empty CSV field, NA, NaN, nan, null; in JSON null or an absent
   key (true/false read as 1/0, as is_safe labels are). Anything else that is not a finite
   number fails with its line, column number and column name. */

typedef struct rwd_rows {
    int n_num, n_text; /* columns read as numbers, as texts                                   */
    double *num;       /* (n, n_num) row-major; NaN where a value is missing                   */
    char **text;       /* (n, n_text) owned NUL-terminated UTF-8 (NULL when n_text == 0)        */
    int *line;         /* (n) the input line where each row starts                             */
    size_t n, cap;
} rwd_rows; /* zero it to start; rows are appended, so one rwd_rows can gather several files */

/* CSV (RFC 4180: comma separated, double quotes, "" inside quotes, quoted newlines; \r\n or \n;
   blank lines skipped) with a header line naming the columns; extra columns are ignored. */
RWDDEF moe_status rwd_rows_parse_csv(rwd_rows *r, const char *text, size_t len, const char *const *num_cols,
                                     int n_num, const char *const *text_cols, int n_text, moe_err *err);
/* JSON Lines: one object per line; a text column must be a string member of every object. */
RWDDEF moe_status rwd_rows_parse_jsonl(rwd_rows *r, const char *text, size_t len, const char *const *num_cols,
                                       int n_num, const char *const *text_cols, int n_text, moe_err *err);
RWDDEF void rwd_rows_free(rwd_rows *r);

/* @implementation */
/* ============================================================================================
   >>rwd:rows
   ============================================================================================ */

static moe_status rwd__rows_begin(rwd_rows *r, int n_num, int n_text, const char *const *num_cols,
                                  const char *const *text_cols, moe_err *err) {
    int k;
    if (!r || n_num < 0 || n_text < 0 || n_num + n_text < 1 || (n_num && !num_cols) || (n_text && !text_cols))
        return moe_err_set(err, MOE_ERR_INVALID_ARG, "rows: name at least one column to read");
    for (k = 0; k < n_num + n_text; k++)
        if (!(k < n_num ? num_cols[k] : text_cols[k - n_num]))
            return moe_err_set(err, MOE_ERR_INVALID_ARG, "rows: column name %d is NULL", k);
    if (r->n > 0 && (r->n_num != n_num || r->n_text != n_text))
        return moe_err_set(err, MOE_ERR_INVALID_ARG, "rows: appending %d + %d columns to rows of %d + %d", n_num, n_text, r->n_num, r->n_text);
    r->n_num = n_num;
    r->n_text = n_text;
    return MOE_OK;
}

/* room for one more row; its texts start NULL */
static moe_status rwd__rows_push(rwd_rows *r, int line, moe_err *err) {
    size_t k;
    if (r->n == r->cap) {
        size_t cap = r->cap ? 2 * r->cap : 256;
        double *num = (double *)MOE_MALLOC(cap * (size_t)(r->n_num ? r->n_num : 1) * sizeof(double));
        char **text = r->n_text ? (char **)MOE_MALLOC(cap * (size_t)r->n_text * sizeof(char *)) : NULL;
        int *lines = (int *)MOE_MALLOC(cap * sizeof(int));
        if (!num || !lines || (r->n_text && !text)) {
            MOE_FREE(num); MOE_FREE(text); MOE_FREE(lines);
            return moe_err_set(err, MOE_ERR_NOMEM, "out of memory for %zu rows", cap);
        }
        if (r->n) {
            memcpy(num, r->num, r->n * (size_t)r->n_num * sizeof(double));
            if (r->n_text) memcpy(text, r->text, r->n * (size_t)r->n_text * sizeof(char *));
            memcpy(lines, r->line, r->n * sizeof(int));
        }
        MOE_FREE(r->num); MOE_FREE(r->text); MOE_FREE(r->line);
        r->num = num; r->text = text; r->line = lines;
        r->cap = cap;
    }
    for (k = 0; k < (size_t)r->n_text; k++) r->text[r->n * (size_t)r->n_text + k] = NULL;
    r->line[r->n] = line;
    r->n++;
    return MOE_OK;
}

static void rwd__rows_drop_last(rwd_rows *r) { /* a row that failed half-way */
    size_t k;
    r->n--;
    for (k = 0; k < (size_t)r->n_text; k++) MOE_FREE(r->text[r->n * (size_t)r->n_text + k]);
}

RWD__IMPL void rwd_rows_free(rwd_rows *r) {
    size_t i;
    if (!r) return;
    for (i = 0; i < r->n * (size_t)r->n_text; i++) MOE_FREE(r->text[i]);
    MOE_FREE(r->num); MOE_FREE(r->text); MOE_FREE(r->line);
    memset(r, 0, sizeof *r);
}

/* a number field: 1 = value, 0 = missing, -1 = not a finite number */
static int rwd__rows_number(const char *s, size_t n, double *v) {
    char buf[64], *end;
    while (n > 0 && (*s == ' ' || *s == '\t')) { s++; n--; }
    while (n > 0 && (s[n - 1] == ' ' || s[n - 1] == '\t')) n--;
    if (n == 0 || (n == 2 && memcmp(s, "NA", 2) == 0) || (n == 3 && (memcmp(s, "NaN", 3) == 0 || memcmp(s, "nan", 3) == 0)) ||
        (n == 4 && memcmp(s, "null", 4) == 0)) {
        *v = NAN;
        return 0;
    }
    if (n >= sizeof buf) { *v = NAN; return -1; }
    memcpy(buf, s, n);
    buf[n] = 0;
    *v = strtod(buf, &end);
    return (*end == 0 && isfinite(*v)) ? 1 : -1;
}

/* One CSV record from text[*pos]: fields unquoted into *scratch (each NUL-terminated), their
   offsets in *fields. *line advances over the newlines inside. Returns the field count, or -1
   for a quote that never closes or a stray character after a closing quote. */
static int rwd__csv_record(const char *text, size_t len, size_t *pos, int *line, char **scratch, size_t *scap,
                           size_t **fields, size_t *fcap, int *bad_field) {
    size_t p = *pos, out = 0;
    int nf = 0;
    for (;;) {
        int quoted = p < len && text[p] == '"';
        if (!rwd__grow((void **)fields, fcap, (size_t)nf + 1, sizeof(size_t))) return -2;
        (*fields)[nf] = out;
        if (quoted) p++;
        for (;;) {
            char c;
            if (p >= len) {
                if (quoted) { *bad_field = nf; return -1; }
                break;
            }
            c = text[p];
            if (quoted) {
                if (c == '"') {
                    if (p + 1 < len && text[p + 1] == '"') { p += 2; c = '"'; }
                    else {
                        p++;
                        if (p < len && text[p] != ',' && text[p] != '\n' && text[p] != '\r') { *bad_field = nf; return -1; }
                        break;
                    }
                } else {
                    if (c == '\n') (*line)++;
                    p++;
                }
            } else {
                if (c == ',' || c == '\n' || c == '\r') break;
                p++;
            }
            if (!rwd__grow((void **)scratch, scap, out + 2, 1)) return -2;
            (*scratch)[out++] = c;
        }
        if (!rwd__grow((void **)scratch, scap, out + 1, 1)) return -2;
        (*scratch)[out++] = 0;
        nf++;
        if (p < len && text[p] == ',') { p++; continue; }
        if (p < len && text[p] == '\r') p++;
        if (p < len && text[p] == '\n') p++;
        break;
    }
    *pos = p;
    return nf;
}

static char *rwd__rows_strdup(const char *s) {
    size_t n = strlen(s);
    char *d = (char *)MOE_MALLOC(n + 1);
    if (d) memcpy(d, s, n + 1);
    return d;
}

RWD__IMPL moe_status rwd_rows_parse_csv(rwd_rows *r, const char *text, size_t len, const char *const *num_cols,
                                        int n_num, const char *const *text_cols, int n_text, moe_err *err) {
    char *scratch = NULL;
    size_t scap = 0, fcap = 0, *fields = NULL, pos = 0;
    int *col = NULL, line = 1, header_line, nf_header = 0, k, bad = 0, rows_before;
    moe_status st = rwd__rows_begin(r, n_num, n_text, num_cols, text_cols, err);
    if (st != MOE_OK) return st;
    if (!text) return moe_err_set(err, MOE_ERR_INVALID_ARG, "rows: no CSV text");
    rows_before = (int)r->n;
    col = (int *)MOE_MALLOC((size_t)(n_num + n_text) * sizeof(int));
    if (!col) return moe_err_set(err, MOE_ERR_NOMEM, "out of memory");
    while (pos < len && (text[pos] == '\n' || text[pos] == '\r')) { line += text[pos] == '\n'; pos++; }
    if (pos >= len) { st = moe_err_set(err, MOE_ERR_FORMAT, "CSV: no header line (empty input)"); goto done; }
    header_line = line;
    nf_header = rwd__csv_record(text, len, &pos, &line, &scratch, &scap, &fields, &fcap, &bad);
    if (nf_header < 0) {
        st = nf_header == -2 ? moe_err_set(err, MOE_ERR_NOMEM, "out of memory") : moe_err_set(err, MOE_ERR_FORMAT, "CSV line %d, column %d: unbalanced quotes", header_line, bad + 1);
        goto done;
    }
    for (k = 0; k < n_num + n_text; k++) { /* the first header field of each requested name */
        const char *want = k < n_num ? num_cols[k] : text_cols[k - n_num];
        int j;
        col[k] = -1;
        for (j = 0; j < nf_header && col[k] < 0; j++)
            if (strcmp(scratch + fields[j], want) == 0) col[k] = j;
        if (col[k] < 0) { st = moe_err_set(err, MOE_ERR_FORMAT, "CSV line %d: no column '%s' in the header", header_line, want); goto done; }
    }
    line++;
    while (pos < len && st == MOE_OK) {
        int start = line, nf;
        if (text[pos] == '\n' || text[pos] == '\r') { line += text[pos] == '\n'; pos++; continue; } /* blank line */
        nf = rwd__csv_record(text, len, &pos, &line, &scratch, &scap, &fields, &fcap, &bad);
        if (nf == -2) { st = moe_err_set(err, MOE_ERR_NOMEM, "out of memory"); break; }
        if (nf < 0) { st = moe_err_set(err, MOE_ERR_FORMAT, "CSV line %d, column %d: unbalanced quotes", start, bad + 1); break; }
        if (nf != nf_header) { st = moe_err_set(err, MOE_ERR_FORMAT, "CSV line %d: %d fields, the header has %d", start, nf, nf_header); break; }
        if ((st = rwd__rows_push(r, start, err)) != MOE_OK) break;
        for (k = 0; k < n_num + n_text && st == MOE_OK; k++) {
            const char *f = scratch + fields[col[k]];
            if (k < n_num) {
                double v = NAN;
                if (rwd__rows_number(f, strlen(f), &v) < 0)
                    st = moe_err_set(err, MOE_ERR_FORMAT, "CSV line %d, column %d ('%s'): '%.40s' is not a number (leave it empty or NA when missing)", start, col[k] + 1, num_cols[k], f);
                r->num[(r->n - 1) * (size_t)n_num + (size_t)k] = v;
            } else {
                char *s = rwd__rows_strdup(f);
                if (!s) st = moe_err_set(err, MOE_ERR_NOMEM, "out of memory");
                r->text[(r->n - 1) * (size_t)n_text + (size_t)(k - n_num)] = s;
            }
        }
        if (st != MOE_OK) rwd__rows_drop_last(r);
        line++;
    }
    if (st == MOE_OK && (int)r->n == rows_before) st = moe_err_set(err, MOE_ERR_FORMAT, "CSV: a header but no rows");
done:
    MOE_FREE(scratch);
    MOE_FREE(fields);
    MOE_FREE(col);
    return st;
}

RWD__IMPL moe_status rwd_rows_parse_jsonl(rwd_rows *r, const char *text, size_t len, const char *const *num_cols,
                                          int n_num, const char *const *text_cols, int n_text, moe_err *err) {
    rwd_json doc;
    size_t start = 0, rows_before;
    int line = 1, k;
    moe_status st = rwd__rows_begin(r, n_num, n_text, num_cols, text_cols, err);
    if (st != MOE_OK) return st;
    if (!text) return moe_err_set(err, MOE_ERR_INVALID_ARG, "rows: no JSON Lines text");
    rows_before = r->n;
    memset(&doc, 0, sizeof doc);
    while (start < len && st == MOE_OK) {
        const char *nl = (const char *)memchr(text + start, '\n', len - start);
        size_t end = nl ? (size_t)(nl - text) : len, e = end, b = start;
        const rwd_json_node *root;
        while (e > b && (text[e - 1] == '\r' || text[e - 1] == ' ' || text[e - 1] == '\t')) e--;
        while (b < e && (text[b] == ' ' || text[b] == '\t')) b++;
        if (e > b) {
            if ((st = rwd_json_parse(&doc, text + b, e - b, line, err)) != MOE_OK) break;
            root = rwd_json_root(&doc);
            if (root->type != RWD_JSON_OBJECT) { st = moe_err_set(err, MOE_ERR_FORMAT, "JSON line %d: expected an object", line); break; }
            if ((st = rwd__rows_push(r, line, err)) != MOE_OK) break;
            for (k = 0; k < n_num + n_text && st == MOE_OK; k++) {
                const char *name = k < n_num ? num_cols[k] : text_cols[k - n_num];
                const rwd_json_node *m = rwd_json_member(&doc, root, name);
                if (k < n_num) {
                    double v = NAN;
                    if (m && m->type == RWD_JSON_NUMBER) v = m->number;
                    else if (m && (m->type == RWD_JSON_TRUE || m->type == RWD_JSON_FALSE)) v = m->type == RWD_JSON_TRUE;
                    else if (m && m->type != RWD_JSON_NULL)
                        st = moe_err_set(err, MOE_ERR_FORMAT, "JSON line %d, column %d ('%s'): %s is not a number (use null or leave the key out when missing)",
                                         m->line, k + 1, name, m->type == RWD_JSON_STRING ? "a string" : m->type == RWD_JSON_ARRAY ? "an array" : "an object");
                    r->num[(r->n - 1) * (size_t)n_num + (size_t)k] = v;
                } else {
                    const char *s = rwd_json_string(&doc, m);
                    char *c;
                    if (!s) { st = moe_err_set(err, MOE_ERR_FORMAT, "JSON line %d, column %d ('%s'): %s", line, k + 1, name, m ? "not a string" : "missing (text columns are required)"); break; }
                    c = rwd__strndup(s, m->str_len);
                    if (!c) st = moe_err_set(err, MOE_ERR_NOMEM, "out of memory");
                    r->text[(r->n - 1) * (size_t)n_text + (size_t)(k - n_num)] = c;
                }
            }
            if (st != MOE_OK) rwd__rows_drop_last(r);
        }
        start = end + 1;
        line++;
    }
    rwd_json_free(&doc);
    if (st == MOE_OK && r->n == rows_before) st = moe_err_set(err, MOE_ERR_FORMAT, "JSON Lines: no rows (empty input?)");
    return st;
}
