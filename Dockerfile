# One image per service: docker build --build-arg SERVICE=dedup .
#
# The base images are build arguments, so a machine without a registry can use its
# own (docs/production.md): GO_IMAGE builds, RUNTIME_IMAGE runs. test/compose builds
# its images without any registry at all: static binaries copied into scratch
# (test/compose/Dockerfile.scratch).
ARG GO_IMAGE=golang:1.26-bookworm
ARG RUNTIME_IMAGE=gcr.io/distroless/static-debian12:nonroot

FROM ${GO_IMAGE} AS build
ARG SERVICE
WORKDIR /src
COPY . .
RUN test -n "$SERVICE" && CGO_ENABLED=0 go build -trimpath -o /out/service ./services/${SERVICE}/cmd/${SERVICE} && mkdir -p /out/state

FROM ${RUNTIME_IMAGE}
COPY --from=build /out/service /usr/local/bin/service
# Local state (the dedup snapshot), writable by the nonroot user; a named volume
# mounted here starts with this ownership.
COPY --from=build --chown=65532:65532 /out/state /var/lib/sluice
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/service"]
