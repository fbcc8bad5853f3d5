/* test_router.c - exact segment matching: params captured, unsafe segments
 * and path variants unmatched, 405 with the allowed methods. */
#include "check.h"
#include "router.h"

static RouterResult m(const char *method, const char *path, const Route **r, const char *params[2], char allow[64]) {
    static char storage[4096];
    return router_match(API_ROUTES, API_N_ROUTES, method, path, r, params, storage, allow);
}

int main(void) {
    const Route *r = NULL;
    const char *p[2] = {0};
    char allow[64];
    CHECK(m("GET", "/v1/datasets/ds_abc", &r, p, allow) == ROUTER_FOUND && r->handler == datasets_get &&
          strcmp(p[0], "ds_abc") == 0, "get dataset");
    CHECK(m("POST", "/v1/fine_tuning/jobs/job_1/cancel", &r, p, allow) == ROUTER_FOUND && r->handler == jobs_cancel &&
          strcmp(p[0], "job_1") == 0, "cancel");
    CHECK(m("GET", "/v1/adapters/pets.v1-2/download", &r, p, allow) == ROUTER_FOUND && strcmp(p[0], "pets.v1-2") == 0, "download");
    const char *unmatched[] = {"/v1//datasets", "/v1/./datasets", "/V1/datasets", "/v1/datasets/", "/v1/datasets/..",
                               "/v1/datasets/.", "/v1/datasets/a b", "/v1/datasets/a%2e", "/v1/datasets/a/b", "",
                               "/v1/datasets/\xc0\xae", "/healthz/", "/v1/models?x"};
    for (size_t i = 0; i < sizeof unmatched / sizeof *unmatched; i++)
        CHECK(m("GET", unmatched[i], &r, p, allow) == ROUTER_NOT_FOUND, "'%s' matched", unmatched[i]);
    CHECK(m("PUT", "/v1/datasets", &r, p, allow) == ROUTER_BAD_METHOD && strcmp(allow, "POST, GET") == 0, "allow %s", allow);
    CHECK(m("POST", "/v1/datasets/x", &r, p, allow) == ROUTER_BAD_METHOD && strcmp(allow, "GET, DELETE") == 0, "allow %s", allow);
    int open_routes = 0;
    for (int i = 0; i < API_N_ROUTES; i++) open_routes += !API_ROUTES[i].needs_auth;
    CHECK(open_routes == 1, "only /healthz is open (%d open)", open_routes);
    return check_done("test_router");
}
