# Images of the operator (which also runs the control plane) and of the proxy, from static
# binaries. Build with e.g.:
#   docker build --target operator -t docker.io/mycel/operator:v0.1.0 .
#   docker build --target proxy    -t docker.io/mycel/proxy:v0.1.0 .
# The local cluster harness does not need Docker: it writes the same images as OCI archives itself.

FROM docker.io/library/rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
# Static glibc binaries (no dynamic loader needed at run time); rustls only, no OpenSSL.
ENV RUSTFLAGS="-C target-feature=+crt-static"
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --target x86_64-unknown-linux-gnu \
      -p mycel-operator -p mycel-proxy -p mycelctl \
 && mkdir -p /out \
 && cp target/x86_64-unknown-linux-gnu/release/mycel-operator \
       target/x86_64-unknown-linux-gnu/release/mycel-proxy \
       target/x86_64-unknown-linux-gnu/release/mycel-ratelimit \
       target/x86_64-unknown-linux-gnu/release/mycelctl /out/

FROM gcr.io/distroless/static-debian12:nonroot AS operator
COPY --from=build /out/mycel-operator /usr/local/bin/mycel-operator
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/mycel-operator"]

# The proxy image carries iptables for its `init` step, which installs the pod's capture rules.
FROM docker.io/library/debian:bookworm-slim AS proxy
RUN apt-get update \
 && apt-get install -y --no-install-recommends iptables \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /out/mycel-proxy /usr/local/bin/mycel-proxy
COPY --from=build /out/mycel-ratelimit /usr/local/bin/mycel-ratelimit
USER 1337:1337
ENTRYPOINT ["/usr/local/bin/mycel-proxy"]
