/* router.h - matches a method and path against the route table.
 *
 * Matching is exact and segment-wise on the decoded path: no normalization,
 * so "/v1//jobs", "/v1/./jobs", "/V1/jobs" and trailing slashes simply match
 * nothing (404). A {placeholder} matches one segment of 1..128 characters
 * from [A-Za-z0-9._-] that is not "." or ".."; anything else is 404 before a
 * handler runs. Pure function of its inputs; thread-safe.
 */
#ifndef GF_ROUTER_H
#define GF_ROUTER_H

#include "api.h"

typedef enum { ROUTER_FOUND, ROUTER_NOT_FOUND, ROUTER_BAD_METHOD } RouterResult;

/* On ROUTER_FOUND sets *route and params (pointers into `storage`, which must
 * hold strlen(path)+1 bytes and outlive their use). On ROUTER_BAD_METHOD
 * fills allow ("GET, DELETE"). */
RouterResult router_match(const Route *routes, int n_routes, const char *method, const char *path,
                          const Route **route, const char *params[HTTP_ROUTE_PARAMS_MAX],
                          char *storage, char allow[64]);

#endif
