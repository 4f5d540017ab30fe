/*
 * overlaycni CNI plugin, native build: the same program as shim.py, in C.
 *
 * Why: a container runtime starts the plugin once per pod operation, and
 * `python3 -IS` needs 6-9 ms to start: the floor of every ADD. This binary
 * starts in about a millisecond, like the reference Go plugins. shim.py is
 * the reference and the fallback: `install-cni --shim auto` installs this
 * binary only when it was built for the machine, and every test in
 * tests/unit/test_cni_shim.py runs against both.
 *
 * Contract (CNI spec 1.1.0, https://github.com/containernetworking/cni/blob/main/SPEC.md):
 * CNI_* variables in the environment, the network config on stdin, the
 * result or the spec's error JSON on stdout, exit 0 or 1. The shim checks
 * the request and forwards it as one newline-terminated JSON line to the
 * node agent's unix socket (netconf key "socket"), then prints the answer:
 *   request {"command", "config", "path", "container_id", "ifname", "netns", "args"}
 *   answer  {"result": {...}} | {"ok": true} | {"error": {"code", "msg", "details"}}
 * Checks, their order, codes and messages are shim.py's, one for one.
 *
 * JSON (RFC 8259, https://www.rfc-editor.org/rfc/rfc8259): the input must
 * be UTF-8 and one JSON text. The scanner below validates it strictly (no
 * NaN, no raw control characters in strings, nesting at most MAX_DEPTH)
 * and builds no tree: it finds the spans of the few members the shim
 * reads. The validated text goes to the agent verbatim as "config" (a raw
 * newline can only be whitespace there; it becomes a space, so the request
 * stays one line), and the agent's "result" is printed verbatim. Strings
 * the shim writes are escaped as Python's json.dumps does (ASCII only; an
 * undecodable byte from the environment becomes \udcXX, as os.environ's
 * surrogateescape makes it), so both shims send and print the same text.
 *
 * Build: `make` (cc -std=c11 -O2 -Wall -Wextra -Werror, PIE, stack
 * protector, _FORTIFY_SOURCE=2); libc only.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

/* The spec's error codes, and this plugin's own for a broken agent answer. */
enum { INCOMPATIBLE_VERSION = 1, INVALID_ENV = 4, DECODE_FAILURE = 6, INVALID_CONFIG = 7 };
enum { TRY_AGAIN_LATER = 11, NOT_AVAILABLE = 50, PLUGIN_INTERNAL = 999 };

#define MAX_CONFIG (1 << 20)  /* bytes of stdin; shim.py's MAX_CONFIG */
#define MAX_ANSWER (16 << 20) /* bytes of the agent's answer */
#define MAX_DEPTH 128         /* JSON nesting; a CNI config needs about 6 */
#define CONNECT_TIMEOUT_MS 2000
#define REPLY_TIMEOUT_MS 4500 /* the agent answers TRY_AGAIN_LATER before this */
#define DEFAULT_SOCKET "/run/overlaycni/agent.sock"
#define STR_(x) #x
#define STR(x) STR_(x)

static const char *const VERSIONS[] = {"0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"};
#define SUPPORTED_LIST "0.3.0, 0.3.1, 0.4.0, 1.0.0, 1.1.0"
#define SUPPORTED_JSON "[\"0.3.0\", \"0.3.1\", \"0.4.0\", \"1.0.0\", \"1.1.0\"]"
static const char *const COMMANDS[] = {"ADD", "DEL", "CHECK", "VERSION", "STATUS", "GC"};
enum { ADD, DEL, CHECK, VERSION, STATUS, GC, NCOMMANDS };

/* ---- growable byte buffers (always NUL-terminated once written) ----------------- */

typedef struct {
    char *p;
    size_t len, cap;
} buf;

static void out_of_memory(void) {
    static const char m[] = "{\"cniVersion\": \"1.1.0\", \"code\": 999, \"msg\": \"overlaycni plugin: out of memory\"}\n";
    if (write(1, m, sizeof m - 1) < 0) _exit(1);
    _exit(1);
}

static void addn(buf *b, const char *s, size_t n) {
    if (b->len + n + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 256;
        while (cap < b->len + n + 1) cap *= 2;
        char *p = realloc(b->p, cap);
        if (!p) out_of_memory();
        b->p = p;
        b->cap = cap;
    }
    if (n) memcpy(b->p + b->len, s, n);
    b->len += n;
    b->p[b->len] = 0;
}

static void add(buf *b, const char *s) { addn(b, s, strlen(s)); }

/* ---- text: UTF-8, Python's whitespace, JSON escaping, Python's repr() ------------ */

/* Length (1-4) of the UTF-8 sequence at p and its code point, or 0 if the
 * bytes are not UTF-8 (RFC 3629: no overlong forms, no surrogates). */
static int utf8(const char *s, const char *e, uint32_t *cp) {
    const unsigned char *p = (const unsigned char *)s;
    uint32_t v, min;
    int n;
    if (p[0] < 0x80) return *cp = p[0], 1;
    if (p[0] >= 0xc2 && p[0] <= 0xdf) n = 2, v = p[0] & 0x1f, min = 0x80;
    else if (p[0] >= 0xe0 && p[0] <= 0xef) n = 3, v = p[0] & 0x0f, min = 0x800;
    else if (p[0] >= 0xf0 && p[0] <= 0xf4) n = 4, v = p[0] & 0x07, min = 0x10000;
    else return 0;
    if (e - s < n) return 0;
    for (int i = 1; i < n; i++) {
        if ((p[i] & 0xc0) != 0x80) return 0;
        v = v << 6 | (p[i] & 0x3f);
    }
    if (v < min || v > 0x10ffff || (v >= 0xd800 && v <= 0xdfff)) return 0;
    return *cp = v, n;
}

/* The next character as os.environ decodes it: UTF-8, or an undecodable
 * byte b as U+DC00+b (surrogateescape). Returns the bytes it took. */
static int next_char(const char *s, const char *e, uint32_t *cp) {
    int n = utf8(s, e, cp);
    if (n) return n;
    *cp = 0xdc00 + (unsigned char)*s;
    return 1;
}

/* Offset of the first byte of [s, e) that is not UTF-8, or -1. */
static long bad_utf8(const char *s, const char *e) {
    uint32_t c;
    for (const char *p = s; p < e;) {
        int n = utf8(p, e, &c);
        if (!n) return p - s;
        p += n;
    }
    return -1;
}

/* Python's str.isspace(), what shim.py's strip() and isspace() see. */
static int py_space(uint32_t c) {
    return (c >= 0x09 && c <= 0x0d) || (c >= 0x1c && c <= 0x20) || c == 0x85 || c == 0xa0 || c == 0x1680 ||
           (c >= 0x2000 && c <= 0x200a) || c == 0x2028 || c == 0x2029 || c == 0x202f || c == 0x205f || c == 0x3000;
}

/* Appends [s, s+n) as JSON string contents, escaped as json.dumps does. */
static void esc(buf *b, const char *s, size_t n) {
    char t[16];
    for (const char *e = s + n; s < e;) {
        uint32_t c;
        s += next_char(s, e, &c);
        const char *short_esc = c == '"' ? "\\\"" : c == '\\' ? "\\\\" : c == '\n' ? "\\n" : c == '\r' ? "\\r"
                              : c == '\t' ? "\\t" : c == '\b' ? "\\b" : c == '\f' ? "\\f" : NULL;
        if (short_esc) add(b, short_esc);
        else if (c >= 0x20 && c < 0x7f) t[0] = (char)c, addn(b, t, 1);
        else if (c < 0x10000) snprintf(t, sizeof t, "\\u%04x", (unsigned)c), add(b, t);
        else c -= 0x10000, snprintf(t, sizeof t, "\\u%04x\\u%04x", 0xd800 + (unsigned)(c >> 10), 0xdc00 + (unsigned)(c & 0x3ff)), add(b, t);
    }
}

/* Appends Python's repr() of s (shim.py's {value!r}), JSON-escaped. Of the
 * non-ASCII characters, only C1 controls, U+00A0, U+00AD and undecodable
 * bytes are escaped: repr() escapes a few more exotic ones. */
static void repr(buf *b, const char *s) {
    size_t n = strlen(s);
    char q = memchr(s, '\'', n) && !memchr(s, '"', n) ? '"' : '\'', t[16];
    buf r = {0};
    addn(&r, &q, 1);
    for (const char *e = s + n; s < e;) {
        uint32_t c;
        int k = next_char(s, e, &c);
        if (c == (uint32_t)q || c == '\\') t[0] = '\\', t[1] = (char)c, addn(&r, t, 2);
        else if (c == '\t' || c == '\n' || c == '\r') add(&r, c == '\t' ? "\\t" : c == '\n' ? "\\n" : "\\r");
        else if (c < 0x20 || (c >= 0x7f && c <= 0xa0) || c == 0xad) snprintf(t, sizeof t, "\\x%02x", (unsigned)c), add(&r, t);
        else if (c >= 0xdc80 && c <= 0xdcff) snprintf(t, sizeof t, "\\udc%02x", (unsigned)(c & 0xff)), add(&r, t);
        else addn(&r, s, (size_t)k);
        s += k;
    }
    addn(&r, &q, 1);
    esc(b, r.p, r.len);
    free(r.p);
}

/* ---- the error being reported: code, msg and details as JSON string contents ---- */

typedef struct {
    const char *s, *e; /* [s, e) of a JSON value */
} span;

static long long err_code;
static buf err_msg, err_details;

/* Appends fmt as JSON string contents: %s a C string, %r its repr(), %B a
 * buf of bytes, %j the raw contents of a JSON string (a span), %d an int. */
static void vformat(buf *b, const char *fmt, va_list ap) {
    char t[24];
    for (const char *f = fmt; *f; f++) {
        if (*f != '%') {
            esc(b, f, 1);
            continue;
        }
        switch (*++f) {
        case 's': { const char *s = va_arg(ap, const char *); esc(b, s, strlen(s)); break; }
        case 'r': repr(b, va_arg(ap, const char *)); break;
        case 'B': { const buf *x = va_arg(ap, const buf *); esc(b, x->p, x->len); break; }
        case 'j': { const span *x = va_arg(ap, const span *); addn(b, x->s + 1, (size_t)(x->e - x->s - 2)); break; }
        case 'd': snprintf(t, sizeof t, "%d", va_arg(ap, int)), add(b, t); break;
        }
    }
}

/* Sets the error (code, message); returns -1 for `return fail(...)`. */
static int fail(int code, const char *fmt, ...) {
    va_list ap;
    err_code = code;
    err_msg.len = err_details.len = 0;
    va_start(ap, fmt);
    vformat(&err_msg, fmt, ap);
    va_end(ap);
    return -1;
}

/* Sets the current error's details; returns -1. */
static int detail(const char *fmt, ...) {
    va_list ap;
    err_details.len = 0;
    va_start(ap, fmt);
    vformat(&err_details, fmt, ap);
    va_end(ap);
    return -1;
}

/* ---- strict RFC 8259 scanner: each step takes the position of a token and returns
 * the position after it, or NULL with scan_why/scan_at saying what it expected where -- */

static const char *scan_why, *scan_at;

static const char *expected(const char *p, const char *what) { return scan_why = what, scan_at = p, NULL; }

static const char *skip_ws(const char *p, const char *e) {
    while (p < e && (*p == ' ' || *p == '\t' || *p == '\n' || *p == '\r')) p++;
    return p;
}

static int hex4(const char *p, const char *e, uint32_t *v) {
    *v = 0;
    for (int i = 0; i < 4; i++, p++) {
        if (p >= e) return 0;
        int d = *p >= '0' && *p <= '9' ? *p - '0' : (*p | 0x20) >= 'a' && (*p | 0x20) <= 'f' ? (*p | 0x20) - 'a' + 10 : -1;
        if (d < 0) return 0;
        *v = *v << 4 | (uint32_t)d;
    }
    return 1;
}

/* A string; its bytes are known to be UTF-8 already (the caller checked the text). */
static const char *scan_string(const char *p, const char *e) {
    uint32_t v;
    for (p++; p < e; p++) {
        if (*p == '"') return p + 1;
        if ((unsigned char)*p < 0x20) return expected(p, "no raw control character in a string");
        if (*p != '\\') continue;
        if (++p >= e) break;
        if (*p == 'u') {
            if (!hex4(p + 1, e, &v)) return expected(p + 1, "four hex digits after \\u");
            p += 4;
        } else if (!memchr("\"\\/bfnrt", *p, 8)) {
            return expected(p, "an escape: \\\" \\\\ \\/ \\b \\f \\n \\r \\t or \\u");
        }
    }
    return expected(p, "a closing '\"'");
}

static const char *scan_digits(const char *p, const char *e) {
    const char *start = p;
    while (p < e && *p >= '0' && *p <= '9') p++;
    return p > start ? p : expected(p, "a digit");
}

/* -?(0|[1-9][0-9]*)(.[0-9]+)?([eE][+-]?[0-9]+)? */
static const char *scan_number(const char *p, const char *e) {
    if (*p == '-') p++;
    if (p < e && *p == '0') p++;
    else if (!(p = scan_digits(p, e))) return NULL;
    if (p < e && *p == '.' && !(p = scan_digits(p + 1, e))) return NULL;
    if (p < e && (*p == 'e' || *p == 'E')) {
        p++;
        if (p < e && (*p == '+' || *p == '-')) p++;
        p = scan_digits(p, e);
    }
    return p;
}

static const char *scan_value(const char *p, const char *e, int depth);

/* An object or an array, nested `depth` deep. */
static const char *scan_container(const char *p, const char *e, int depth) {
    char close = *p == '{' ? '}' : ']';
    if (depth > MAX_DEPTH) return expected(p, "nesting at most " STR(MAX_DEPTH) " deep");
    p = skip_ws(p + 1, e);
    if (p < e && *p == close) return p + 1;
    for (;;) {
        if (close == '}') {
            if (p >= e || *p != '"') return expected(p, "a member name in double quotes");
            if (!(p = scan_string(p, e))) return NULL;
            p = skip_ws(p, e);
            if (p >= e || *p != ':') return expected(p, "':'");
            p = skip_ws(p + 1, e);
        }
        if (!(p = scan_value(p, e, depth))) return NULL;
        p = skip_ws(p, e);
        if (p < e && *p == close) return p + 1;
        if (p >= e || *p != ',') return expected(p, close == '}' ? "',' or '}'" : "',' or ']'");
        p = skip_ws(p + 1, e);
    }
}

static const char *scan_literal(const char *p, const char *e, const char *word) {
    size_t n = strlen(word);
    return (size_t)(e - p) >= n && !memcmp(p, word, n) ? p + n : expected(p, "a JSON value");
}

static const char *scan_value(const char *p, const char *e, int depth) {
    if (p >= e) return expected(p, "a JSON value");
    switch (*p) {
    case '"': return scan_string(p, e);
    case '{': case '[': return scan_container(p, e, depth + 1);
    case 't': return scan_literal(p, e, "true");
    case 'f': return scan_literal(p, e, "false");
    case 'n': return scan_literal(p, e, "null");
    default: return *p == '-' || (*p >= '0' && *p <= '9') ? scan_number(p, e) : expected(p, "a JSON value");
    }
}

/* One JSON text in [s, e) (UTF-8 checked): its value's span, or 0 with scan_why/at set. */
static int parse(const char *s, const char *e, span *v) {
    const char *p = skip_ws(s, e), *end = scan_value(p, e, 0);
    if (!end) return 0;
    if (skip_ws(end, e) != e) return expected(end, "the end of the text"), 0;
    return v->s = p, v->e = end, 1;
}

static int parse_error_detail(const char *s) {
    return detail("at byte %d: expected %s", (int)(scan_at - s), scan_why);
}

/* Decodes a (scanned) JSON string into b, as Python's json does: escapes
 * resolved, a surrogate pair joined, a lone surrogate kept (3 bytes). */
static void unescape(span str, buf *b) {
    b->len = 0;
    addn(b, "", 0);
    for (const char *p = str.s + 1; p < str.e - 1; p++) {
        uint32_t v, lo;
        char c = *p;
        if (c != '\\') {
            addn(b, p, 1);
            continue;
        }
        switch (c = *++p) {
        case 'b': c = '\b'; break;
        case 'f': c = '\f'; break;
        case 'n': c = '\n'; break;
        case 'r': c = '\r'; break;
        case 't': c = '\t'; break;
        case 'u':
            hex4(p + 1, str.e, &v), p += 4;
            if (v >= 0xd800 && v < 0xdc00 && p[1] == '\\' && p[2] == 'u' && hex4(p + 3, str.e, &lo) && lo >= 0xdc00 && lo < 0xe000)
                v = 0x10000 + ((v - 0xd800) << 10) + (lo - 0xdc00), p += 6;
            char u[4];
            size_t n = v < 0x80 ? 1 : v < 0x800 ? 2 : v < 0x10000 ? 3 : 4;
            u[0] = (char)(n == 1 ? v : n == 2 ? 0xc0 | v >> 6 : n == 3 ? 0xe0 | v >> 12 : 0xf0 | v >> 18);
            for (size_t i = 1; i < n; i++) u[i] = (char)(0x80 | ((v >> (6 * (n - 1 - i))) & 0x3f));
            addn(b, u, n);
            continue;
        }
        addn(b, &c, 1);
    }
}

/* The value of the last member named `key` of a (scanned) object, as a
 * Python dict built from it holds it. Returns 0 if there is none. */
static int member(span obj, const char *key, span *out) {
    static buf name;
    int found = 0;
    const char *p = skip_ws(obj.s + 1, obj.e);
    while (*p == '"') {
        const char *name_end = scan_string(p, obj.e);
        const char *v = skip_ws(skip_ws(name_end, obj.e) + 1, obj.e), *v_end = scan_value(v, obj.e, 0);
        unescape((span){p, name_end}, &name);
        if (name.len == strlen(key) && !memcmp(name.p, key, name.len)) *out = (span){v, v_end}, found = 1;
        p = skip_ws(v_end, obj.e);
        if (*p == ',') p = skip_ws(p + 1, obj.e);
    }
    return found;
}

/* ---- the request ------------------------------------------------------------------ */

static const char *env(const char *name) {
    const char *v = getenv(name);
    return v ? v : "";
}

/* Appends `, "key": "value"` (value escaped). */
static void add_field(buf *b, const char *key, const char *value) {
    add(b, ", \""), add(b, key), add(b, "\": \""), esc(b, value, strlen(value)), add(b, "\"");
}

static int valid_container_id(const char *id) {
    for (const char *p = id; *p; p++) {
        char c = *p;
        int alnum = (c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z');
        if (!alnum && (p == id || (c != '_' && c != '.' && c != '-'))) return 0;
    }
    return 1;
}

/* The kernel's rule (dev_valid_name): 1-15 bytes, not "." or "..", no '/', ':' or whitespace. */
static int valid_ifname(const char *name) {
    size_t n = strlen(name);
    uint32_t c;
    if (n > 15 || !strcmp(name, ".") || !strcmp(name, "..")) return 0;
    for (const char *p = name; p < name + n;) {
        p += next_char(p, name + n, &c);
        if (c == '/' || c == ':' || py_space(c)) return 0;
    }
    return 1;
}

/* CNI_ARGS "K=V;K2=V2" as a JSON object; a malformed pair is an invalid-env error. */
static int add_args(buf *b, const char *raw) {
    buf part = {0};
    const char *sep = "";
    add(b, ", \"args\": {");
    for (const char *p = raw;; p = strchr(p, ';') + 1) {
        size_t n = strcspn(p, ";");
        if (n) {
            part.len = 0;
            addn(&part, p, n);
            char *eq = memchr(part.p, '=', n);
            if (!eq || eq == part.p) {
                fail(INVALID_ENV, "CNI_ARGS: %r is not KEY=VALUE", part.p);
                return free(part.p), -1;
            }
            add(b, sep), add(b, "\""), esc(b, part.p, (size_t)(eq - part.p)), add(b, "\": \"");
            esc(b, eq + 1, n - (size_t)(eq - part.p) - 1), add(b, "\"");
            sep = ", ";
        }
        if (!p[n]) break;
    }
    add(b, "}");
    return free(part.p), 0;
}

/* Checks the environment and the config (shim.py's build_request, in the
 * same order). Sets *version; fills `out` for VERSION, else `req` and
 * `socket_path`. */
static int build_request(int *command, const buf *in, const char **version, buf *out, buf *req, buf *socket_path) {
    const char *cmd = env("CNI_COMMAND"), *p, *e = in->p + in->len, *matched = NULL;
    span config, v;
    buf s = {0};
    uint32_t c = ' ';
    for (*command = 0; *command < NCOMMANDS && strcmp(cmd, COMMANDS[*command]); ++*command) {}
    if (*command == NCOMMANDS) return fail(INVALID_ENV, "CNI_COMMAND must be one of ADD, DEL, CHECK, VERSION, STATUS, GC, got %r", cmd);
    for (p = in->p; p < e && py_space(c); p += next_char(p, e, &c)) {}
    int have_config = !py_space(c); /* stdin_text.strip() is not empty */
    if (have_config && !parse(in->p, e, &config)) {
        fail(DECODE_FAILURE, "network config on stdin is not valid JSON");
        return parse_error_detail(in->p);
    }
    if (*command == VERSION && (!have_config || *config.s == 'n')) { /* no config, or null */
        add(out, "{\"cniVersion\": \"1.1.0\", \"supportedVersions\": " SUPPORTED_JSON "}\n");
        return 0;
    }
    if (!have_config || *config.s != '{') return fail(DECODE_FAILURE, "network config on stdin must be a JSON object");
    if (!member(config, "cniVersion", &v) || *v.s != '"' || v.e - v.s == 2) return fail(INVALID_CONFIG, "network config: cniVersion is required");
    unescape(v, &s);
    for (size_t i = 0; i < sizeof VERSIONS / sizeof *VERSIONS; i++)
        if (!strcmp(s.p, VERSIONS[i]) && strlen(VERSIONS[i]) == s.len) matched = VERSIONS[i];
    free(s.p);
    if (!matched) {
        fail(INCOMPATIBLE_VERSION, "cniVersion %j is not supported", &v);
        return detail("supported: " SUPPORTED_LIST);
    }
    if (*command == VERSION) {
        add(out, "{\"cniVersion\": \""), add(out, matched), add(out, "\", \"supportedVersions\": " SUPPORTED_JSON "}\n");
        return 0;
    }
    if (*command != STATUS && *command != GC && (!member(config, "name", &v) || *v.s != '"' || v.e - v.s == 2))
        return fail(INVALID_CONFIG, "network config: name is required");
    if (!member(config, "socket", &v)) add(socket_path, DEFAULT_SOCKET);
    else if (*v.s != '"' || v.e - v.s == 2) return fail(INVALID_CONFIG, "network config: socket must be a path string");
    else unescape(v, socket_path);
    add(req, "{\"command\": \""), add(req, cmd), add(req, "\", \"config\": ");
    size_t at = req->len;
    addn(req, config.s, (size_t)(config.e - config.s));
    for (char *q = req->p + at; (q = memchr(q, '\n', req->len - (size_t)(q - req->p))); q++) *q = ' ';
    add_field(req, "path", env("CNI_PATH"));
    if (*command == ADD || *command == DEL || *command == CHECK) {
        const char *id = env("CNI_CONTAINERID"), *ifname = env("CNI_IFNAME"), *netns = env("CNI_NETNS");
        if (!*id) return fail(INVALID_ENV, "CNI_CONTAINERID is required for %s", cmd);
        if (!valid_container_id(id)) return fail(INVALID_ENV, "CNI_CONTAINERID %r must be alphanumeric plus '_', '.', '-'", id);
        if (!*ifname) return fail(INVALID_ENV, "CNI_IFNAME is required for %s", cmd);
        if (!valid_ifname(ifname))
            return fail(INVALID_ENV, "CNI_IFNAME %r is not a valid interface name (<= 15 bytes, no '/', ':' or spaces)", ifname);
        if (*command != DEL && !*netns) return fail(INVALID_ENV, "CNI_NETNS is required for %s", cmd);
        add_field(req, "container_id", id), add_field(req, "ifname", ifname), add_field(req, "netns", netns);
        if (add_args(req, env("CNI_ARGS"))) return -1;
    }
    add(req, "}\n");
    *version = matched; /* errors before this point carry 1.1.0, as in shim.py */
    return 0;
}

/* ---- the agent --------------------------------------------------------------------- */

static long long now_ms(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1000LL + t.tv_nsec / 1000000;
}

/* Waits until fd is ready for `events`: 1 ready, 0 deadline passed, -1 error. */
static int wait_fd(int fd, short events, long long deadline) {
    for (;;) {
        long long left = deadline - now_ms();
        if (left <= 0) return 0;
        struct pollfd pfd = {.fd = fd, .events = events};
        int r = poll(&pfd, 1, (int)left);
        if (r > 0) return 1;
        if (r < 0 && errno != EINTR) return -1;
    }
}

static int io_failed(int fd, int ready) {
    int e = errno;
    close(fd);
    if (!ready)
        return fail(TRY_AGAIN_LATER, "overlaycni agent did not answer within %d.%d s", REPLY_TIMEOUT_MS / 1000, REPLY_TIMEOUT_MS % 1000 / 100);
    fail(TRY_AGAIN_LATER, "overlaycni agent connection failed");
    return detail("[Errno %d] %s", e, strerror(e));
}

/* Sends one request and reads the answer up to EOF (shim.py's call_agent). */
static int call_agent(const buf *path, const buf *req, buf *answer, span *doc) {
    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    int abstract = path->len && !path->p[0], fd, e, ready = 1; /* "\0name": Linux's abstract namespace */
    if (path->len + !abstract > sizeof sa.sun_path) {
        fail(TRY_AGAIN_LATER, "overlaycni agent is not reachable at %B", path);
        return detail("AF_UNIX path too long; is the agent running on this node?");
    }
    memcpy(sa.sun_path, path->p, path->len);
    socklen_t sa_len = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + path->len);
    long long deadline = now_ms() + CONNECT_TIMEOUT_MS;
    if ((fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0)) < 0) goto unreachable;
    while (connect(fd, (struct sockaddr *)&sa, sa_len) < 0) {
        if (errno != EAGAIN) goto unreachable;
        if (now_ms() > deadline) /* the agent's accept queue is full: a burst; retry briefly */
            return close(fd), fail(TRY_AGAIN_LATER, "overlaycni agent at %B is overloaded", path);
        nanosleep(&(struct timespec){.tv_nsec = 5000000}, NULL);
    }
    deadline = now_ms() + REPLY_TIMEOUT_MS;
    for (size_t sent = 0; sent < req->len;) {
        ssize_t n = send(fd, req->p + sent, req->len - sent, MSG_NOSIGNAL);
        if (n >= 0) sent += (size_t)n;
        else if (errno != EAGAIN || (ready = wait_fd(fd, POLLOUT, deadline)) <= 0) return io_failed(fd, ready);
    }
    for (char chunk[65536];;) {
        ssize_t n = recv(fd, chunk, sizeof chunk, 0);
        if (n == 0) break;
        if (n > 0 && answer->len + (size_t)n > MAX_ANSWER)
            return close(fd), fail(PLUGIN_INTERNAL, "overlaycni agent answer is larger than %d bytes", MAX_ANSWER);
        if (n > 0) addn(answer, chunk, (size_t)n);
        else if (errno != EAGAIN || (ready = wait_fd(fd, POLLIN, deadline)) <= 0) return io_failed(fd, ready);
    }
    close(fd);
    if (bad_utf8(answer->p, answer->p + answer->len) >= 0 || !parse(answer->p, answer->p + answer->len, doc))
        return fail(TRY_AGAIN_LATER, "overlaycni agent closed the connection without an answer");
    return 0;
unreachable:
    e = errno;
    if (fd >= 0) close(fd);
    fail(TRY_AGAIN_LATER, "overlaycni agent is not reachable at %B", path);
    return detail("%s; is the agent running on this node?", strerror(e));
}

/* Appends a JSON value as string contents: a string's own, any other
 * value its JSON text (shim.py's _as_text). */
static void add_text(buf *b, span v) {
    if (*v.s == '"') addn(b, v.s + 1, (size_t)(v.e - v.s - 2));
    else esc(b, v.s, (size_t)(v.e - v.s));
}

/* The agent's answer: an error becomes ours; a result is printed verbatim
 * (shim.py's agent_outcome). */
static int take_answer(span doc, buf *out) {
    span error, v;
    if (*doc.s != '{') return fail(PLUGIN_INTERNAL, "overlaycni agent answer is not a JSON object");
    if (member(doc, "error", &error)) {
        if (*error.s != '{') return fail(PLUGIN_INTERNAL, "overlaycni agent error is not a JSON object");
        long long code = PLUGIN_INTERNAL;
        if (member(error, "code", &v)) { /* the spec's code is an unsigned integer */
            const char *p = v.s;
            for (code = 0; p < v.e && *p >= '0' && *p <= '9' && code <= 0xffffffffLL; p++) code = code * 10 + (*p - '0');
            if (p == v.s || p != v.e || code > 0xffffffffLL)
                return fail(PLUGIN_INTERNAL, "overlaycni agent error code is not an integer 0..4294967295");
        }
        fail(0, ""), err_code = code;
        if (member(error, "msg", &v)) add_text(&err_msg, v);
        else add(&err_msg, "agent error");
        if (member(error, "details", &v) && *v.s != 'n') add_text(&err_details, v);
        return -1;
    }
    if (member(doc, "result", &v) && *v.s != 'n') addn(out, v.s, (size_t)(v.e - v.s)), add(out, "\n");
    return 0;
}

/* ---- main -------------------------------------------------------------------------- */

static int read_stdin(buf *in) {
    char chunk[65536];
    addn(in, "", 0);
    if (isatty(0)) return 0;
    for (;;) {
        ssize_t n = read(0, chunk, sizeof chunk);
        if (n > 0 && in->len + (size_t)n > MAX_CONFIG)
            return fail(INVALID_CONFIG, "network config on stdin is larger than %d bytes", MAX_CONFIG);
        if (n > 0) addn(in, chunk, (size_t)n);
        else if (n == 0 || errno == EBADF) break; /* no stdin at all: an empty config, as in shim.py */
        else if (errno != EINTR) {
            int e = errno;
            fail(DECODE_FAILURE, "cannot read stdin");
            return detail("[Errno %d] %s", e, strerror(e));
        }
    }
    long bad = bad_utf8(in->p, in->p + in->len);
    if (bad >= 0) {
        fail(DECODE_FAILURE, "network config on stdin is not valid UTF-8");
        return detail("invalid byte at position %d", (int)bad);
    }
    return 0;
}

int main(void) {
    buf in = {0}, out = {0}, req = {0}, socket_path = {0}, answer = {0};
    const char *version = "1.1.0";
    int command, rc;
    span doc;
    signal(SIGPIPE, SIG_IGN); /* a runtime that went away: write() fails, no signal */
    rc = read_stdin(&in);
    if (!rc) rc = build_request(&command, &in, &version, &out, &req, &socket_path);
    if (!rc && req.len) {
        rc = call_agent(&socket_path, &req, &answer, &doc);
        if (rc && command == STATUS) err_code = NOT_AVAILABLE;
        if (!rc) rc = take_answer(doc, &out);
    }
    if (rc) {
        char code[24];
        snprintf(code, sizeof code, "%lld", err_code);
        out.len = 0;
        add(&out, "{\"cniVersion\": \""), add(&out, version), add(&out, "\", \"code\": "), add(&out, code);
        add(&out, ", \"msg\": \""), addn(&out, err_msg.p, err_msg.len), add(&out, "\"");
        if (err_details.len) add(&out, ", \"details\": \""), addn(&out, err_details.p, err_details.len), add(&out, "\"");
        add(&out, "}\n");
    }
    for (size_t done = 0; done < out.len;) {
        ssize_t n = write(1, out.p + done, out.len - done);
        if (n < 0 && errno != EINTR) {
            rc = -1; /* nobody reads our answer */
            break;
        }
        done += n > 0 ? (size_t)n : 0;
    }
    free(in.p), free(out.p), free(req.p), free(socket_path.p), free(answer.p);
    return rc ? 1 : 0;
}
