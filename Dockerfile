# One image per service: docker build --build-arg SERVICE=dedup .
FROM golang:1.26-bookworm AS build
ARG SERVICE
WORKDIR /src
COPY . .
RUN test -n "$SERVICE" && CGO_ENABLED=0 go build -trimpath -o /out/service ./services/${SERVICE}/cmd/${SERVICE} && mkdir -p /out/state

FROM gcr.io/distroless/static-debian12:nonroot
COPY --from=build /out/service /usr/local/bin/service
# Local state (the dedup snapshot), writable by the nonroot user; a named volume
# mounted here starts with this ownership.
COPY --from=build --chown=65532:65532 /out/state /var/lib/sluice
ENTRYPOINT ["/usr/local/bin/service"]
