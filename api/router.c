/* router.c - exact segment matching over the route table. */
#include "router.h"

#include <stdio.h>
#include <string.h>

static int safe_segment(const char *s, size_t n) {
    if (n == 0 || n > 128) return 0;
    if ((n == 1 && s[0] == '.') || (n == 2 && s[0] == '.' && s[1] == '.')) return 0;
    for (size_t i = 0; i < n; i++) {
        char c = s[i];
        if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '.' ||
              c == '_' || c == '-'))
            return 0;
    }
    return 1;
}

/* Matches path against pattern; captures placeholders into storage. */
static int match(const char *pattern, const char *path, const char *params[], char *storage) {
    int n_params = 0;
    const char *p = pattern, *s = path;
    char *out = storage;
    while (*p && *s) {
        if (*p == '{') {
            const char *pe = strchr(p, '}');
            const char *se = strchr(s, '/');
            size_t len = se ? (size_t)(se - s) : strlen(s);
            if (!pe || !safe_segment(s, len) || n_params == HTTP_ROUTE_PARAMS_MAX) return 0;
            memcpy(out, s, len);
            out[len] = '\0';
            params[n_params++] = out;
            out += len + 1;
            p = pe + 1;
            s += len;
            continue;
        }
        if (*p != *s) return 0;
        p++;
        s++;
    }
    return *p == '\0' && *s == '\0';
}

RouterResult router_match(const Route *routes, int n_routes, const char *method, const char *path,
                          const Route **route, const char *params[HTTP_ROUTE_PARAMS_MAX], char *storage,
                          char allow[64]) {
    int path_found = 0;
    allow[0] = '\0';
    for (int i = 0; i < n_routes; i++) {
        const char *tmp[HTTP_ROUTE_PARAMS_MAX] = {0};
        if (!match(routes[i].pattern, path, tmp, storage)) continue;
        if (strcmp(routes[i].method, method) == 0) {
            *route = &routes[i];
            memcpy(params, tmp, sizeof tmp);
            return ROUTER_FOUND;
        }
        if (!strstr(allow, routes[i].method)) {
            size_t n = strlen(allow);
            snprintf(allow + n, 64 - n, "%s%s", n ? ", " : "", routes[i].method);
        }
        path_found = 1;
    }
    return path_found ? ROUTER_BAD_METHOD : ROUTER_NOT_FOUND;
}
