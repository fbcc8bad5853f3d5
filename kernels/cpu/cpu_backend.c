/* cpu_backend.c - the CPU backend's device description: cores, and memory
 * as the kernel and this process's cgroup allow it. */
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "../kernels_impl.h"

/* A "Key:  N kB" line of /proc/meminfo in bytes, or 0. */
static uint64_t meminfo(const char *key) {
    FILE *f = fopen("/proc/meminfo", "re");
    if (!f) return 0;
    char line[256];
    size_t kl = strlen(key);
    unsigned long long kb = 0;
    while (fgets(line, sizeof line, f))
        if (strncmp(line, key, kl) == 0 && line[kl] == ':' && sscanf(line + kl + 1, "%llu", &kb) == 1) break;
    fclose(f);
    return (uint64_t)kb * 1024;
}

/* A number from this process's memory cgroup: file v2 under cgroup v2,
 * else v1 under cgroup v1; 0 when absent or unlimited ("max", or v1's huge
 * sentinel). */
static uint64_t cgroup_value(const char *v2, const char *v1) {
    char path[600], grp2[400] = "", grp1[400] = "", line[512];
    int have2 = 0, have1 = 0;
    FILE *f = fopen("/proc/self/cgroup", "re");
    if (!f) return 0;
    while (fgets(line, sizeof line, f)) {
        line[strcspn(line, "\n")] = '\0';
        const char *c = strchr(line, ':');
        if (strncmp(line, "0::", 3) == 0) have2 = snprintf(grp2, sizeof grp2, "%.380s", line + 3) > 0;
        else if (c && strncmp(c, ":memory:", 8) == 0) have1 = snprintf(grp1, sizeof grp1, "%.380s", c + 8) > 0;
    }
    fclose(f);
    if (have1) snprintf(path, sizeof path, "/sys/fs/cgroup/memory%s/%s", grp1, v1);
    else if (have2) snprintf(path, sizeof path, "/sys/fs/cgroup%s/%s", strcmp(grp2, "/") == 0 ? "" : grp2, v2);
    else return 0;
    unsigned long long v = 0;
    if (!(f = fopen(path, "re"))) return 0;
    if (fscanf(f, "%llu", &v) != 1) v = 0;
    fclose(f);
    return v >= (1ull << 60) ? 0 : (uint64_t)v;
}

void cpu_device_probe(KnDeviceInfo *out) {
    memset(out, 0, sizeof *out);
    out->kind = KN_DEVICE_CPU;
    strcpy(out->name, "cpu");
    long cores = sysconf(_SC_NPROCESSORS_ONLN);
    long pages = sysconf(_SC_PHYS_PAGES), avail = sysconf(_SC_AVPHYS_PAGES);
    long page = sysconf(_SC_PAGESIZE);
    out->n_threads = cores > 0 ? (int)cores : 1;
    out->memory_total = pages > 0 && page > 0 ? (uint64_t)pages * (uint64_t)page : 0;
    /* what can be had without swapping: MemAvailable counts reclaimable cache */
    uint64_t free_b = meminfo("MemAvailable");
    if (!free_b) free_b = avail > 0 && page > 0 ? (uint64_t)avail * (uint64_t)page : 0;
    uint64_t limit = cgroup_value("memory.max", "memory.limit_in_bytes");
    uint64_t used = cgroup_value("memory.current", "memory.usage_in_bytes");
    if (limit && limit < out->memory_total) out->memory_total = limit;
    if (limit) {
        uint64_t room = used < limit ? limit - used : 0;
        if (room < free_b) free_b = room;
    }
    out->memory_free = free_b;
    out->free_known = 1;
}
