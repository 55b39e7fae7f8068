/* test_data.c - the Brown corpus detokeniser (examples/data/brown_text.h) on tricky tokens and
   on real excerpts committed in tests/data/brown_sample/, then, when `make data` has run, the
   prepared corpus in data/brown/. Runs from the repository root, as `make test` does. */
#include "test.h"

#include "examples/data/brown_text.h"

/* plain text of a tagged string */
static const char *detok(brown_text *t, const char *src) {
    t->len = 0;
    if (brown_detokenise(t, src, strlen(src))) return "(out of memory)";
    return t->data ? t->data : "";
}

#define CHECK_TEXT(t, src, want)                                                              \
    do {                                                                                      \
        const char *got_ = detok(t, src);                                                     \
        CHECK(strcmp(got_, want) == 0, "detokenise %s\n  got  [%s]\n  want [%s]", #src, got_, \
              want);                                                                          \
    } while (0)

static void test_genres(void) {
    const char *letters = BROWN_GENRE_LETTERS;
    const char *want[15] = {"news",       "editorial", "reviews", "religion",        "hobbies",
                            "lore",       "belles-lettres", "government", "learned", "fiction",
                            "mystery",    "science-fiction", "adventure", "romance", "humor"};
    int i, ok = 1;
    TEST_BEGIN("brown_genre: the 15 Brown categories a..r by name");
    CHECK(strlen(letters) == 15, "15 genre letters, got %d", (int)strlen(letters));
    for (i = 0; i < 15 && letters[i]; i++) {
        const char *g = brown_genre(letters[i]);
        if (!g || strcmp(g, want[i]) != 0) ok = 0;
        CHECK(g && strcmp(g, want[i]) == 0, "genre of '%c' is %s, want %s", letters[i], g ? g : "NULL", want[i]);
    }
    CHECK(ok, "all genre names");
    CHECK(!brown_genre('i') && !brown_genre('o') && !brown_genre('q') && !brown_genre('s') &&
          !brown_genre('A') && !brown_genre('\0'), "unused letters have no genre");
}

static void test_rules(void) {
    brown_text t = {NULL, 0, 0};
    TEST_BEGIN("brown_detokenise: tags, spacing, quotes, paragraphs, headings");
    CHECK_TEXT(&t, "", "");
    CHECK_TEXT(&t, "\n\n\n", "");
    /* tags: split at the last '/', any tag shape; leading tab, trailing blanks, CRLF */
    CHECK_TEXT(&t, "\tThe/at Fulton/np-tl County/nn-tl said/vbd ./. \r\n", "The Fulton County said.\n");
    CHECK_TEXT(&t, "Atlanta's/np$ men/nns didn't/dod* go/vb ;/. he's/pps+bez here/rb", "Atlanta's men didn't go; he's here\n");
    CHECK_TEXT(&t, "a/at 1/2/cd inch/nn and/or/cc mg/l/hr/nn //in hr./nn AAb//nn", "a 1/2 inch and/or mg/l/hr / hr. AAb/\n");
    CHECK_TEXT(&t, "untagged words stay", "untagged words stay\n");
    /* punctuation attaches to the left; brackets open to the right */
    CHECK_TEXT(&t, "Yes/rb ,/, sir/nn :/: (/( well/rb )/) [/( so/rb ]/) ?/. !/. !/.", "Yes, sir: (well) [so]?!!\n");
    CHECK_TEXT(&t, "men/nns --/-- who/wps wore/vbd term-end/nn suits/nns", "men -- who wore term-end suits\n");
    /* detached clitics attach (any case); 'em is a word */
    CHECK_TEXT(&t, "it/pps is/bez n't/* John/np 's/$ ,/, WE/ppss 'RE/ber get/vb 'em/ppo", "it isn't John's, WE'RE get 'em\n");
    /* a sentence-final period after an abbreviation is dropped; a lone period is kept */
    CHECK_TEXT(&t, "won/vbn by/in Ivan/np Allen/np Jr./np ./. and/cc etc./rb ./.", "won by Ivan Allen Jr. and etc.\n");
    CHECK_TEXT(&t, "Mr./np Pye/np ./.", "Mr. Pye.\n");
    /* `` '' hug the quoted text */
    CHECK_TEXT(&t, "He/pps said/vbd ,/, ``/`` No/rb ,/, thanks/nns ''/'' ,/, softly/rb ./.", "He said, \"No, thanks\", softly.\n");
    CHECK_TEXT(&t, "``/`` Hi/uh ./. ''/'' ``/`` Bye/uh ''/''", "\"Hi.\" \"Bye\"\n");
    /* lone ' alternates open/close on a line; it resets at the end of a paragraph */
    CHECK_TEXT(&t, "more/ap '/' pro/jj '/' than/in '/' con/jj '/' letters/nns", "more 'pro' than 'con' letters\n");
    CHECK_TEXT(&t, "see/vb :/: '/' City/nn Hooked/vbn '/' ''/'' ?/.", "see: 'City Hooked'\"?\n");
    CHECK_TEXT(&t, "a/at '/' b/nn\n\n'/' c/nn '/'", "a 'b\n'c'\n");
    /* paragraphs: blank-line separated blocks -> one line each; sentences joined by a space */
    CHECK_TEXT(&t, "\n\n\tA/at ./.\nB/np ./.\n\n\n\tC/np ./.\n", "A. B.\nC.\n");
    /* headings: half or more of the tokens tagged -hl -> a line of their own */
    CHECK_TEXT(&t, "Merger/nn-hl proposed/vbn-hl \nHowever/wrb ,/, yes/rb ./.\n", "Merger proposed\nHowever, yes.\n");
    CHECK_TEXT(&t, "Criticality/nn-hl :/:\nIt/pps is/bez ./.", "Criticality:\nIt is.\n");
    CHECK_TEXT(&t, "'/' back/rb-hl with/in-hl the/at-hl Met/np-hl\nthe/at '/' Met/np '/' ./.", "'back with the Met\nthe 'Met'.\n");
    CHECK_TEXT(&t, "Dr./nn-tl Conant's/np$-hl specific/jj views/nns ./.\nNext/ap ./.", "Dr. Conant's specific views. Next.\n");
    CHECK_TEXT(&t, "a/nn-hlx b/nn-tl-hl c/nn", "a b c\n"); /* -hlx is not a headline tag */
    /* appending: two documents in one buffer */
    t.len = 0;
    CHECK(brown_detokenise(&t, "A/at ./.", 8) == 0 && brown_detokenise(&t, "B/at ./.", 8) == 0 &&
          strcmp(t.data, "A.\nB.\n") == 0, "brown_detokenise appends");
    brown_text_free(&t);
    CHECK(t.data == NULL && t.len == 0, "brown_text_free empties the buffer");
}

static int read_all(const char *path, brown_text *t) {
    FILE *f = fopen(path, "rb");
    char buf[4096];
    size_t n;
    t->len = 0;
    if (!f) return -1;
    while ((n = fread(buf, 1, sizeof buf, f)) > 0) brown_text_put(t, buf, n);
    fclose(f);
    return brown_text_put(t, "", 0);
}

static void check_sample(const char *name, const char *want) {
    brown_text src = {NULL, 0, 0}, out = {NULL, 0, 0};
    char path[256];
    snprintf(path, sizeof path, "tests/data/brown_sample/%s", name);
    if (!CHECK(read_all(path, &src) == 0, "read %s", path)) return;
    CHECK(brown_detokenise(&out, src.data, src.len) == 0 && strcmp(out.data, want) == 0,
          "%s: got\n[%s]\nwant\n[%s]", path, out.data ? out.data : "", want);
    brown_text_free(&src);
    brown_text_free(&out);
}

static void test_samples(void) {
    TEST_BEGIN("brown_detokenise: excerpts of ca01, ca09, cj02, ck01 in tests/data/brown_sample/");
    /* news: quotes, possessive, heading, multi-sentence quote, n't */
    check_sample("ca01",
                 "The Fulton County Grand Jury said Friday an investigation of Atlanta's recent primary "
                 "election produced \"no evidence\" that any irregularities took place.\n"
                 "The jury further said in term-end presentments that the City Executive Committee, which "
                 "had over-all charge of the election, \"deserves the praise and thanks of the City of "
                 "Atlanta\" for the manner in which the election was conducted.\n"
                 "Merger proposed\n"
                 "However, the jury said it believes \"these two offices should be combined to achieve "
                 "greater efficiency and reduce the cost of administration\".\n"
                 "\"This was the coolest, calmest election I ever saw\", Colquitt Policeman Tom Williams "
                 "said. \"Being at the polls was just like being at church. I didn't smell a drop of "
                 "liquor, and we didn't have a bit of trouble\".\n");
    /* news: single quotes inside double quotes, a punctuation run, a quoted heading */
    check_sample("ca09",
                 "\"We can claim on the maximum amount of the bond\", Berger said.\n"
                 "Wagner replied, \"Can't you just see the headline: 'City Hooked for $172,000'\"??\n"
                 "'know enough to sue'\n"
                 "Berger insisted that \"we know enough to sue for the full amount\".\n");
    /* learned: parentheses, multi-slash tokens 1/2/cd and 1/4/cd */
    check_sample("cj02",
                 "Argon was also blown at low velocities (mass flow rate Af) through a tube coaxial with "
                 "the cathode as an additional precaution against contamination of the arc by air. The "
                 "anode consisted of a 1/2 inch diameter porous graphite plug, 1/4 inch long.\n");
    /* fiction: a quote spanning two sentences, contractions */
    check_sample("ck01",
                 "\"The blueberry pie is good, Scotty. I recommend it\". He looked at his son, his face "
                 "worried. He said more loudly, \"I'm full, old Pop\".\n"
                 "\"He's all right, Craig\", Rachel said. \"I can fix him something later in the "
                 "afternoon when we get home\".\n");
}

static long file_size(const char *path) {
    FILE *f = fopen(path, "rb");
    long n;
    if (!f) return -1;
    fseek(f, 0, SEEK_END);
    n = ftell(f);
    fclose(f);
    return n;
}

/* documents in a prepared file: they are separated by one blank line */
static int count_documents(const brown_text *t) {
    int n = t->len > 0;
    const char *p = t->data;
    while (p && (p = strstr(p, "\n\n")) != NULL) {
        n++;
        p += 2;
    }
    return n;
}

static void test_prepared(void) {
    const char *letters = BROWN_GENRE_LETTERS;
    /* documents per genre (cats.txt); val gets index % 10 == 5, i.e. (n + 4) / 10 of them */
    const int docs[15] = {44, 27, 17, 17, 36, 48, 75, 30, 80, 29, 24, 6, 29, 29, 9};
    int split_ok = 1;
    char path[256];
    brown_text t = {NULL, 0, 0};
    long total = 0;
    int g, s, missing = 0, clean = 1;
    TEST_BEGIN("data/brown (make data): 15 genres, train and val, plausible sizes, no tags left");
    if (file_size("data/brown/train/news.txt") < 0) {
        printf("   skip: data/brown not found (run `make data` to check the prepared corpus too)\n");
        return;
    }
    for (g = 0; letters[g]; g++)
        for (s = 0; s < 2; s++) {
            long n;
            snprintf(path, sizeof path, "data/brown/%s/%s.txt", s ? "val" : "train", brown_genre(letters[g]));
            n = file_size(path);
            if (n < 0) missing++;
            /* smallest: science-fiction (6 documents, ~58 KB train, ~11 KB val) */
            CHECK(n > (s ? 8000 : 40000) && n < (s ? 200000 : 1500000), "%s: %ld bytes", path, n);
            total += n;
            if (n > 0 && read_all(path, &t) == 0) {
                int want = s ? (docs[g] + 4) / 10 : docs[g] - (docs[g] + 4) / 10;
                if (count_documents(&t) != want) {
                    split_ok = 0;
                    printf("   %s: %d documents, want %d\n", path, count_documents(&t), want);
                }
                if (strstr(t.data, "``") || strstr(t.data, "/at ") || strstr(t.data, "/nn ") ||
                    strchr(t.data, '\t') || strstr(t.data, "  ") || t.data[t.len - 1] != '\n') {
                    clean = 0;
                    printf("   %s: has tags, tabs, double spaces or no final newline\n", path);
                }
            }
        }
    CHECK(missing == 0, "%d of 30 genre files missing", missing);
    CHECK(split_ok, "documents per file follow the split (index %% 10 == 5 to val)");
    CHECK(total > 5500000 && total < 6500000, "about 6 MB in all: %ld bytes", total);
    CHECK(clean, "plain text: no `` no /at no /nn no tabs no double spaces, final newline");
    CHECK(read_all("data/brown/train/news.txt", &t) == 0 &&
          strncmp(t.data, "The Fulton County Grand Jury said Friday an investigation of Atlanta's", 70) == 0,
          "train/news.txt starts with ca01");
    CHECK(read_all("data/brown/val/news.txt", &t) == 0 && strncmp(t.data, "Plainfield\n-- James P. Mitchell and", 35) == 0,
          "val/news.txt starts with ca06 (the 6th news document)");
    brown_text_free(&t);
}

int main(void) {
    test_genres();
    test_rules();
    test_samples();
    test_prepared();
    return test_summary();
}
