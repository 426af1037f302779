# Stowage container image: the binary, its config, two empty directories for the volumes,
# on a distroless base (glibc, libgcc, CA roots, no shell, no package manager).
#
#   docker build -t stowage .
#       The default: compiles in rust:1-bookworm, then the runtime stage. Needs the network.
#   cargo build --release --locked && strip target/release/stowage
#   docker build --target prebuilt -t stowage .
#       Takes the binary cargo built on this machine (a release pipeline that has already
#       built and tested it; tests/e2e/12-image.sh). --build-arg STOWAGE_BINARY=PATH names
#       another one inside the context (.dockerignore lets only these paths of target/ in).
#       The binary links glibc dynamically: build it on Debian 12 (glibc 2.36) or older.
#   --build-arg RUST_IMAGE=... / RUNTIME_IMAGE=...: other base images (a mirror, an offline
#       copy); the runtime base must have glibc, libgcc_s and /etc/ssl/certs.
#
#   docker run -p 3128:3128 -p 5000:5000 -v stowage-cache:/var/cache/stowage \
#              -v stowage-ca:/var/lib/stowage/certs stowage
#
# Runs as uid 10001, needs no writable root filesystem: mount volumes on the cache and CA
# directories (or on /var/lib/stowage, as the Kubernetes example does). Both are owned by
# 10001 in the image, so a new named volume is writable. There is no VOLUME instruction: an
# anonymous volume on /var/lib/stowage/certs would hide the CA from a volume mounted on its
# parent and mint a new CA in every new container (tests/e2e/12-image.sh saw it).
# Liveness: GET /healthz on :3128 (the Kubernetes examples probe it).
ARG RUST_IMAGE=docker.io/library/rust:1-bookworm
ARG RUNTIME_IMAGE=gcr.io/distroless/cc-debian12

FROM ${RUST_IMAGE} AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin stowage && strip target/release/stowage

# The directories the volumes mount on, made without a shell (the runtime base has none):
# /var/cache and /var/lib owned by root, what is below them by 10001. (COPY --chown also
# chowns every directory it creates or finds inside what it copies, hence three steps.)
FROM scratch AS dirs
WORKDIR /parents/var/cache
WORKDIR /parents/var/lib
WORKDIR /leaves/cache/stowage
WORKDIR /leaves/lib/stowage/certs

FROM ${RUNTIME_IMAGE} AS runtime
COPY --from=dirs /parents/ /
COPY --from=dirs --chown=10001:10001 /leaves/cache/ /var/cache/
COPY --from=dirs --chown=10001:10001 /leaves/lib/ /var/lib/
COPY docker/config.toml /etc/stowage/config.toml
USER 10001:10001
EXPOSE 3128 5000
ENTRYPOINT ["/usr/local/bin/stowage", "--config", "/etc/stowage/config.toml"]
CMD ["run"]

FROM runtime AS prebuilt
ARG STOWAGE_BINARY=target/release/stowage
COPY ${STOWAGE_BINARY} /usr/local/bin/stowage

# Last, so a plain `docker build` builds it.
FROM runtime AS full
COPY --from=build /src/target/release/stowage /usr/local/bin/stowage
