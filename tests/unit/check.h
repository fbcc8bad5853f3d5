/* check.h - a minimal assertion kit for the C unit tests: CHECK counts and
 * reports failures with file and line and keeps going; check_done() prints
 * "N passed, N failed" and returns the exit status. */
#ifndef GF_TEST_CHECK_H
#define GF_TEST_CHECK_H

#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

static int g_checks_passed, g_checks_failed;

#define CHECK(cond, ...)                                                        \
    do {                                                                        \
        if (cond) {                                                             \
            g_checks_passed++;                                                  \
        } else {                                                                \
            g_checks_failed++;                                                  \
            fprintf(stderr, "%s:%d: CHECK(%s) failed: ", __FILE__, __LINE__, #cond); \
            fprintf(stderr, __VA_ARGS__);                                       \
            fputc('\n', stderr);                                                \
        }                                                                       \
    } while (0)

#define CHECK_STATUS(got, want, err)                                            \
    CHECK((got) == (want), "status %d (%s), want %d; message: %s", (int)(got),  \
          gf_status_name(got), (int)(want), (err).message)

/* 1 when fn(arg), run in a child process, dies of signal sig (a fault the
 * test provokes on purpose), even under a sanitizer's own handler. */
static inline int check_dies(void (*fn)(int), int arg, int sig) {
    fflush(NULL);
    pid_t pid = fork();
    if (pid == 0) {
        signal(sig, SIG_DFL);
        fn(arg);
        _exit(0);
    }
    int status = 0;
    waitpid(pid, &status, 0);
    return WIFSIGNALED(status) && WTERMSIG(status) == sig;
}

/* 1 when fn(arg), run in a child process, faults (SIGSEGV). */
static inline int check_segfaults(void (*fn)(int), int arg) { return check_dies(fn, arg, SIGSEGV); }

/* 1 when fn(arg), run in a child process, aborts (SIGABRT). */
static inline int check_aborts(void (*fn)(int), int arg) { return check_dies(fn, arg, SIGABRT); }

static inline int check_done(const char *name) {
    printf("%s: %d passed, %d failed\n", name, g_checks_passed, g_checks_failed);
    return g_checks_failed ? 1 : 0;
}

#endif
