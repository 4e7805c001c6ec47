# syntax=docker/dockerfile:1
#
# allowance: the gRPC server and its operator tools (serve, migrate, health) in one image.
#
#   docker build -t allowance .
#   docker run --rm -e DATABASE_URL=postgres://... -p 50051:50051 -p 9090:9090 allowance
#   docker run --rm -e DATABASE_URL=postgres://... allowance migrate
#
# Works with BuildKit and with the classic builder. Dependencies are compiled in their own layer, so a change
# to src/ rebuilds only the allowance crate; export that layer in CI (e.g. --cache-to type=registry) to keep it.

# Keep the builder on the same Debian release as the runtime image: the binary links against the builder's
# glibc and must not need a newer one than the runtime has. The toolchain must satisfy Cargo.toml's
# rust-version (1.88, edition 2024).
ARG RUST_VERSION=1.95
ARG DEBIAN_RELEASE=bookworm

############################################################################################################
FROM rust:${RUST_VERSION}-${DEBIAN_RELEASE} AS builder

# sqlx's query! macros check SQL against the metadata committed in .sqlx/ instead of a live database.
# No protoc either: build.rs compiles proto/ with the pure-Rust protox.
ENV SQLX_OFFLINE=true \
    CARGO_TERM_COLOR=never

WORKDIR /build

# 1. Dependencies only. Build a skeleton of the crate (the real manifests and lockfile, empty sources) so
#    this layer is invalidated by Cargo.toml / Cargo.lock changes only, not by every source edit. The build
#    script is a stub too, but cargo still compiles the [build-dependencies] (protox, tonic-prost-build)
#    here. If Cargo.toml ever declares an explicit [[bin]] / [[bench]] / [[test]] / [[example]] target, add
#    a stub for it below, or cargo refuses to read the manifest.
#    Afterwards every artifact of the skeleton crate itself is deleted, fingerprints included: COPY keeps the
#    files' own modification times, which can be older than the skeleton's, so trusting mtimes could ship
#    the empty main. Without a fingerprint cargo must rebuild the crate from the real sources.
COPY Cargo.toml Cargo.lock ./
RUN mkdir src \
    && echo 'fn main() {}' > src/main.rs \
    && touch src/lib.rs \
    && echo 'fn main() {}' > build.rs \
    && cargo build --release --locked --bin allowance \
    && rm -rf src build.rs \
        target/release/allowance target/release/allowance.d \
        target/release/.fingerprint/allowance-* \
        target/release/build/allowance-* \
        target/release/deps/allowance-* \
        target/release/deps/liballowance-*

# 2. The crate itself. Only what the build reads: the build script and protos, the migrations (embedded by
#    sqlx::migrate!), the offline query metadata and the sources.
COPY build.rs ./
COPY proto ./proto
COPY migrations ./migrations
COPY .sqlx ./.sqlx
COPY src ./src
# `--version` fails the build here, not at deploy time, if the binary does not start.
RUN cargo build --release --locked --bin allowance \
    && cp target/release/allowance /usr/local/bin/allowance \
    && /usr/local/bin/allowance --version

############################################################################################################
FROM debian:${DEBIAN_RELEASE}-slim AS runtime

LABEL org.opencontainers.image.title="allowance" \
      org.opencontainers.image.description="Atomic spending limits over gRPC and Postgres" \
      org.opencontainers.image.licenses="Apache-2.0"

# ca-certificates: the system trust store, for TLS clients in the process that use the platform's roots
# (Postgres TLS itself verifies against the web PKI roots compiled into the binary, or sslrootcert=...).
# Versions are left to the Debian release: pinning them would break the build at every security update.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/*

# A fixed, non-root uid/gid so Kubernetes can enforce runAsNonRoot with runAsUser: 10001 and file ownership
# is predictable. No home directory, no login shell: the process needs neither.
RUN groupadd --system --gid 10001 allowance \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin allowance

COPY --from=builder /usr/local/bin/allowance /usr/local/bin/allowance

# Container defaults: listen on every interface (the binary's own default is loopback only), JSON logs for
# log collectors. DATABASE_URL has no default: pass it at run time, never bake it into the image.
ENV ALLOWANCE_LISTEN=0.0.0.0:50051 \
    ALLOWANCE_METRICS_LISTEN=0.0.0.0:9090 \
    ALLOWANCE_LOG_FORMAT=json

# 50051: gRPC (SpendingLimits, grpc.health.v1, reflection). 9090: Prometheus metrics at /metrics.
EXPOSE 50051 9090

# Numeric, so runtimes can verify "non-root" without reading /etc/passwd.
USER 10001:10001

# `allowance health` is a grpc.health.v1 probe that exits 0 only while the server reports SERVING, i.e. the
# database is reachable and migrated. It dials http://127.0.0.1:50051 unless ALLOWANCE_ADDR (or --addr) says
# otherwise: set ALLOWANCE_ADDR too if you change the port in ALLOWANCE_LISTEN. With TLS on (ALLOWANCE_TLS_CERT),
# set ALLOWANCE_ADDR=https://127.0.0.1:50051 and ALLOWANCE_TLS_CA (see docs/operations.md, "TLS and mTLS").
# Kubernetes ignores HEALTHCHECK and uses the probes in deploy/kubernetes/deployment.yaml instead.
HEALTHCHECK --interval=15s --timeout=3s --start-period=20s --retries=3 \
    CMD ["allowance", "health"]

# The binary is PID 1: it handles SIGTERM itself (reports NOT_SERVING, drains, exits) and starts no child
# processes, so no init shim is needed.
ENTRYPOINT ["allowance"]
CMD ["serve"]
