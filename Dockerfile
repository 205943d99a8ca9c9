# syntax=docker/dockerfile:1
#
# One image, both binaries: /usr/local/bin/cachalot-operator and /usr/local/bin/cachalot-registry.
# Stage 1 builds static musl binaries; stage 2 is FROM scratch: no shell, no package manager, runs
# as the non-root user 65532 and needs nothing writable in its root filesystem.
#
#   docker buildx build --platform linux/amd64,linux/arm64 -t ghcr.io/cachalot-dev/cachalot:0.1.0 .
#
# Multi-arch builds run each platform's stage natively (or under QEMU), so the musl target is
# always the build platform's own and no cross linker is needed. See docs/packaging.md for what
# was and was not built on the development machines (scripts/build-image-local needs no network).

ARG RUST_VERSION=1.95

FROM docker.io/library/rust:${RUST_VERSION}-bookworm AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends musl-tools ca-certificates \
 && rm -rf /var/lib/apt/lists/*
RUN case "$(uname -m)" in \
      x86_64) echo x86_64-unknown-linux-musl ;; \
      aarch64) echo aarch64-unknown-linux-musl ;; \
      *) echo "unsupported architecture $(uname -m)" >&2; exit 1 ;; \
    esac > /rust-target \
 && rustup target add "$(cat /rust-target)"
WORKDIR /src
# The whole workspace is needed for cargo to resolve it; .dockerignore keeps target/ and docs out.
COPY . .
# ring and other C code must be compiled against musl too, hence CC_<target>=musl-gcc.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    target="$(cat /rust-target)" \
 && export "CC_$(echo "$target" | tr - _)=musl-gcc" \
 && cargo build --locked --release --target "$target" \
      -p cachalot-registry -p cachalot-operator --bin cachalot-registry --bin cachalot-operator \
 && mkdir -p /out/bin \
 && cp "target/$target/release/cachalot-registry" "target/$target/release/cachalot-operator" /out/bin/
# A passwd/group naming the runtime user, so tools that resolve uid 65532 show "nonroot".
RUN mkdir -p /out/etc \
 && echo 'nonroot:x:65532:65532:nonroot:/nonexistent:/sbin/nologin' > /out/etc/passwd \
 && echo 'nonroot:x:65532:' > /out/etc/group

FROM scratch
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="cachalot" \
      org.opencontainers.image.description="Pull-through caching registry and Kubernetes operator for registry rate limits" \
      org.opencontainers.image.source="https://github.com/cachalot-dev/cachalot" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}"
# Upstream registries are reached over TLS; the registry trusts the Mozilla roots bundled here.
COPY --from=build /etc/ssl/certs/ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
COPY --from=build /out/etc/passwd /out/etc/group /etc/
COPY --from=build /out/bin/ /usr/local/bin/
ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt
USER 65532:65532
# The operator is the image's default command; registry and node agent pods set their own command.
ENTRYPOINT ["/usr/local/bin/cachalot-operator"]
CMD ["run"]
