/* backend.c - the registry of compute backends: CPU always, the guarded CPU
 * backend for tests, CUDA when built (GF_HAVE_CUDA) and a device exists. The
 * only C file that tests GF_HAVE_CUDA. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kernels_impl.h"

int kn_cuda_built(void) {
#ifdef GF_HAVE_CUDA
    return 1;
#else
    return 0;
#endif
}

/* The CPU, then the CUDA devices, their free memory read as cuda_devices_probe says. */
static int probe(KnDeviceInfo out[KN_MAX_DEVICES], int all, int index) {
    int n = 0;
    cpu_device_probe(&out[n++]);
#ifdef GF_HAVE_CUDA
    n += cuda_devices_probe(out + n, KN_MAX_DEVICES - n, all, index);
#else
    (void)all;
    (void)index;
#endif
    return n;
}

int kn_devices_probe(KnDeviceInfo out[KN_MAX_DEVICES], KnProbe how) { return probe(out, how == KN_PROBE_ALL, -1); }

GfStatus kn_device_info(KnDeviceKind kind, int index, KnDeviceInfo *out, GfError *err) {
    KnDeviceInfo dev[KN_MAX_DEVICES];
    KnDeviceKind k = kind == KN_DEVICE_GUARDED ? KN_DEVICE_CPU : kind;
    int n = probe(dev, 0, k == KN_DEVICE_CUDA ? index : -1);
    for (int i = 0; i < n; i++)
        if (dev[i].kind == k && dev[i].index == index) {
            *out = dev[i];
            return GF_OK;
        }
    return gf_error_set(err, GF_NOT_FOUND, "device_not_available", "device", "no %s device %d",
                        k == KN_DEVICE_CUDA ? "CUDA" : "CPU", index);
}

void kn_default_device(KnDeviceKind *kind, int *index) {
    KnDeviceInfo dev[KN_MAX_DEVICES];
    int n = kn_devices_probe(dev, KN_PROBE_HELD);
    *kind = KN_DEVICE_CPU;
    *index = 0;
    for (int i = 0; i < n; i++)
        if (dev[i].kind == KN_DEVICE_CUDA) {
            *kind = KN_DEVICE_CUDA;
            *index = dev[i].index;
            return;
        }
}

/* The CPU kinds: a thread pool, and the guarded backend's buffer registry. */
static GfStatus open_cpu(KnDeviceKind kind, const KnBackendOptions *opts, KnBackend *b, GfError *err) {
    b->ctx.pool = kn_pool_new(opts ? opts->n_threads : 0, err);
    if (!b->ctx.pool) return err->status;
    if (kind == KN_DEVICE_CPU) {
        b->ops = cpu_backend_ops();
        snprintf(b->name, sizeof b->name, "cpu");
        return GF_OK;
    }
    b->ops = guarded_backend_ops();
    snprintf(b->name, sizeof b->name, "guarded");
    const KnBackend *share = opts ? opts->share : NULL;
    if (share && (share->ctx.device != KN_DEVICE_GUARDED || !share->ops)) share = NULL;
    if (guarded_ctx_init(&b->ctx, share ? &share->ctx : NULL, err)) {
        kn_pool_free(b->ctx.pool);
        memset(b, 0, sizeof *b); /* nothing left to close */
        return err->status;
    }
    return GF_OK;
}

GfStatus kn_guarded_memory(const KnBackend *b, uint64_t *held, uint64_t *peak, GfError *err) {
    *held = *peak = 0;
    if (!b || !b->ops || b->ctx.device != KN_DEVICE_GUARDED)
        return gf_error_set(err, GF_INVALID, "invalid_request", NULL, "not a guarded backend: no region to count");
    guarded_memory(&b->ctx, held, peak);
    return GF_OK;
}

GfStatus kn_guarded_watch(const KnBackend *b, KnCallWatch fn, void *user, GfError *err) {
    if (!b || !b->ops || b->ctx.device != KN_DEVICE_GUARDED)
        return gf_error_set(err, GF_INVALID, "invalid_request", NULL, "not a guarded backend: no calls to watch");
    guarded_watch(&b->ctx, fn, user);
    return GF_OK;
}

GfStatus kn_precision_parse(const char *text, KnPrecision *out, GfError *err) {
    if (strcmp(text, "fp32") == 0) *out = KN_PRECISION_FP32;
    else if (strcmp(text, "bf16") == 0) *out = KN_PRECISION_BF16;
    else return gf_error_set(err, GF_INVALID, "invalid_value", "precision", "precision '%s': expected fp32 or bf16", text);
    return GF_OK;
}

const char *kn_precision_name(KnPrecision p) {
    return p == KN_PRECISION_FP32 ? "fp32" : p == KN_PRECISION_BF16 ? "bf16" : "auto";
}

/* AUTO resolved for kind: BF16 on CUDA, FP32 on the CPU kinds, which
 * compute in float32 only. */
static GfStatus resolve_precision(KnDeviceKind kind, const KnBackendOptions *opts, KnPrecision *out, GfError *err) {
    KnPrecision p = opts ? opts->precision : KN_PRECISION_AUTO;
    if (p == KN_PRECISION_AUTO) p = kind == KN_DEVICE_CUDA ? KN_PRECISION_BF16 : KN_PRECISION_FP32;
    if (p == KN_PRECISION_BF16 && kind != KN_DEVICE_CUDA)
        return gf_error_set(err, GF_INVALID, "invalid_value", "precision",
                            "the %s backend computes in fp32 only; precision bf16 needs a CUDA device",
                            kind == KN_DEVICE_GUARDED ? "guarded" : "cpu");
    *out = p;
    return GF_OK;
}

GfStatus kn_backend_open(KnDeviceKind kind, int index, const KnBackendOptions *opts, KnBackend *out, GfError *err) {
    memset(out, 0, sizeof *out);
    KnPrecision precision;
    if (resolve_precision(kind, opts, &precision, err)) return err->status;
    out->ctx.device = kind;
    out->ctx.index = index;
    out->ctx.precision = precision;
    if ((kind == KN_DEVICE_CPU || kind == KN_DEVICE_GUARDED) && index == 0) return open_cpu(kind, opts, out, err);
    if (kind == KN_DEVICE_CUDA) {
#ifdef GF_HAVE_CUDA
        out->ops = cuda_backend_ops();
        snprintf(out->name, sizeof out->name, "cuda:%d", index);
        if (cuda_ctx_init(&out->ctx, index, err)) {
            memset(out, 0, sizeof *out);
            return err->status;
        }
        return GF_OK;
#else
        return gf_error_set(err, GF_NOT_FOUND, "device_not_available", "device",
                            "cuda:%d: this binary was built without the CUDA backend", index);
#endif
    }
    return gf_error_set(err, GF_NOT_FOUND, "device_not_available", "device", "no such device (kind %d, index %d)",
                        (int)kind, index);
}

const KnOps *kn_backend_ops(KnDeviceKind kind) {
    if (kind == KN_DEVICE_CPU) return cpu_backend_ops();
    if (kind == KN_DEVICE_GUARDED) return guarded_backend_ops();
#ifdef GF_HAVE_CUDA
    if (kind == KN_DEVICE_CUDA) return cuda_backend_ops();
#endif
    return NULL;
}

size_t kn_scratch_bytes(const KnBackend *b, const KnCall *call) {
    return b->ops && b->ops->scratch_bytes ? b->ops->scratch_bytes(&b->ctx, call) : 0;
}

void kn_backend_close(KnBackend *b) {
    if (!b || !b->ops) return;
    if (b->ctx.device == KN_DEVICE_GUARDED) guarded_ctx_free(&b->ctx);
#ifdef GF_HAVE_CUDA
    if (b->ctx.device == KN_DEVICE_CUDA) cuda_ctx_free(&b->ctx);
#endif
    kn_pool_free(b->ctx.pool);
    memset(b, 0, sizeof *b);
}

GfStatus kn_backend_parse(const char *text, KnDeviceKind *kind, int *index, GfError *err) {
    char *end = NULL;
    *index = 0;
    if (strcmp(text, "cpu") == 0) *kind = KN_DEVICE_CPU;
    else if (strcmp(text, "guarded") == 0) *kind = KN_DEVICE_GUARDED;
    else if (strcmp(text, "cuda") == 0) *kind = KN_DEVICE_CUDA;
    else if (strncmp(text, "cuda:", 5) == 0 && text[5] >= '0' && text[5] <= '9') {
        long v = strtol(text + 5, &end, 10);
        if (*end || v >= KN_MAX_DEVICES) goto bad;
        *kind = KN_DEVICE_CUDA;
        *index = (int)v;
    } else goto bad;
    return GF_OK;
bad:
    return gf_error_set(err, GF_INVALID, "invalid_value", "device", "unknown device '%.64s': use cpu, cuda or cuda:N",
                        text);
}
