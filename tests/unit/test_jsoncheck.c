/* test_jsoncheck.c - the strict JSON front: RFC 8259 grammar, depth cap,
 * UTF-8, surrogates, NUL escapes, duplicate keys (RELIABILITY.md J1-J4). */
#include <stdlib.h>

#include "check.h"
#include "jsoncheck.h"

static void expect_code(const char *doc, size_t n, const char *code) {
    GfError err;
    gf_error_clear(&err);
    cJSON *j = json_parse_strict(doc, n, "doc", &err);
    CHECK(!j && strcmp(err.code, code) == 0, "'%.40s' gave code '%s', want '%s'", doc, err.code, code);
    cJSON_Delete(j);
}

static void expect_ok(const char *doc) {
    GfError err;
    cJSON *j = json_parse_strict(doc, strlen(doc), "doc", &err);
    CHECK(j != NULL, "'%s' refused: %s", doc, err.message);
    cJSON_Delete(j);
}

int main(void) {
    expect_ok("{}");
    expect_ok("[1, -0, 1.5e3, true, false, null, \"x\\u00e9\\ud83d\\ude00\\n\"]");
    expect_ok(" {\"a\":{\"b\":[{}]}} ");
    expect_ok("\"\xe2\x82\xac\"");
    const char *invalid[] = {"", " ", "{", "{\"a\":1,", "{\"a\":1,}", "[1,]", "01", "1.", ".5", "+1", "NaN", "Infinity",
                             "{'a':1}", "{\"a\" 1}", "[1 2]", "{} {}", "tru", "\"abc", "{1:2}", "--1"};
    for (size_t i = 0; i < sizeof invalid / sizeof *invalid; i++) expect_code(invalid[i], strlen(invalid[i]), "invalid_json");
    /* the CVE-2023-53154 shape, with no NUL after the buffer */
    char *unterminated = malloc(7);
    memcpy(unterminated, "{\"1\":1,", 7);
    expect_code(unterminated, 7, "invalid_json");
    free(unterminated);
    expect_code("\"\xff\"", 3, "invalid_utf8");
    expect_code("\"\xc0\xae\"", 4, "invalid_utf8");
    expect_code("\"\\ud800\"", 8, "invalid_string");
    expect_code("\"\\udc00\"", 8, "invalid_string");
    expect_code("\"a\\u0000b\"", 10, "invalid_string");
    expect_code("\"\\x\"", 4, "invalid_string");
    expect_code("[\"a\tb\"]", 7, "invalid_string");
    expect_code("{\"a\":1,\"b\":2,\"a\":3}", 19, "duplicate_key");
    expect_code("[{\"x\":{\"k\":1,\"k\":1}}]", 21, "duplicate_key");
    char deep[200001];
    memset(deep, '[', 100000);
    memset(deep + 100000, ']', 100000);
    expect_code(deep, 200000, "nesting_too_deep");
    expect_code(deep, 65, "nesting_too_deep");
    deep[64] = ']';
    CHECK(json_scan_strict(deep + 0, 64, "d", NULL) != GF_OK, "64 open brackets unterminated");
    memset(deep, '[', 64);
    memset(deep + 64, ']', 64);
    {
        GfError err;
        cJSON *j = json_parse_strict(deep, 128, "d", &err);
        CHECK(j != NULL, "depth 64 accepted: %s", err.message);
        cJSON_Delete(j);
    }
    /* an array of JSON_VALUES_MAX - 1 zeros is JSON_VALUES_MAX values with
     * the array itself: accepted; one more zero is refused while scanning */
    {
        size_t zeros = JSON_VALUES_MAX - 1, n = 2 * zeros + 1; /* "[0,0,...,0]" */
        char *doc = malloc(n + 2);
        doc[0] = '[';
        for (size_t i = 0; i < zeros; i++) {
            doc[1 + 2 * i] = '0';
            doc[2 + 2 * i] = ',';
        }
        doc[n - 1] = ']';
        GfError err;
        CHECK(json_scan_strict(doc, n, "d", &err) == GF_OK, "%d values accepted: %s", JSON_VALUES_MAX, err.message);
        doc[n - 1] = ',';
        doc[n] = '0';
        doc[n + 1] = ']';
        expect_code(doc, n + 2, "too_many_values");
        free(doc);
    }
    return check_done("test_jsoncheck");
}
