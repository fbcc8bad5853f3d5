# gemmaforge's CPU image: built from this checkout with the same setup script
# CI runs (its --build-only part), then a slim Debian runtime with the binary,
# the dashboard and the shared libraries it links, run as an unprivileged user.
#   docker build -t gemmaforge:cpu .
#   docker run -p 127.0.0.1:8080:8080 -v /path/to/model:/model:ro -v gf-data:/data \
#     -e GF_API_KEYS=a-long-secret-key-0123 gemmaforge:cpu --allowed-host localhost
# Arguments after the image name are added to `gemmaforge serve`.

FROM debian:12 AS build
WORKDIR /src
COPY scripts/setup.sh scripts/setup.sh
RUN scripts/setup.sh --build-only && rm -rf /var/lib/apt/lists/*
COPY . .
RUN cmake -S . -B /build -DCMAKE_BUILD_TYPE=Release -DGF_CUDA=OFF \
 && cmake --build /build -j"$(nproc)" --target gemmaforge \
 && /build/server/gemmaforge --help >/dev/null

FROM debian:12-slim AS runtime
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      libmicrohttpd12 libcjson1 libturbojpeg0 libpng16-16 libsqlite3-0 zlib1g curl ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --home-dir /data --shell /usr/sbin/nologin gemmaforge \
 && mkdir -p /data && chown gemmaforge:gemmaforge /data
COPY --from=build /build/server/gemmaforge /usr/local/bin/gemmaforge
COPY web /usr/share/gemmaforge/web
USER gemmaforge
VOLUME /data
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
  CMD curl -fsS http://127.0.0.1:8080/healthz >/dev/null || exit 1
ENTRYPOINT ["gemmaforge", "serve", "--model", "/model", "--data", "/data", "--host", "0.0.0.0", "--port", "8080", \
            "--web", "/usr/share/gemmaforge/web"]
CMD []
