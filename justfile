# Developer shortcuts; each recipe is a thin wrapper so that nothing here is needed to build.

# This machine's target triple (a build for it with --target keeps RUSTFLAGS off build scripts
# and proc macros, which cannot be static).
host := `rustc -vV | sed -n 's/^host: //p'`

# Run every test (unit, drift, lint, e2e on the local cluster).
test:
    scripts/test

# Start the local cluster (or reuse it) and print how to reach it.
cluster:
    cargo run -q -p mycel-e2e --bin mycel-dev -- cluster up

# Stop the local cluster and remove its state.
cluster-down:
    cargo run -q -p mycel-e2e --bin mycel-dev -- cluster down

# Regenerate config/crd from the Rust types in crds/.
crds:
    cargo run -q -p mycel-crds --bin crdgen

# The demo: local cluster, CRDs and samples.
demo:
    scripts/demo

# Format and lint.
lint:
    cargo fmt --all
    cargo clippy --workspace --all-targets -- -D warnings

# The proxy benchmark: direct, mycel (1 and 2 hops), nginx and HAProxy side by side; writes
# docs/benchmarks/proxy.{md,json}. Installs nginx and HAProxy when missing (root). The proxy
# measured is built as the Dockerfile builds it for the images: static, glibc linked in.
bench-proxy:
    command -v nginx >/dev/null || apt-get install -y -qq nginx-light haproxy
    RUSTFLAGS="-C target-feature=+crt-static" cargo build --release -j2 -p mycel-proxy --target {{host}}
    MYCEL_BENCH_PROXY={{justfile_directory()}}/target/{{host}}/release/mycel-proxy cargo bench -p mycel-proxy --bench proxy

# What authorization policies cost a sidecar: 50 ALLOW policies of 10 rules each (the matching
# rule last) against none, CPU per request in interleaved rounds; writes docs/benchmarks/authz.{md,json}.
bench-authz:
    RUSTFLAGS="-C target-feature=+crt-static" cargo build --release -j2 -p mycel-proxy --target {{host}}
    MYCEL_BENCH_ONLY=authz MYCEL_BENCH_PROXY={{justfile_directory()}}/target/{{host}}/release/mycel-proxy cargo bench -p mycel-proxy --bench proxy

# What local rate limits cost a request (CPU, p50/p99), against no limit, in interleaved rounds:
# writes docs/benchmarks/ratelimit.{md,json}.
bench-ratelimit:
    RUSTFLAGS="-C target-feature=+crt-static" cargo build --release -j2 -p mycel-proxy --target {{host}}
    MYCEL_BENCH_ONLY=ratelimit MYCEL_BENCH_PROXY={{justfile_directory()}}/target/{{host}}/release/mycel-proxy cargo bench -p mycel-proxy --bench proxy

# The proxy benchmark with a baseline binary in the same rounds (e.g. a static release build of
# main before a change): writes docs/benchmarks/proxy-vs-baseline.{md,json}.
bench-proxy-baseline baseline:
    command -v nginx >/dev/null || apt-get install -y -qq nginx-light haproxy
    RUSTFLAGS="-C target-feature=+crt-static" cargo build --release -j2 -p mycel-proxy --target {{host}}
    MYCEL_BENCH_BASELINE={{baseline}} MYCEL_BENCH_PROXY={{justfile_directory()}}/target/{{host}}/release/mycel-proxy cargo bench -p mycel-proxy --bench proxy

# The control-plane benchmark on the local cluster: 1000 Services, 100/1000/5000 simulated
# proxies; writes docs/benchmarks/control-plane.{md,json}.
bench-control-plane:
    cargo build --release -j2 -p mycel-operator
    cargo bench -p mycel-e2e --bench control_plane

# The control-plane benchmark with a baseline mycel-operator binary (e.g. a release build of main
# before a change) in interleaved rounds: writes docs/benchmarks/control-plane-vs-baseline.{md,json}.
bench-control-plane-baseline baseline:
    cargo build --release -j2 -p mycel-operator
    MYCEL_BENCH_BASELINE={{baseline}} MYCEL_BENCH_PROXIES=${MYCEL_BENCH_PROXIES:-1000} cargo bench -p mycel-e2e --bench control_plane

# Every benchmark.
bench: bench-proxy bench-authz bench-ratelimit bench-control-plane
