# syntax=docker/dockerfile:1
# Sightline's image: the `sightline` binary on a slim Debian, run as a non-root user.
#   docker build -t sightline:0.1.0 .
# The build stage runs the same cargo the test command runs; librdkafka is built from source by
# rdkafka-sys (static, with zlib, and TLS/SASL against the system OpenSSL: the rust image has
# libssl-dev), so the runtime stage needs the C library, libssl3 and the CA roots
# (ca-certificates brings both).

FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p sightline \
 && install -m 0755 target/release/sightline /usr/local/bin/sightline

FROM debian:bookworm-slim AS runtime
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --gid 10001 sightline \
 && useradd --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin sightline
COPY --from=build /usr/local/bin/sightline /usr/local/bin/sightline
USER 10001:10001
WORKDIR /data
# /metrics, /healthz, /readyz and the dashboard page (set http.listen to 0.0.0.0:9464), and
# the cluster's port between processes (cluster.listen).
EXPOSE 9464 2101
ENTRYPOINT ["/usr/local/bin/sightline"]
CMD ["run", "--config", "/etc/sightline/sightline.toml"]
