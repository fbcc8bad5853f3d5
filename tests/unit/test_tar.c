/* test_tar.c - the strict tar index: members found by normalized name and
 * read back; unsafe names, links, bad checksums and truncation refused;
 * headers we write read back by our own reader. */
#include <stdlib.h>
#include <unistd.h>

#include "check.h"
#include "tar.h"

typedef struct { const char *name; char type; const char *data; } Member;

/* Writes a ustar archive with our header writer, patching type when asked. */
static void write_tar(const char *path, const Member *m, int n, int tail_blocks) {
    FILE *f = fopen(path, "wb");
    uint8_t hdr[512], pad[512] = {0};
    for (int i = 0; i < n; i++) {
        size_t len = strlen(m[i].data);
        tar_header_write(hdr, m[i].name, len, 1700000000);
        if (m[i].type != '0') {
            hdr[156] = (uint8_t)m[i].type;
            memset(hdr + 148, ' ', 8);
            unsigned sum = 0;
            for (int k = 0; k < 512; k++) sum += hdr[k];
            snprintf((char *)hdr + 148, 8, "%06o", sum);
            hdr[155] = ' ';
        }
        fwrite(hdr, 1, 512, f);
        fwrite(m[i].data, 1, len, f);
        fwrite(pad, 1, (512 - len % 512) % 512, f);
    }
    for (int i = 0; i < tail_blocks; i++) fwrite(pad, 1, 512, f);
    fclose(f);
}

static GfStatus index_of(const Member *m, int n, int tail, TarIndex *t, GfError *err) {
    char path[] = "/tmp/gf-test-tar-XXXXXX";
    int fd = mkstemp(path);
    close(fd);
    write_tar(path, m, n, tail);
    GfStatus st = tar_index_open(path, 100, t, err);
    unlink(path);
    return st;
}

static void test_good(void) {
    Member m[] = {{"./pets/a.png", '0', "AAAA"}, {"pets/", '5', ""}, {"pets/b.jpg", '0', "hello world"}};
    TarIndex t;
    GfError err;
    CHECK_STATUS(index_of(m, 3, 2, &t, &err), GF_OK, err);
    CHECK(t.n_members == 2, "members %zu", t.n_members);
    long i = tar_find(&t, "pets/b.jpg");
    CHECK(i >= 0 && t.members[i].size == 11, "find b");
    CHECK(tar_find(&t, "pets/a.png") >= 0 && tar_find(&t, "./pets/a.png") < 0, "normalized names");
    uint8_t *buf = NULL;
    CHECK_STATUS(tar_read_member(&t, (size_t)i, 100, &buf, &err), GF_OK, err);
    CHECK(buf && memcmp(buf, "hello world", 11) == 0, "read back");
    free(buf);
    CHECK(tar_read_member(&t, (size_t)i, 5, &buf, &err) == GF_TOO_LARGE, "member cap");
    tar_index_close(&t);
}

static void test_refused(void) {
    const Member cases[][2] = {
        {{"a.png", '0', "x"}, {"../b.png", '0', "y"}},
        {{"a.png", '0', "x"}, {"/etc/passwd", '0', "y"}},
        {{"a.png", '0', "x"}, {"l.png", '2', ""}},
        {{"a.png", '0', "x"}, {"h.png", '1', ""}},
        {{"a.png", '0', "x"}, {"dev", '3', ""}},
        {{"a.png", '0', "x"}, {"a.png", '0', "y"}},
        {{"a.png", '0', "x"}, {"x/./y.png", '0', "y"}},
        {{"a.png", '0', "x"}, {"x\\y.png", '0', "y"}},
        {{"a.png", '0', "x"}, {"x//y.png", '0', "y"}},
    };
    for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++) {
        TarIndex t;
        GfError err;
        gf_error_clear(&err);
        GfStatus st = index_of(cases[c], 2, 2, &t, &err);
        CHECK(st == GF_INVALID && strcmp(err.code, "invalid_archive") == 0, "case %zu accepted", c);
    }
}

static void test_corrupt_files(void) {
    char path[] = "/tmp/gf-test-tar-XXXXXX";
    int fd = mkstemp(path);
    close(fd);
    Member m[] = {{"a.png", '0', "0123456789"}};
    write_tar(path, m, 1, 2);
    FILE *f = fopen(path, "r+b");
    fseek(f, 150, SEEK_SET);
    fputc('9', f); /* checksum digit */
    fclose(f);
    TarIndex t;
    GfError err;
    CHECK(tar_index_open(path, 100, &t, &err) == GF_INVALID, "bad checksum");
    CHECK(truncate(path, 700) == 0 && tar_index_open(path, 100, &t, &err) == GF_INVALID, "not a multiple of 512");
    CHECK(truncate(path, 0) == 0 && tar_index_open(path, 100, &t, &err) == GF_INVALID, "empty");
    unlink(path);
    Member many[3] = {{"a", '0', "1"}, {"b", '0', "2"}, {"c", '0', "3"}};
    fd = mkstemp(path);
    close(fd);
    write_tar(path, many, 3, 2);
    CHECK(tar_index_open(path, 2, &t, &err) == GF_INVALID, "member cap");
    unlink(path);
}

static void test_names(void) {
    char a[64] = "././x/y.png", b[64] = "x/y/", c[64] = "x/../y", d[64] = "..", e[64] = ".";
    CHECK(tar_name_normalize(a) == 0 && strcmp(a, "x/y.png") == 0, "strip ./");
    CHECK(tar_name_normalize(b) == 0, "directory name");
    CHECK(tar_name_normalize(c) == -1 && tar_name_normalize(d) == -1 && tar_name_normalize(e) == -1, "dots");
}

int main(void) {
    test_good();
    test_refused();
    test_corrupt_files();
    test_names();
    return check_done("test_tar");
}
