# Stowage container image: build in a full Rust image, run the binary in a small one.
#
#   docker build -t stowage .        (or: buildah bud -t stowage .)
#   docker run -p 3128:3128 -p 5000:5000 -v stowage-cache:/var/cache/stowage \
#              -v stowage-ca:/var/lib/stowage/certs stowage
#
# Runs as uid 10001, needs no writable root filesystem (the cache and CA are volumes).
# Liveness: GET /healthz on :3128 (the Kubernetes examples probe it).

FROM docker.io/library/rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin stowage && strip target/release/stowage

FROM docker.io/library/debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --home-dir /var/lib/stowage stowage \
    && mkdir -p /var/cache/stowage /var/lib/stowage/certs /etc/stowage \
    && chown -R 10001:10001 /var/cache/stowage /var/lib/stowage
COPY --from=build /src/target/release/stowage /usr/local/bin/stowage
COPY docker/config.toml /etc/stowage/config.toml
USER 10001:10001
VOLUME ["/var/cache/stowage", "/var/lib/stowage/certs"]
EXPOSE 3128 5000
ENTRYPOINT ["/usr/local/bin/stowage", "--config", "/etc/stowage/config.toml"]
CMD ["run"]
