/* test_base.c - the floor: SHA-256 against FIPS 180-4 vectors, constant-time
 * compare, UTF-8 validation, checked arithmetic, arena, errors. */
#include <stdlib.h>

#include "base.h"
#include "check.h"
#include "sha256.h"

static void hex_of(const char *s, size_t n, char out[65]) {
    uint8_t d[32];
    gf_sha256(s, n, d);
    gf_hex(d, 32, out);
}

static void test_sha256(void) {
    char h[65];
    hex_of("", 0, h);
    CHECK(strcmp(h, "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855") == 0, "empty: %s", h);
    hex_of("abc", 3, h);
    CHECK(strcmp(h, "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad") == 0, "abc: %s", h);
    const char *two = "abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq";
    hex_of(two, strlen(two), h);
    CHECK(strcmp(h, "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1") == 0, "448 bits: %s", h);
    char *million = malloc(1000000);
    memset(million, 'a', 1000000);
    GfSha256 ctx; /* streamed in odd pieces */
    gf_sha256_init(&ctx);
    for (size_t off = 0; off < 1000000;) {
        size_t n = off % 7 == 0 ? 1 : 4093;
        if (n > 1000000 - off) n = 1000000 - off;
        gf_sha256_update(&ctx, million + off, n);
        off += n;
    }
    uint8_t d[32];
    gf_sha256_final(&ctx, d);
    gf_hex(d, 32, h);
    CHECK(strcmp(h, "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0") == 0, "million a: %s", h);
    free(million);
    CHECK(gf_ct_equal("abcd", "abcd", 4) && !gf_ct_equal("abcd", "abce", 4), "ct_equal");
}

static void test_utf8(void) {
    CHECK(gf_utf8_valid("h\xc3\xa9llo \xe2\x82\xac \xf0\x9f\x98\x80", 16), "valid");
    CHECK(!gf_utf8_valid("\xc0\xae", 2), "overlong");
    CHECK(!gf_utf8_valid("\xed\xa0\x80", 3), "surrogate");
    CHECK(!gf_utf8_valid("\xf4\x90\x80\x80", 4), "above U+10FFFF");
    CHECK(!gf_utf8_valid("\xe2\x82", 2), "truncated");
    CHECK(!gf_utf8_valid("\xff", 1), "ff");
}

static void test_arith_arena_errors(void) {
    uint64_t r = 0;
    CHECK(gf_mul_u64(1ull << 32, 1ull << 32, &r) == -1, "mul overflow");
    CHECK(gf_mul_u64(3, 5, &r) == 0 && r == 15, "mul");
    CHECK(gf_add_u64(UINT64_MAX, 1, &r) == -1, "add overflow");
    GfArena a;
    GfError err;
    gf_arena_init(&a, 100000);
    char *p = gf_arena_alloc(&a, 10, &err), *q = gf_arena_alloc(&a, 40000, &err);
    CHECK(p && q && ((uintptr_t)q % 16) == 0 && q[39999] == 0, "arena alloc");
    CHECK(gf_arena_alloc(&a, 70000, &err) == NULL && err.status == GF_TOO_LARGE, "arena limit");
    gf_arena_free(&a);
    gf_arena_free(&a);
    GfStatus s = gf_error_set(&err, GF_INVALID, "bad", "field", "value %d", 7);
    CHECK(s == GF_INVALID && strcmp(err.message, "value 7") == 0 && strcmp(err.param, "field") == 0, "error set");
    char small[4];
    gf_strlcpy(small, "abcdef", sizeof small);
    CHECK(strcmp(small, "abc") == 0, "strlcpy");
}

/* Wrapping puts context before the message whole, even when the context's
 * arguments are err's own fields, and keeps status and code. */
static void test_error_wrap(void) {
    GfError err;
    gf_error_set(&err, GF_NOT_FOUND, "file_not_found", NULL, "config.json does not exist");
    GfStatus s = gf_error_wrap(&err, "model", "the model in %s", err.code);
    CHECK(s == GF_NOT_FOUND && strcmp(err.code, "file_not_found") == 0 && strcmp(err.param, "model") == 0, "wrap keeps");
    CHECK(strcmp(err.message, "the model in file_not_found: config.json does not exist") == 0, "wrap: %s", err.message);
    char longer[GF_ERR_MSG_MAX + 10];
    memset(longer, 'x', sizeof longer - 1);
    longer[sizeof longer - 1] = '\0';
    gf_error_set(&err, GF_INVALID, NULL, NULL, "%s", longer);
    gf_error_wrap(&err, NULL, "line %d", 3);
    CHECK(strncmp(err.message, "line 3: xxx", 11) == 0 && strlen(err.message) == GF_ERR_MSG_MAX - 1, "wrap truncates");
    gf_error_clear(&err);
    CHECK(gf_error_wrap(&err, NULL, "ctx") == GF_INTERNAL, "wrapping no error is a bug");
}

/* SplitMix64's published outputs from seed 0 (the reference C of Vigna's
 * xoshiro page) and its finalizer as a bijection on a few inputs. */
static void test_splitmix(void) {
    uint64_t st = 0;
    const uint64_t want[3] = {0xE220A8397B1DCDAFull, 0x6E789E6AA1B965F4ull, 0x06C45D188009454Full};
    for (int i = 0; i < 3; i++) {
        uint64_t got = gf_splitmix64(&st);
        CHECK(got == want[i], "splitmix64 output %d: %016llx", i, (unsigned long long)got);
    }
    CHECK(st == 3 * 0x9E3779B97F4A7C15ull, "state advanced by the increment");
    CHECK(gf_mix64(0) == 0 && gf_mix64(1) != gf_mix64(2), "finalizer");
}

int main(void) {
    test_splitmix();
    test_sha256();
    test_error_wrap();
    test_utf8();
    test_arith_arena_errors();
    return check_done("test_base");
}
