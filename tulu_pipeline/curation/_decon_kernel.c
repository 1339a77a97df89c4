/* The decontamination filter kernel: tokenization, token hashes, n-gram window hashes and the
 * candidate filter of `EvalIndex.match_texts`, for a whole batch of texts in one call.
 *
 * It computes exactly what the numpy path computes (`_token_hashes`, `_mix`, the rolled window
 * hashes, the bit-filter probes and the confirmation against the sorted eval hashes), reading the
 * Python strings directly:
 *
 * - normalization (NFKC, then casefold) is done per *segment*: a character with NFKC_QC=Yes and
 *   combining class 0 (a "boundary", flag NOT_B clear) starts a segment, which runs to the next
 *   boundary. NFKC of a text is the concatenation of NFKC of its segments, and casefold is per
 *   character. A segment whose characters all have NFKC_QC=Yes with combining classes in order is
 *   unchanged by NFKC (CPython's quick check), so it is case-folded here with the per-code-point
 *   table; any other segment (compatibility characters, composable sequences, multi-character
 *   case folds) is handed to the Python `normalize` function and its result tokenized as is.
 * - token rule: a word runs from a word character (class 1) to the last word character before a
 *   separator (class 0) or a standalone character (class 2), punctuation (class 3) between its
 *   word characters included; a standalone character, and punctuation before or after a word (or
 *   in a run with no word character), is a token by itself. Punctuation after a word character is
 *   held as "pending" until the next character decides which it is. A token's hash is sum(b_k * P**k) mod 2**32 over the
 *   UTF-8 bytes b_k of the normalized token.
 * - key = mix(hash); window hashes W_L(t) = sum_i key[t+i] * Q**(L-1-i) mod 2**64, inside a row.
 * - probes: one-token items (every token, single filter), items of 2..n-1 tokens (every 2-token
 *   window, prefix filter, then rolled out), n-grams (every n-token window, main filter); a filter
 *   hit is confirmed by exact equality with the sorted hashes, giving the entry range [lo, hi).
 *
 * The per-code-point tables are computed in Python (`decontaminate._kernel_tables`) from the
 * running interpreter's unicodedata, so the kernel and `tokenize` always agree on the Unicode
 * version.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define TOKEN_P 0x01000193u
#define MIX 0x9E3779B97F4A7C15ull
#define WINDOW_Q 0xC2B2AE3D27D4EB4Full

#define CLS_SHIFT 21
#define CLS_MASK 3u
#define NOT_B (1u << 23)      /* not a segment boundary (combining class != 0 or NFKC_QC != Yes) */
#define QC_NOT_YES (1u << 24) /* NFKC_QC is No or Maybe */
#define MULTI_FOLD (1u << 25) /* casefold gives several characters */
#define CCC_SHIFT 26          /* rank of the canonical combining class (0 for class 0) */
#define FOLD_MASK 0x1FFFFFu
#define SLOW_BITS (NOT_B | QC_NOT_YES | MULTI_FOLD)

#define WORD 1
#define STANDALONE 2
#define PUNCT 3
#define N_POWERS 64
#define PREFETCH 64
#define WINDOW_BATCH 4096 /* windows waiting for their probes (at least; a long row adds all of its own) */
#define PUNCT_CODE 0x80 /* in ascii_code: punctuation (word characters' lower-cased bytes are < 0x80) */

typedef struct {
    int64_t *data;
    Py_ssize_t len, cap;
} Vec;

static int vec_push(Vec *v, int64_t x) {
    if (v->len == v->cap) {
        Py_ssize_t cap = v->cap ? 2 * v->cap : 1024;
        int64_t *d = realloc(v->data, (size_t)cap * sizeof(int64_t));
        if (!d) {
            PyErr_NoMemory();
            return -1;
        }
        v->data = d;
        v->cap = cap;
    }
    v->data[v->len++] = x;
    return 0;
}

typedef struct {
    uint32_t *raw; /* raw token hashes of the current text */
    Py_ssize_t nt, cap;
    uint32_t h, k; /* the word being built: its hash so far and its byte count */
    uint32_t in_token;
    uint32_t *pend; /* punctuation after the word's last word character (code points) */
    Py_ssize_t npend, pend_cap;
} Tok;

typedef struct {
    PyObject_HEAD
    int ngram;
    Py_buffer b_stage1, b_stage2, b_classes, b_main, b_main_bits, b_single_bits, b_prefix_bits, b_short;
    int have_buffers;
    const uint16_t *stage1;
    const uint32_t *stage2;
    const uint8_t *classes;
    const uint64_t *main_hash;
    Py_ssize_t n_main;
    const uint8_t *main_bits, *single_bits, *prefix_bits;
    unsigned main_shift, single_shift, prefix_shift;
    const uint64_t *short_hash;
    Py_ssize_t n_short;
    uint8_t *short_len; /* short_len[L] != 0: some item has L tokens (L < ngram) */
    int has_single, max_short;
    uint32_t *buckets; /* buckets[b]: first main hash whose top `bucket_bits` bits are >= b */
    int bucket_bits;
    uint64_t q_top; /* WINDOW_Q ** (ngram - 1) */
    PyObject *normalize;
    Tok tok;
    uint64_t *keys; /* keys of the current text */
    Py_ssize_t keys_cap;
    uint32_t ascii[128];      /* entries of ASCII code points */
    uint8_t ascii_cls[128];   /* their token classes */
    uint8_t ascii_lower[256]; /* byte value hashed for an ASCII word character (lower-cased), 0 for any other */
    uint8_t ascii_code[128];  /* ascii_lower, or PUNCT_CODE for punctuation: one load decides `ascii_run`'s path */
    uint32_t powers[N_POWERS]; /* TOKEN_P ** k */
    uint64_t *bloom;           /* blocked Bloom filter of the main hashes: 4 bits in one 64-bit word */
    int bloom_bits;            /* log2 of its number of words */
    uint64_t *windows;         /* n-token window hashes waiting for their probe (rows of one `scan` call) */
    int64_t *window_pos;       /* their token positions */
    Py_ssize_t windows_cap, n_windows;
} Scanner;

/* ---- tokens ------------------------------------------------------------------------------- */
static inline uint32_t entry_of(const Scanner *s, uint32_t cp) {
    return s->stage2[((uint32_t)s->stage1[cp >> 8] << 8) | (cp & 0xFF)];
}

/* the case fold of cp (when it is one character) from its entry */
static inline uint32_t fold_of(uint32_t cp, uint32_t e) { return (cp + e) & FOLD_MASK; }

static uint32_t pow_slow(uint32_t k) { /* TOKEN_P ** k for a long token */
    uint32_t r = 1, b = TOKEN_P;
    while (k) {
        if (k & 1) r *= b;
        b *= b;
        k >>= 1;
    }
    return r;
}

static inline uint32_t pow_at(const Scanner *s, uint32_t k) {
    return __builtin_expect(k < N_POWERS, 1) ? s->powers[k] : pow_slow(k);
}

/* room for `extra` more raw token hashes */
static int reserve(Tok *t, Py_ssize_t extra) {
    if (t->nt + extra <= t->cap) return 0;
    Py_ssize_t cap = t->cap ? t->cap : 4096;
    while (cap < t->nt + extra) cap *= 2;
    uint32_t *d = realloc(t->raw, (size_t)cap * sizeof(uint32_t));
    if (!d) {
        PyErr_NoMemory();
        return -1;
    }
    t->raw = d;
    t->cap = cap;
    return 0;
}

static inline int push(Tok *t, uint32_t h) {
    if (t->nt == t->cap && reserve(t, 1) < 0) return -1;
    t->raw[t->nt++] = h;
    return 0;
}

static inline void add_byte(const Scanner *s, Tok *t, uint32_t b) {
    t->h += b * pow_at(s, t->k);
    t->k++;
}

static inline void add_utf8(const Scanner *s, Tok *t, uint32_t cp) {
    if (cp < 0x80) {
        add_byte(s, t, cp);
    } else if (cp < 0x800) {
        add_byte(s, t, 0xC0 | (cp >> 6));
        add_byte(s, t, 0x80 | (cp & 0x3F));
    } else if (cp < 0x10000) {
        add_byte(s, t, 0xE0 | (cp >> 12));
        add_byte(s, t, 0x80 | ((cp >> 6) & 0x3F));
        add_byte(s, t, 0x80 | (cp & 0x3F));
    } else {
        add_byte(s, t, 0xF0 | (cp >> 18));
        add_byte(s, t, 0x80 | ((cp >> 12) & 0x3F));
        add_byte(s, t, 0x80 | ((cp >> 6) & 0x3F));
        add_byte(s, t, 0x80 | (cp & 0x3F));
    }
}

/* The hash of one character as a token by itself. */
static inline uint32_t char_hash(const Scanner *s, uint32_t cp) {
    Tok one = {0};
    add_utf8(s, &one, cp);
    return one.h;
}

/* The word being built (if any) ends: push it, then its trailing punctuation one by one. */
static inline int end_word(const Scanner *s, Tok *t) {
    if (!t->in_token) return 0;
    if (push(t, t->h) < 0) return -1;
    for (Py_ssize_t j = 0; j < t->npend; j++)
        if (push(t, char_hash(s, t->pend[j])) < 0) return -1;
    t->npend = 0;
    t->in_token = 0;
    t->h = 0;
    t->k = 0;
    return 0;
}

/* One normalized character of class `cls`. Outside a word, h and k are 0 and nothing is pending. */
static int feed(const Scanner *s, Tok *t, uint32_t cp, unsigned cls) {
    if (cls == WORD) {
        for (Py_ssize_t j = 0; j < t->npend; j++) add_utf8(s, t, t->pend[j]); /* inside the word after all */
        t->npend = 0;
        t->in_token = 1;
        add_utf8(s, t, cp);
        return 0;
    }
    if (cls == PUNCT) {
        if (!t->in_token) return push(t, char_hash(s, cp));
        if (t->npend == t->pend_cap) {
            Py_ssize_t cap = t->pend_cap ? 2 * t->pend_cap : 64;
            uint32_t *d = realloc(t->pend, (size_t)cap * sizeof(uint32_t));
            if (!d) {
                PyErr_NoMemory();
                return -1;
            }
            t->pend = d;
            t->pend_cap = cap;
        }
        t->pend[t->npend++] = cp;
        return 0;
    }
    if (end_word(s, t) < 0) return -1;
    if (cls == STANDALONE) return push(t, char_hash(s, cp));
    return 0;
}

/* One ASCII character: letters and digits extend the word directly while nothing is pending, and
 * separators outside a word do nothing (the common cases); the rest goes through `feed`. */
static inline int feed_ascii(const Scanner *s, Tok *t, uint32_t c) {
    unsigned cls = s->ascii_cls[c];
    if (cls == WORD && !t->npend) {
        t->h += s->ascii_lower[c] * pow_at(s, t->k);
        t->k++;
        t->in_token = 1;
        return 0;
    }
    if (cls == 0 && !t->in_token) return 0;
    return feed(s, t, cls == WORD ? s->ascii_lower[c] : c, cls);
}

/* A segment [a, b) of `text` that is not a single plain character. */
static int slow_segment(const Scanner *s, Tok *t, PyObject *text, int kind, const void *data, Py_ssize_t a,
                        Py_ssize_t b) {
    unsigned prev = 0;
    int plain = 1;
    for (Py_ssize_t j = a; j < b; j++) {
        uint32_t e = entry_of(s, PyUnicode_READ(kind, data, j));
        unsigned ccc = e >> CCC_SHIFT;
        if ((e & (QC_NOT_YES | MULTI_FOLD)) || (ccc && prev > ccc)) {
            plain = 0;
            break;
        }
        prev = ccc;
    }
    if (plain) { /* NFKC leaves it as it is: case-fold character by character */
        for (Py_ssize_t j = a; j < b; j++) {
            uint32_t cp = PyUnicode_READ(kind, data, j);
            uint32_t e = entry_of(s, cp);
            if (feed(s, t, fold_of(cp, e), (e >> CLS_SHIFT) & CLS_MASK) < 0) return -1;
        }
        return 0;
    }
    PyObject *sub = PyUnicode_Substring(text, a, b);
    if (!sub) return -1;
    PyObject *norm = PyObject_CallOneArg(s->normalize, sub);
    Py_DECREF(sub);
    if (!norm) return -1;
    if (!PyUnicode_Check(norm)) {
        Py_DECREF(norm);
        PyErr_SetString(PyExc_TypeError, "normalize must return str");
        return -1;
    }
    int nkind = PyUnicode_KIND(norm);
    const void *ndata = PyUnicode_DATA(norm);
    Py_ssize_t n = PyUnicode_GET_LENGTH(norm);
    for (Py_ssize_t j = 0; j < n; j++) {
        uint32_t cp = PyUnicode_READ(nkind, ndata, j);
        int rc;
        if (cp < 0x80) { /* as `_BYTE_VALUE`: ASCII letters lower-cased */
            uint32_t e = s->ascii[cp];
            rc = feed(s, t, fold_of(cp, e), (e >> CLS_SHIFT) & CLS_MASK);
        } else {
            rc = feed(s, t, cp, s->classes[cp]);
        }
        if (rc < 0) {
            Py_DECREF(norm);
            return -1;
        }
    }
    Py_DECREF(norm);
    return 0;
}

/* ASCII characters text[a..b) (each alone in its normalization segment), as `feed_ascii` one by one
 * but with the state in locals. A word's letters and digits are hashed in a tight inner loop (the
 * power of TOKEN_P in a register: about 30% fewer instructions than a branch-free step per character,
 * for about one mispredicted branch per word end). Punctuation after a word is a run read ahead to the
 * character that decides it (a word character: the run is inside the word; else each is a token, an
 * ASCII character hashing as its byte value), so no pending state is live in the main loop; a run
 * still undecided at b moves to t->pend. Inlined where `kind` is a constant, so that each code-unit
 * width reads its characters without a switch. */
static inline __attribute__((always_inline)) int ascii_run(const Scanner *s, Tok *t, int kind, const void *data,
                                                            Py_ssize_t a, Py_ssize_t b) {
    Py_ssize_t i = a;
    for (; i < b && t->npend; i++) /* punctuation pending from before the run */
        if (feed_ascii(s, t, PyUnicode_READ(kind, data, i)) < 0) return -1;
    if (reserve(t, b - i + 2) < 0) return -1; /* at most one token per character, plus one */
    uint32_t *raw = t->raw, h = t->h, k = t->k, in_tok = t->in_token;
    Py_ssize_t nt = t->nt, pend = -1;
    const uint8_t *code = s->ascii_code;
    for (; i < b; i++) {
        uint32_t v = code[PyUnicode_READ(kind, data, i)];
        if (v == 0) { /* a separator */
            if (in_tok) raw[nt++] = h;
            h = k = in_tok = 0;
            continue;
        }
        if (__builtin_expect(v >> 7, 0)) { /* punctuation: text[i..j) is a run of it */
            if (!in_tok) {
                raw[nt++] = PyUnicode_READ(kind, data, i);
                continue;
            }
            Py_ssize_t j = i + 1;
            while (j < b && code[PyUnicode_READ(kind, data, j)] >> 7) j++;
            if (j == b) { /* still pending where the run ends */
                pend = i;
                break;
            }
            v = code[PyUnicode_READ(kind, data, j)];
            if (v == 0) { /* the word ends, then its trailing punctuation, one token each */
                raw[nt++] = h;
                for (Py_ssize_t q = i; q < j; q++) raw[nt++] = PyUnicode_READ(kind, data, q);
                h = k = in_tok = 0;
                i = j;
                continue;
            }
            /* a word character: the punctuation is inside the word */
            for (Py_ssize_t q = i; q < j; q++) h += (uint32_t)PyUnicode_READ(kind, data, q) * pow_at(s, k++);
            i = j;
        }
        /* a word character (v: its lower-cased byte), then the word characters right after it */
        uint32_t pw = pow_at(s, k);
        in_tok = 1;
        for (;;) {
            h += v * pw;
            pw *= TOKEN_P;
            k++;
            if (i + 1 == b) break;
            uint32_t next = code[PyUnicode_READ(kind, data, i + 1)];
            if (next - 1 >= PUNCT_CODE - 1) break; /* a separator (0) or punctuation */
            v = next;
            i++;
        }
    }
    t->nt = nt;
    t->h = h;
    t->k = k;
    t->in_token = in_tok;
    if (pend >= 0)
        for (Py_ssize_t j = pend; j < b; j++)
            if (feed(s, t, PyUnicode_READ(kind, data, j), PUNCT) < 0) return -1;
    return 0;
}

/* The characters of text[0..n) (code units of type T): runs of ASCII characters (each followed by
 * an ASCII character, so alone in its normalization segment) go through `ascii_run`; elsewhere a
 * segment runs from a boundary to the next one, and a plain character alone in its segment is
 * case-folded by the table, any other segment goes to `slow_segment`. */
/* the bits of a 64-bit word of code units of type T that are set when one of them is not ASCII */
#define HIGH_BITS(T) \
    (sizeof(T) == 1 ? 0x8080808080808080ull : sizeof(T) == 2 ? 0xFF80FF80FF80FF80ull : 0xFFFFFF80FFFFFF80ull)

#define SEGMENT_LOOP(T, K)                                                                                \
    {                                                                                                    \
        const T *p = (const T *)data;                                                                    \
        Py_ssize_t i = 0;                                                                                \
        while (i < n) {                                                                                  \
            if (p[i] < 128) { /* the ASCII run ends before the last ASCII character before a non-ASCII one */ \
                Py_ssize_t q = i;                                                                        \
                while (q + (Py_ssize_t)(8 / sizeof(T)) <= n) { /* 8 bytes of code units at a time */     \
                    uint64_t x;                                                                          \
                    memcpy(&x, p + q, 8);                                                                \
                    if (x & HIGH_BITS(T)) break;                                                         \
                    q += 8 / sizeof(T);                                                                  \
                }                                                                                        \
                while (q < n && p[q] < 128) q++;                                                         \
                Py_ssize_t j = q == n ? n : q - 1;                                                       \
                if (j > i) {                                                                             \
                    if (ascii_run(s, t, K, data, i, j) < 0) return -1;                                   \
                    i = j;                                                                               \
                    continue;                                                                            \
                }                                                                                        \
            }                                                                                            \
            uint32_t cp = p[i];                                                                          \
            uint32_t e = cp < 128 ? s->ascii[cp] : entry_of(s, cp);                                      \
            Py_ssize_t j = i + 1;                                                                        \
            while (j < n) {                                                                              \
                uint32_t ncp = p[j];                                                                     \
                if (ncp < 128 || !(entry_of(s, ncp) & NOT_B)) break;                                     \
                j++;                                                                                     \
            }                                                                                            \
            if (j == i + 1 && !(e & SLOW_BITS)) {                                                        \
                if (feed(s, t, fold_of(cp, e), (e >> CLS_SHIFT) & CLS_MASK) < 0) return -1;              \
            } else if (slow_segment(s, t, text, kind, data, i, j) < 0) {                                 \
                return -1;                                                                               \
            }                                                                                            \
            i = j;                                                                                       \
            if (reserve(t, n - i + 1) < 0) return -1;                                                    \
        }                                                                                                \
    }

/* The raw token hashes of one text appended to t->raw. */
static int tokenize_text(const Scanner *s, Tok *t, PyObject *text) {
    Py_ssize_t n = PyUnicode_GET_LENGTH(text);
    t->in_token = 0;
    t->h = 0;
    t->k = 0;
    t->npend = 0;
    if (n == 0) return 0;
    if (reserve(t, n + 1) < 0) return -1;
    if (PyUnicode_IS_ASCII(text)) {
        if (ascii_run(s, t, PyUnicode_1BYTE_KIND, PyUnicode_DATA(text), 0, n) < 0) return -1;
    } else {
        int kind = PyUnicode_KIND(text);
        const void *data = PyUnicode_DATA(text);
        if (kind == PyUnicode_1BYTE_KIND) SEGMENT_LOOP(Py_UCS1, PyUnicode_1BYTE_KIND)
        else if (kind == PyUnicode_2BYTE_KIND) SEGMENT_LOOP(Py_UCS2, PyUnicode_2BYTE_KIND)
        else SEGMENT_LOOP(Py_UCS4, PyUnicode_4BYTE_KIND)
    }
    return end_word(s, t);
}

/* keys (mixed token hashes) of raw[0..n) into the scanner's key buffer */
static uint64_t *mix_keys(Scanner *s, const uint32_t *raw, Py_ssize_t n) {
    if (n > s->keys_cap || !s->keys) { /* (allocated even for no token: NULL means an error) */
        Py_ssize_t cap = s->keys_cap ? s->keys_cap : 4096;
        while (cap < n) cap *= 2;
        uint64_t *d = realloc(s->keys, (size_t)cap * sizeof(uint64_t));
        if (!d) {
            PyErr_NoMemory();
            return NULL;
        }
        s->keys = d;
        s->keys_cap = cap;
    }
    uint64_t *keys = s->keys;
    for (Py_ssize_t i = 0; i < n; i++) {
        uint64_t key = ((uint64_t)raw[i] + 1) * MIX;
        keys[i] = key ^ (key >> 31);
    }
    return keys;
}

/* ---- probes -------------------------------------------------------------------------------- */
static inline int probe(const uint8_t *bits, unsigned shift, uint64_t h) {
    uint64_t slot = h >> shift;
    return (bits[slot >> 3] >> (slot & 7)) & 1;
}

/* The blocked Bloom filter: word from the top bits, four bit positions from the next 24 bits. */
static inline uint64_t bloom_mask(uint64_t h) {
    return (1ull << ((h >> 8) & 63)) | (1ull << ((h >> 14) & 63)) | (1ull << ((h >> 20) & 63)) |
           (1ull << ((h >> 26) & 63));
}

static inline int bloom_probe(const Scanner *s, uint64_t h) {
    uint64_t m = bloom_mask(h);
    return (s->bloom[h >> (64 - s->bloom_bits)] & m) == m;
}

static inline int find_main(const Scanner *s, uint64_t h, int64_t *lo, int64_t *hi) {
    uint64_t b = s->bucket_bits ? h >> (64 - s->bucket_bits) : 0;
    Py_ssize_t i = s->buckets[b], e = s->buckets[b + 1];
    while (i < e && s->main_hash[i] < h) i++;
    if (i == e || s->main_hash[i] != h) return 0;
    *lo = i;
    while (i < e && s->main_hash[i] == h) i++;
    *hi = i;
    return 1;
}

static inline int find_short(const Scanner *s, uint64_t h, int64_t *lo, int64_t *hi) {
    Py_ssize_t a = 0, b = s->n_short;
    while (a < b) {
        Py_ssize_t m = (a + b) / 2;
        if (s->short_hash[m] < h) a = m + 1;
        else b = m;
    }
    if (a == s->n_short || s->short_hash[a] != h) return 0;
    *lo = a;
    b = a;
    while (b < s->n_short && s->short_hash[b] == h) b++;
    *hi = b;
    return 1;
}

typedef struct {
    Vec pos, len, lo, hi;
} Cands;

static inline int add_cand(Cands *c, int64_t pos, int64_t len, int64_t lo, int64_t hi) {
    if (vec_push(&c->pos, pos) < 0 || vec_push(&c->len, len) < 0 || vec_push(&c->lo, lo) < 0 ||
        vec_push(&c->hi, hi) < 0)
        return -1;
    return 0;
}

/* Candidate windows of one row (tokens keys[0..T)), positions offset by `base`. */
static int probe_row(Scanner *s, const uint64_t *keys, Py_ssize_t T, int64_t base, Cands *c) {
    int64_t lo, hi;
    const int n = s->ngram;
    const int64_t n_main = s->n_main;
    if (s->has_single) {
        for (Py_ssize_t t = 0; t < T; t++) {
            uint64_t h = keys[t];
            if (probe(s->single_bits, s->single_shift, h) && find_short(s, h, &lo, &hi))
                if (add_cand(c, base + t, 1, lo + n_main, hi + n_main) < 0) return -1;
        }
    }
    if (s->max_short >= 2) {
        for (Py_ssize_t t = 0; t + 2 <= T; t++) {
            uint64_t h = keys[t] * WINDOW_Q + keys[t + 1];
            if (!probe(s->prefix_bits, s->prefix_shift, h)) continue;
            for (int L = 2; L <= s->max_short && t + L <= T; L++) {
                if (L > 2) h = h * WINDOW_Q + keys[t + L - 1];
                if (s->short_len[L] && find_short(s, h, &lo, &hi))
                    if (add_cand(c, base + t, L, lo + n_main, hi + n_main) < 0) return -1;
            }
        }
    }
    if (T >= n && s->n_main) { /* the window hashes now, their probes in `probe_windows` */
        Py_ssize_t nw = T - n + 1, at = s->n_windows;
        if (at + nw > s->windows_cap) {
            Py_ssize_t cap = s->windows_cap ? s->windows_cap : WINDOW_BATCH;
            while (cap < at + nw) cap *= 2;
            uint64_t *win = realloc(s->windows, (size_t)cap * sizeof(uint64_t));
            if (win) s->windows = win;
            int64_t *wpos = win ? realloc(s->window_pos, (size_t)cap * sizeof(int64_t)) : NULL;
            if (!wpos) {
                PyErr_NoMemory();
                return -1;
            }
            s->window_pos = wpos;
            s->windows_cap = cap;
        }
        uint64_t *win = s->windows + at;
        int64_t *wpos = s->window_pos + at;
        uint64_t w = 0;
        for (int i = 0; i < n; i++) w = w * WINDOW_Q + keys[i];
        win[0] = w;
        wpos[0] = base;
        for (Py_ssize_t t = 1; t < nw; t++) {
            w = (w - keys[t - 1] * s->q_top) * WINDOW_Q + keys[t + n - 1];
            win[t] = w;
            wpos[t] = base + t;
        }
        s->n_windows = at + nw;
    }
    return 0;
}

/* Probes of the waiting windows (in position order), the filter words prefetched ahead. Windows of many
 * rows are probed together: a short row has fewer windows than the prefetch distance, so probed row by
 * row most of its filter words would be loaded only when needed (a cache miss each). */
static int probe_windows(Scanner *s, Cands *c) {
    const Py_ssize_t nw = s->n_windows;
    const uint64_t *win = s->windows;
    const unsigned shift = 64 - s->bloom_bits;
    int64_t lo, hi;
    s->n_windows = 0;
    for (Py_ssize_t t = 0; t < nw; t++) {
        if (t + PREFETCH < nw) __builtin_prefetch(&s->bloom[win[t + PREFETCH] >> shift]);
        if (bloom_probe(s, win[t]) && find_main(s, win[t], &lo, &hi))
            if (add_cand(c, s->window_pos[t], s->ngram, lo, hi) < 0) return -1;
    }
    return 0;
}

/* ---- the type ------------------------------------------------------------------------------ */
static void Scanner_dealloc(Scanner *s) {
    if (s->have_buffers) {
        PyBuffer_Release(&s->b_stage1);
        PyBuffer_Release(&s->b_stage2);
        PyBuffer_Release(&s->b_classes);
        PyBuffer_Release(&s->b_main);
        PyBuffer_Release(&s->b_main_bits);
        PyBuffer_Release(&s->b_single_bits);
        PyBuffer_Release(&s->b_prefix_bits);
        PyBuffer_Release(&s->b_short);
    }
    free(s->short_len);
    free(s->buckets);
    free(s->bloom);
    free(s->windows);
    free(s->window_pos);
    free(s->tok.raw);
    free(s->tok.pend);
    free(s->keys);
    Py_XDECREF(s->normalize);
    Py_TYPE(s)->tp_free((PyObject *)s);
}

static int get_buf(PyObject *o, Py_buffer *b, Py_ssize_t itemsize, const char *what) {
    if (PyObject_GetBuffer(o, b, PyBUF_C_CONTIGUOUS) < 0) return -1;
    if (b->len % itemsize) {
        PyBuffer_Release(b);
        PyErr_Format(PyExc_ValueError, "%s: buffer size not a multiple of %zd", what, itemsize);
        return -1;
    }
    return 0;
}

/* Scanner(ngram, stage1, stage2, classes, main_hash, main_bits, main_shift, single_bits,
 *         single_shift, prefix_bits, prefix_shift, short_hash, short_lengths, normalize) */
static int Scanner_init(Scanner *s, PyObject *args, PyObject *kw) {
    int ngram;
    PyObject *o_stage1, *o_stage2, *o_classes, *o_main, *o_main_bits, *o_single_bits, *o_prefix_bits, *o_short;
    PyObject *short_lengths, *normalize;
    unsigned main_shift, single_shift, prefix_shift;
    if (s->have_buffers) {
        PyErr_SetString(PyExc_RuntimeError, "Scanner already initialized");
        return -1;
    }
    if (!PyArg_ParseTuple(args, "iOOOOOIOIOIOOO", &ngram, &o_stage1, &o_stage2, &o_classes, &o_main,
                          &o_main_bits, &main_shift, &o_single_bits, &single_shift, &o_prefix_bits,
                          &prefix_shift, &o_short, &short_lengths, &normalize))
        return -1;
    if (ngram < 1) {
        PyErr_SetString(PyExc_ValueError, "ngram must be >= 1");
        return -1;
    }
    Py_buffer *bufs[] = {&s->b_stage1, &s->b_stage2, &s->b_classes, &s->b_main,
                         &s->b_main_bits, &s->b_single_bits, &s->b_prefix_bits, &s->b_short};
    PyObject *objs[] = {o_stage1, o_stage2, o_classes, o_main, o_main_bits, o_single_bits, o_prefix_bits, o_short};
    Py_ssize_t sizes[] = {2, 4, 1, 8, 1, 1, 1, 8};
    const char *names[] = {"stage1", "stage2", "classes", "main_hash", "main_bits", "single_bits",
                           "prefix_bits", "short_hash"};
    for (int i = 0; i < 8; i++) {
        if (get_buf(objs[i], bufs[i], sizes[i], names[i]) < 0) {
            for (int k = 0; k < i; k++) PyBuffer_Release(bufs[k]);
            return -1;
        }
    }
    s->have_buffers = 1;
    if (s->b_stage1.len != 2 * 0x1100 || s->b_classes.len != 0x110000 || s->b_main_bits.len < 1 ||
        s->b_single_bits.len < 1 || s->b_prefix_bits.len < 1 || main_shift > 63 || single_shift > 63 ||
        prefix_shift > 63) {
        PyErr_SetString(PyExc_ValueError, "bad table sizes");
        return -1;
    }
    s->ngram = ngram;
    s->stage1 = s->b_stage1.buf;
    s->stage2 = s->b_stage2.buf;
    Py_ssize_t blocks = s->b_stage2.len / (4 * 256);
    for (Py_ssize_t i = 0; i < 0x1100; i++)
        if (s->stage1[i] >= blocks) {
            PyErr_SetString(PyExc_ValueError, "stage1 points past stage2");
            return -1;
        }
    s->classes = s->b_classes.buf;
    s->main_hash = s->b_main.buf;
    s->n_main = s->b_main.len / 8;
    s->main_bits = s->b_main_bits.buf;
    s->single_bits = s->b_single_bits.buf;
    s->prefix_bits = s->b_prefix_bits.buf;
    /* every slot (h >> shift) must fall inside its bitmap */
    if (((uint64_t)UINT64_MAX >> main_shift) >> 3 >= (uint64_t)s->b_main_bits.len ||
        ((uint64_t)UINT64_MAX >> single_shift) >> 3 >= (uint64_t)s->b_single_bits.len ||
        ((uint64_t)UINT64_MAX >> prefix_shift) >> 3 >= (uint64_t)s->b_prefix_bits.len) {
        PyErr_SetString(PyExc_ValueError, "filter shift does not match its bitmap");
        return -1;
    }
    s->main_shift = main_shift;
    s->single_shift = single_shift;
    s->prefix_shift = prefix_shift;
    s->short_hash = s->b_short.buf;
    s->n_short = s->b_short.len / 8;
    s->short_len = calloc((size_t)ngram + 1, 1);
    if (!s->short_len) {
        PyErr_NoMemory();
        return -1;
    }
    PyObject *it = PyObject_GetIter(short_lengths);
    if (!it) return -1;
    PyObject *item;
    while ((item = PyIter_Next(it))) {
        long L = PyLong_AsLong(item);
        Py_DECREF(item);
        if (L == -1 && PyErr_Occurred()) break;
        if (L < 1 || L >= ngram) {
            PyErr_SetString(PyExc_ValueError, "short item lengths must be in [1, ngram)");
            break;
        }
        s->short_len[L] = 1;
        if (L == 1) s->has_single = 1;
        if (L > s->max_short) s->max_short = (int)L;
    }
    Py_DECREF(it);
    if (PyErr_Occurred()) return -1;
    /* bucket index over the sorted main hashes: about one hash per bucket */
    int bb = 0;
    while (bb < 24 && ((Py_ssize_t)1 << bb) < s->n_main) bb++;
    s->bucket_bits = bb;
    size_t nb = ((size_t)1 << bb) + 1;
    s->buckets = malloc(nb * sizeof(uint32_t));
    if (!s->buckets) {
        PyErr_NoMemory();
        return -1;
    }
    if (s->n_main >= (Py_ssize_t)UINT32_MAX) {
        PyErr_SetString(PyExc_ValueError, "too many n-grams");
        return -1;
    }
    Py_ssize_t i = 0;
    for (size_t b = 0; b < nb; b++) {
        while (i < s->n_main && (bb ? s->main_hash[i] >> (64 - bb) : 0) < b) i++;
        s->buckets[b] = (uint32_t)i;
    }
    for (Py_ssize_t k = 1; k < s->n_main; k++)
        if (s->main_hash[k - 1] > s->main_hash[k]) {
            PyErr_SetString(PyExc_ValueError, "main hashes must be sorted");
            return -1;
        }
    for (Py_ssize_t k = 1; k < s->n_short; k++)
        if (s->short_hash[k - 1] > s->short_hash[k]) {
            PyErr_SetString(PyExc_ValueError, "short hashes must be sorted");
            return -1;
        }
    uint64_t q = 1;
    for (int k = 0; k < ngram - 1; k++) q *= WINDOW_Q;
    s->q_top = q;
    for (uint32_t cp = 0; cp < 128; cp++) {
        s->ascii[cp] = entry_of(s, cp);
        s->ascii_cls[cp] = (s->ascii[cp] >> CLS_SHIFT) & CLS_MASK;
        s->ascii_lower[cp] = s->ascii_cls[cp] == WORD ? (uint8_t)fold_of(cp, s->ascii[cp]) : 0;
        s->ascii_code[cp] = s->ascii_cls[cp] == PUNCT ? PUNCT_CODE : s->ascii_lower[cp];
        if (s->ascii_cls[cp] == STANDALONE || s->ascii_lower[cp] >= 128 || (s->ascii[cp] & SLOW_BITS)) {
            PyErr_SetString(PyExc_ValueError, "an ASCII character must be a plain separator, word or punctuation character");
            return -1;
        }
    }
    s->powers[0] = 1;
    for (int k = 1; k < N_POWERS; k++) s->powers[k] = s->powers[k - 1] * TOKEN_P;
    /* about 12 bits per hash (at least 2**12 words): on the bundled index 2 MiB, false positives
     * ~0.09% (24 bits: 4 MiB, ~0.02%); the smaller filter stays in cache better, which saves more than
     * the extra confirmations cost (benchmarks/decontam.py per_byte) */
    int wb = 6;
    while (wb < 26 && ((uint64_t)64 << wb) < (uint64_t)12 * (uint64_t)s->n_main) wb++;
    s->bloom_bits = wb;
    s->bloom = calloc((size_t)1 << wb, sizeof(uint64_t));
    if (!s->bloom) {
        PyErr_NoMemory();
        return -1;
    }
    for (Py_ssize_t k = 0; k < s->n_main; k++)
        s->bloom[s->main_hash[k] >> (64 - wb)] |= bloom_mask(s->main_hash[k]);
    Py_INCREF(normalize);
    s->normalize = normalize;
    return 0;
}

static PyObject *vec_bytes(Vec *v) {
    return PyBytes_FromStringAndSize((const char *)v->data, v->len * (Py_ssize_t)sizeof(int64_t));
}

/* scan(texts, start, stop, max_chars=0) -> (counts, pos, length, lo, hi, end), the first five bytes
 * of int64: the token count of each text of texts[start:end], and one candidate window per filter
 * hit confirmed by hash (token position counted over those texts, window length, entry range).
 * ``end`` is ``stop``, or earlier: right after the text that brings the characters scanned (one
 * more per text) to ``max_chars`` when that is > 0. */
static PyObject *Scanner_scan(Scanner *s, PyObject *args) {
    PyObject *texts;
    Py_ssize_t start, stop, max_chars = 0, chars = 0;
    if (!s->have_buffers || !s->normalize) {
        PyErr_SetString(PyExc_RuntimeError, "Scanner not initialized");
        return NULL;
    }
    if (!PyArg_ParseTuple(args, "Onn|n", &texts, &start, &stop, &max_chars)) return NULL;
    PyObject *seq = PySequence_Fast(texts, "texts must be a sequence");
    if (!seq) return NULL;
    Py_ssize_t n_texts = PySequence_Fast_GET_SIZE(seq);
    if (start < 0) start = 0;
    if (stop > n_texts) stop = n_texts;
    Vec counts = {0};
    Cands c = {{0}};
    PyObject *result = NULL;
    Tok *t = &s->tok;
    int64_t base = 0;
    for (Py_ssize_t r = start; r < stop; r++) {
        PyObject *text = PySequence_Fast_GET_ITEM(seq, r);
        if (!PyUnicode_Check(text)) {
            PyErr_Format(PyExc_TypeError, "texts[%zd] is not str", r);
            goto done;
        }
        t->nt = 0;
        if (tokenize_text(s, t, text) < 0) goto done;
        Py_ssize_t T = t->nt;
        const uint64_t *keys = mix_keys(s, t->raw, T);
        if (!keys) goto done;
        if (probe_row(s, keys, T, base, &c) < 0) goto done;
        if (s->n_windows >= WINDOW_BATCH && probe_windows(s, &c) < 0) goto done;
        if (vec_push(&counts, T) < 0) goto done;
        base += T;
        chars += PyUnicode_GET_LENGTH(text) + 1;
        if (max_chars > 0 && chars >= max_chars) {
            stop = r + 1;
            break;
        }
    }
    if (s->n_windows && probe_windows(s, &c) < 0) goto done;
    if (stop < start) stop = start;
    result = Py_BuildValue("(NNNNNn)", vec_bytes(&counts), vec_bytes(&c.pos), vec_bytes(&c.len),
                           vec_bytes(&c.lo), vec_bytes(&c.hi), stop);
done:
    s->n_windows = 0;
    Py_DECREF(seq);
    free(counts.data);
    free(c.pos.data);
    free(c.len.data);
    free(c.lo.data);
    free(c.hi.data);
    if (s->tok.cap > (1 << 20)) { /* do not keep huge buffers after one huge text */
        free(s->tok.raw);
        s->tok.raw = NULL;
        s->tok.cap = s->tok.nt = 0;
    }
    if (s->keys_cap > (1 << 20)) {
        free(s->keys);
        s->keys = NULL;
        s->keys_cap = 0;
    }
    if (s->windows_cap > (1 << 20)) {
        free(s->windows);
        free(s->window_pos);
        s->windows = NULL;
        s->window_pos = NULL;
        s->windows_cap = 0;
    }
    return result;
}

/* token_hashes(text) -> bytes of uint64: the keys (mixed token hashes) of one text (tests). */
static PyObject *Scanner_keys(Scanner *s, PyObject *text) {
    if (!s->have_buffers || !s->normalize) {
        PyErr_SetString(PyExc_RuntimeError, "Scanner not initialized");
        return NULL;
    }
    if (!PyUnicode_Check(text)) {
        PyErr_SetString(PyExc_TypeError, "text must be str");
        return NULL;
    }
    s->tok.nt = 0;
    if (tokenize_text(s, &s->tok, text) < 0) return NULL;
    const uint64_t *keys = mix_keys(s, s->tok.raw, s->tok.nt);
    if (!keys) return NULL;
    return PyBytes_FromStringAndSize((const char *)keys, s->tok.nt * (Py_ssize_t)sizeof(uint64_t));
}

/* Token spans (start, end) of an already normalized text, as `_token_spans` (the rule of `feed`;
 * the pending punctuation of a word is the characters from its last word character to here). */
static int spans_of(const Scanner *s, PyObject *norm, Vec *starts, Vec *ends) {
    Py_ssize_t n = PyUnicode_GET_LENGTH(norm);
    int kind = PyUnicode_KIND(norm);
    const void *data = PyUnicode_DATA(norm);
    Py_ssize_t begin = -1, end = -1;
    for (Py_ssize_t i = 0; i <= n; i++) {
        unsigned cls = i < n ? s->classes[PyUnicode_READ(kind, data, i)] : 0;
        if (cls == WORD) {
            if (begin < 0) begin = i;
            end = i + 1;
            continue;
        }
        if (cls == PUNCT) {
            if (begin < 0 && (vec_push(starts, i) < 0 || vec_push(ends, i + 1) < 0)) return -1;
            continue;
        }
        if (begin >= 0) {
            if (vec_push(starts, begin) < 0 || vec_push(ends, end) < 0) return -1;
            for (Py_ssize_t j = end; j < i; j++)
                if (vec_push(starts, j) < 0 || vec_push(ends, j + 1) < 0) return -1;
            begin = -1;
        }
        if (cls == STANDALONE && (vec_push(starts, i) < 0 || vec_push(ends, i + 1) < 0)) return -1;
    }
    return 0;
}

static PyObject *span_list(const Vec *starts, const Vec *ends, const int64_t *begins, const int64_t *stops) {
    PyObject *out = PyList_New(starts->len);
    if (!out) return NULL;
    for (Py_ssize_t k = 0; k < starts->len; k++) {
        int64_t a = starts->data[k], b = ends->data[k];
        PyObject *t = begins ? Py_BuildValue("(LL)", (long long)begins[a], (long long)stops[b - 1])
                             : Py_BuildValue("(LL)", (long long)a, (long long)b);
        if (!t) {
            Py_DECREF(out);
            return NULL;
        }
        PyList_SET_ITEM(out, k, t);
    }
    return out;
}

/* token_spans(normalized) -> [(start, end), ...] (`_token_spans`) */
static PyObject *Scanner_token_spans(Scanner *s, PyObject *norm) {
    if (!s->have_buffers || !PyUnicode_Check(norm)) {
        PyErr_SetString(PyExc_TypeError, "token_spans needs an initialized scanner and a str");
        return NULL;
    }
    Vec starts = {0}, ends = {0};
    PyObject *out = NULL;
    if (spans_of(s, norm, &starts, &ends) == 0) out = span_list(&starts, &ends, NULL, NULL);
    free(starts.data);
    free(ends.data);
    return out;
}

/* tokens(normalized) -> [str, ...]: the tokens of an already normalized text (`_tokens_of_normalized`) */
static PyObject *Scanner_tokens(Scanner *s, PyObject *norm) {
    if (!s->have_buffers || !PyUnicode_Check(norm)) {
        PyErr_SetString(PyExc_TypeError, "tokens needs an initialized scanner and a str");
        return NULL;
    }
    Vec starts = {0}, ends = {0};
    PyObject *out = NULL;
    if (spans_of(s, norm, &starts, &ends) == 0 && (out = PyList_New(starts.len))) {
        for (Py_ssize_t k = 0; k < starts.len; k++) {
            PyObject *tok = PyUnicode_Substring(norm, starts.data[k], ends.data[k]);
            if (!tok) {
                Py_CLEAR(out);
                break;
            }
            PyList_SET_ITEM(out, k, tok);
        }
    }
    free(starts.data);
    free(ends.data);
    return out;
}

typedef struct {
    Py_UCS4 *data;
    Py_ssize_t len, cap;
} U4;

static int u4_push(U4 *u, Py_UCS4 c) {
    if (u->len == u->cap) {
        Py_ssize_t cap = u->cap ? 2 * u->cap : 256;
        Py_UCS4 *d = realloc(u->data, (size_t)cap * sizeof(Py_UCS4));
        if (!d) {
            PyErr_NoMemory();
            return -1;
        }
        u->data = d;
        u->cap = cap;
    }
    u->data[u->len++] = c;
    return 0;
}

/* normalized(text) -> str: `normalize(text)` (NFKC, then casefold) by segments, as the scan reads
 * the text: plain segments case-folded by the table, the others by ``normalize``. */
static PyObject *Scanner_normalized(Scanner *s, PyObject *text) {
    if (!s->have_buffers || !s->normalize || !PyUnicode_Check(text)) {
        PyErr_SetString(PyExc_TypeError, "normalized needs an initialized scanner and a str");
        return NULL;
    }
    Py_ssize_t n = PyUnicode_GET_LENGTH(text);
    int kind = PyUnicode_KIND(text);
    const void *data = PyUnicode_DATA(text);
    U4 out = {0};
    PyObject *result = NULL;
    Py_ssize_t i = 0;
    while (i < n) {
        uint32_t cp = PyUnicode_READ(kind, data, i);
        uint32_t e = entry_of(s, cp);
        Py_ssize_t j = i + 1;
        while (j < n && (entry_of(s, PyUnicode_READ(kind, data, j)) & NOT_B)) j++;
        int plain = !(e & (QC_NOT_YES | MULTI_FOLD));
        unsigned prev = e >> CCC_SHIFT;
        for (Py_ssize_t q = i + 1; q < j && plain; q++) {
            uint32_t eq = entry_of(s, PyUnicode_READ(kind, data, q));
            unsigned ccc = eq >> CCC_SHIFT;
            if ((eq & (QC_NOT_YES | MULTI_FOLD)) || (ccc && prev > ccc)) plain = 0;
            prev = ccc;
        }
        if (plain) {
            for (Py_ssize_t q = i; q < j; q++) {
                uint32_t c = PyUnicode_READ(kind, data, q);
                if (u4_push(&out, fold_of(c, entry_of(s, c))) < 0) goto done;
            }
        } else {
            PyObject *sub = PyUnicode_Substring(text, i, j);
            if (!sub) goto done;
            PyObject *norm = PyObject_CallOneArg(s->normalize, sub);
            Py_DECREF(sub);
            if (!norm) goto done;
            if (!PyUnicode_Check(norm)) {
                Py_DECREF(norm);
                PyErr_SetString(PyExc_TypeError, "normalize must return str");
                goto done;
            }
            int nkind = PyUnicode_KIND(norm);
            const void *ndata = PyUnicode_DATA(norm);
            for (Py_ssize_t q = 0; q < PyUnicode_GET_LENGTH(norm); q++)
                if (u4_push(&out, PyUnicode_READ(nkind, ndata, q)) < 0) {
                    Py_DECREF(norm);
                    goto done;
                }
            Py_DECREF(norm);
        }
        i = j;
    }
    result = PyUnicode_FromKindAndData(PyUnicode_4BYTE_KIND, out.data ? (const void *)out.data : (const void *)"",
                                       out.len);
done:
    free(out.data);
    return result;
}

/* windows(normalized, windows) -> (token count, [[token, ...], ...]): the tokens of ``normalized``
 * (`_tokens_of_normalized`) in each (start, size) window asked for, cut short at the end. */
static PyObject *Scanner_windows(Scanner *s, PyObject *args) {
    PyObject *norm, *wins;
    if (!s->have_buffers) {
        PyErr_SetString(PyExc_RuntimeError, "Scanner not initialized");
        return NULL;
    }
    if (!PyArg_ParseTuple(args, "UO", &norm, &wins)) return NULL;
    Vec starts = {0}, ends = {0};
    PyObject *out = NULL, *seq = NULL;
    if (spans_of(s, norm, &starts, &ends) < 0) goto done;
    seq = PySequence_Fast(wins, "windows must be a sequence");
    if (!seq) goto done;
    Py_ssize_t m = PySequence_Fast_GET_SIZE(seq);
    PyObject *lists = PyList_New(m);
    if (!lists) goto done;
    for (Py_ssize_t k = 0; k < m; k++) {
        Py_ssize_t a, size;
        if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(seq, k), "nn", &a, &size)) {
            Py_DECREF(lists);
            goto done;
        }
        Py_ssize_t b = a + size;
        if (a < 0) a = 0;
        if (b > starts.len) b = starts.len;
        if (b < a) b = a;
        PyObject *toks = PyList_New(b - a);
        if (!toks) {
            Py_DECREF(lists);
            goto done;
        }
        PyList_SET_ITEM(lists, k, toks);
        for (Py_ssize_t q = a; q < b; q++) {
            PyObject *tok = PyUnicode_Substring(norm, starts.data[q], ends.data[q]);
            if (!tok) {
                Py_DECREF(lists);
                goto done;
            }
            PyList_SET_ITEM(toks, q - a, tok);
        }
    }
    out = Py_BuildValue("(nN)", starts.len, lists);
done:
    Py_XDECREF(seq);
    free(starts.data);
    free(ends.data);
    return out;
}

/* piece_offsets(text, normalized) -> [(start, end), ...] or None: the second case of
 * `_token_offsets`. ``text`` is cut before every character that is not combining (and not a Hangul
 * medial or final jamo); each piece is normalized (a lone character with NFKC_QC=Yes and a
 * one-character case fold by the table, any other piece by ``normalize``); when the pieces joined
 * make ``normalized``, each token of ``normalized`` maps to the pieces it came from; else None. */
static PyObject *Scanner_piece_offsets(Scanner *s, PyObject *args) {
    PyObject *text, *norm;
    if (!s->have_buffers || !s->normalize) {
        PyErr_SetString(PyExc_RuntimeError, "Scanner not initialized");
        return NULL;
    }
    if (!PyArg_ParseTuple(args, "UU", &text, &norm)) return NULL;
    Py_ssize_t n = PyUnicode_GET_LENGTH(text), nn = PyUnicode_GET_LENGTH(norm);
    int kind = PyUnicode_KIND(text), nkind = PyUnicode_KIND(norm);
    const void *data = PyUnicode_DATA(text), *ndata = PyUnicode_DATA(norm);
    int64_t *begins = malloc(((size_t)nn + 1) * sizeof(int64_t));
    int64_t *stops = malloc(((size_t)nn + 1) * sizeof(int64_t));
    Vec starts = {0}, ends = {0};
    PyObject *out = NULL;
    if (!begins || !stops) {
        PyErr_NoMemory();
        goto done;
    }
    Py_ssize_t at = 0; /* characters of `normalized` matched so far */
    int same = 1;
    Py_ssize_t seg = 0;
    for (Py_ssize_t i = 1; i <= n && same; i++) {
        if (i < n) {
            uint32_t cp = PyUnicode_READ(kind, data, i);
            if ((entry_of(s, cp) >> CCC_SHIFT) || (cp >= 0x1160 && cp <= 0x11FF)) continue;
        }
        uint32_t cp = PyUnicode_READ(kind, data, seg);
        uint32_t e = entry_of(s, cp);
        if (i - seg == 1 && !(e & (QC_NOT_YES | MULTI_FOLD))) {
            if (at >= nn || PyUnicode_READ(nkind, ndata, at) != fold_of(cp, e)) same = 0;
            else {
                begins[at] = seg;
                stops[at] = i;
                at++;
            }
        } else {
            PyObject *sub = PyUnicode_Substring(text, seg, i);
            if (!sub) goto done;
            PyObject *piece = PyObject_CallOneArg(s->normalize, sub);
            Py_DECREF(sub);
            if (!piece) goto done;
            if (!PyUnicode_Check(piece)) {
                Py_DECREF(piece);
                PyErr_SetString(PyExc_TypeError, "normalize must return str");
                goto done;
            }
            Py_ssize_t m = PyUnicode_GET_LENGTH(piece);
            int pkind = PyUnicode_KIND(piece);
            const void *pdata = PyUnicode_DATA(piece);
            for (Py_ssize_t q = 0; q < m; q++) {
                if (at >= nn || PyUnicode_READ(nkind, ndata, at) != PyUnicode_READ(pkind, pdata, q)) {
                    same = 0;
                    break;
                }
                begins[at] = seg;
                stops[at] = i;
                at++;
            }
            Py_DECREF(piece);
        }
        seg = i;
    }
    if (!same || at != nn) {
        out = Py_NewRef(Py_None);
        goto done;
    }
    if (spans_of(s, norm, &starts, &ends) == 0) out = span_list(&starts, &ends, begins, stops);
done:
    free(begins);
    free(stops);
    free(starts.data);
    free(ends.data);
    return out;
}

/* Whether `role` (a str) is one of `roles`: identity first (roles read from one file share few objects), then
 * string equality; any other container of roles through the sequence protocol. */
static int role_in(PyObject *roles, PyObject *role) {
    if (!PyTuple_CheckExact(roles)) return PySequence_Contains(roles, role);
    Py_ssize_t n = PyTuple_GET_SIZE(roles);
    for (Py_ssize_t i = 0; i < n; i++)
        if (PyTuple_GET_ITEM(roles, i) == role) return 1;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *r = PyTuple_GET_ITEM(roles, i);
        if (PyUnicode_CheckExact(r) && PyUnicode_Compare(r, role) == 0) return 1;
        if (PyErr_Occurred()) return -1;
    }
    return 0;
}

/* joined_texts(rows, roles, fallback) -> list of str: for each row,
 * "\n".join(m["content"] for m in row["messages"] if m["role"] in roles); a row not made of a dict
 * with a list of dicts holding str roles and contents goes to fallback(row). */
static PyObject *joined_texts(PyObject *self, PyObject *args) {
    PyObject *rows, *roles, *fallback;
    if (!PyArg_ParseTuple(args, "OOO", &rows, &roles, &fallback)) return NULL;
    PyObject *seq = PySequence_Fast(rows, "rows must be a sequence");
    if (!seq) return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    PyObject *out = PyList_New(n);
    PyObject *k_messages = NULL, *k_role = NULL, *k_content = NULL, *sep = NULL, *parts = NULL;
    if (!out) goto fail;
    k_messages = PyUnicode_InternFromString("messages");
    k_role = PyUnicode_InternFromString("role");
    k_content = PyUnicode_InternFromString("content");
    sep = PyUnicode_FromString("\n");
    parts = PyList_New(0);
    if (!k_messages || !k_role || !k_content || !sep || !parts) goto fail;
    for (Py_ssize_t r = 0; r < n; r++) {
        PyObject *row = PySequence_Fast_GET_ITEM(seq, r);
        PyObject *text = NULL;
        PyObject *messages = PyDict_CheckExact(row) ? PyDict_GetItemWithError(row, k_messages) : NULL;
        if (!messages && PyErr_Occurred()) goto fail;
        if (messages && PyList_CheckExact(messages)) {
            Py_ssize_t m = PyList_GET_SIZE(messages);
            int ok = 1;
            PyObject *first = NULL; /* the only content so far (borrowed): `parts` is filled from a second one */
            if (PyList_GET_SIZE(parts) && PyList_SetSlice(parts, 0, PyList_GET_SIZE(parts), NULL) < 0) goto fail;
            for (Py_ssize_t j = 0; j < m && ok; j++) {
                PyObject *msg = PyList_GET_ITEM(messages, j);
                if (!PyDict_CheckExact(msg)) {
                    ok = 0;
                    break;
                }
                PyObject *role = PyDict_GetItemWithError(msg, k_role);
                if (!role) {
                    if (PyErr_Occurred()) goto fail;
                    ok = 0;
                    break;
                }
                if (!PyUnicode_CheckExact(role)) {
                    ok = 0;
                    break;
                }
                int in = role_in(roles, role);
                if (in < 0) goto fail;
                if (!in) continue;
                PyObject *content = PyDict_GetItemWithError(msg, k_content);
                if (!content) {
                    if (PyErr_Occurred()) goto fail;
                    ok = 0;
                    break;
                }
                if (!PyUnicode_CheckExact(content)) {
                    ok = 0;
                    break;
                }
                if (!first && !PyList_GET_SIZE(parts)) {
                    first = content;
                    continue;
                }
                if (first) {
                    if (PyList_Append(parts, first) < 0) goto fail;
                    first = NULL;
                }
                if (PyList_Append(parts, content) < 0) goto fail;
            }
            if (ok) {
                if (first) {
                    text = first;
                    Py_INCREF(text);
                } else {
                    text = PyUnicode_Join(sep, parts);
                    if (!text) goto fail;
                }
            }
        }
        if (!text) {
            text = PyObject_CallOneArg(fallback, row);
            if (!text) goto fail;
        }
        PyList_SET_ITEM(out, r, text);
    }
    Py_DECREF(seq);
    Py_DECREF(k_messages);
    Py_DECREF(k_role);
    Py_DECREF(k_content);
    Py_DECREF(sep);
    Py_DECREF(parts);
    return out;
fail:
    Py_DECREF(seq);
    Py_XDECREF(out);
    Py_XDECREF(k_messages);
    Py_XDECREF(k_role);
    Py_XDECREF(k_content);
    Py_XDECREF(sep);
    Py_XDECREF(parts);
    return NULL;
}

static PyMethodDef module_methods[] = {
    {"joined_texts", joined_texts, METH_VARARGS, "joined_texts(rows, roles, fallback) -> list of str"},
    {NULL, NULL, 0, NULL},
};

static PyMethodDef Scanner_methods[] = {
    {"scan", (PyCFunction)Scanner_scan, METH_VARARGS, "scan(texts, start, stop, max_chars=0) -> (counts, pos, length, lo, hi, end)"},
    {"keys", (PyCFunction)Scanner_keys, METH_O, "keys(text) -> bytes of the uint64 token keys"},
    {"token_spans", (PyCFunction)Scanner_token_spans, METH_O, "token_spans(normalized) -> [(start, end), ...]"},
    {"tokens", (PyCFunction)Scanner_tokens, METH_O, "tokens(normalized) -> [str, ...]"},
    {"normalized", (PyCFunction)Scanner_normalized, METH_O, "normalized(text) -> normalize(text)"},
    {"windows", (PyCFunction)Scanner_windows, METH_VARARGS,
     "windows(normalized, [(start, size), ...]) -> (token count, [[token, ...], ...])"},
    {"piece_offsets", (PyCFunction)Scanner_piece_offsets, METH_VARARGS,
     "piece_offsets(text, normalized) -> [(start, end), ...] or None"},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject ScannerType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "tulu_pipeline.curation._decon_kernel.Scanner",
    .tp_basicsize = sizeof(Scanner),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Scanner_init,
    .tp_dealloc = (destructor)Scanner_dealloc,
    .tp_methods = Scanner_methods,
    .tp_doc = "The decontamination filter over one EvalIndex (see the module source).",
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_decon_kernel", "C kernel of EvalIndex.match_texts' candidate filter.", -1, module_methods,
};

PyMODINIT_FUNC PyInit__decon_kernel(void) {
    if (PyType_Ready(&ScannerType) < 0) return NULL;
    PyObject *m = PyModule_Create(&module);
    if (!m) return NULL;
    Py_INCREF(&ScannerType);
    if (PyModule_AddObject(m, "Scanner", (PyObject *)&ScannerType) < 0) {
        Py_DECREF(&ScannerType);
        Py_DECREF(m);
        return NULL;
    }
    PyModule_AddIntConstant(m, "ABI", 2); /* 2: punctuation tokens */
    return m;
}
