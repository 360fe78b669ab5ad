#!/bin/sh
# The CPU image built and run with podman where the registry of its base image is not reachable
# (these machines reach Debian's mirrors and PyPI only). As root on Debian 12:
#   apt-get install podman runc debootstrap podman-compose
#   WHEELS=/opt/wheels sh docker/build-local.sh [base|build|smoke|all]   # default: all
#   sh docker/build-local.sh standins && sh docker/build-local.sh compose
# base:  a stand-in for the Dockerfile's FROM image, python:3.11-slim-bookworm, from Debian 12's
#        own packages (debootstrap; its python3 is 3.11 too, 3.11.2), imported and tagged as it.
# build: docker/Dockerfile with podman, in docker format (the OCI format drops HEALTHCHECK).
# smoke: the image run with an API key: its HEALTHCHECK until healthy, 401 without the key, an
#        adapt and a chat with the adapter, the user it runs as, then podman stop (SIGTERM) and
#        the exit status.
# standins: redis:7 and nginx:1.27 (compose.yaml's) from Debian 12's redis-server 7.0 and nginx.
# compose: docker/compose.yaml with podman-compose: both replicas healthy, then through nginx on
#        127.0.0.1:8000 a 401, an adapt and chats, which replica answered what, stop, down.
# Knobs (environment):
#   WHEELS    a folder of wheels made into the PyTorch index the build uses, for a machine that
#             cannot reach download.pytorch.org (here /opt/wheels holds torch 2.13.0+cpu); pip
#             warns about every other project this index lacks
#   EXTRA_CA  certificates the stand-in trusts besides Debian's (default: those in
#             /usr/local/share/ca-certificates, e.g. a proxy that re-signs TLS, as here)
#   IMAGE (genadapter:cpu), PORT (18000: the smoke run's port on 127.0.0.1), WORK (scratch)
set -eu
cd "$(dirname "$0")/.."
BASE=docker.io/library/python:3.11-slim-bookworm  # what `FROM python:3.11-slim-bookworm` names
IMAGE=${IMAGE:-genadapter:cpu}
PORT=${PORT:-18000}
WORK=${WORK:-/var/tmp/genadapter-local}
WHEELS=${WHEELS:-}
EXTRA_CA=${EXTRA_CA:-$(ls /usr/local/share/ca-certificates/*.crt 2>/dev/null || true)}
NAME=genadapter-smoke
LOW="nice -n 19 ionice -c3"  # the build and the server share the machine
# runc: crun refuses this VM's hybrid cgroups (a controller on the v2 hierarchy).
PODMAN="podman --runtime ${RUNTIME:-runc}"
# Podman asks for 1M open files; without CAP_SYS_RESOURCE (this VM) the hard limit is the most,
# and podman lowers its own nproc to 32768 before starting a container.
ULIMITS=""
if [ "$(ulimit -Hn)" != unlimited ] && [ "$(ulimit -Hn)" -lt 1048576 ]; then
    ULIMITS="--ulimit nofile=$(ulimit -Hn):$(ulimit -Hn) --ulimit nproc=32768:32768"
fi
mkdir -p "$WORK"

base() {
    rm -rf "$WORK/rootfs"
    $LOW debootstrap --variant=minbase \
        --include=python3,python3-venv,python-is-python3,ca-certificates,netbase,tzdata \
        bookworm "$WORK/rootfs" http://deb.debian.org/debian >"$WORK/debootstrap.log"
    r=$WORK/rootfs
    rm -f "$r/etc/apt/sources.list"  # the sources the real image lists, security updates too
    cat >"$r/etc/apt/sources.list.d/debian.sources" <<'EOF'
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://deb.debian.org/debian-security
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
    pipcert=""
    if [ -n "$EXTRA_CA" ]; then
        # shellcheck disable=SC2086  # a list of files
        cp $EXTRA_CA "$r/usr/local/share/ca-certificates/"
        chroot "$r" update-ca-certificates >/dev/null
        # pip's own bundle (certifi) does not read the system's
        pipcert="ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt"
    fi
    rm -rf "$r"/var/cache/apt/*.bin "$r"/var/cache/apt/archives/*.deb "$r"/var/lib/apt/lists/* \
        "$r"/var/log/*.log "$r"/var/log/apt/*
    tar --numeric-owner -C "$r" -c . | $LOW $PODMAN import --change "ENV LANG=C.UTF-8" \
        ${pipcert:+--change "$pipcert"} --change 'CMD ["python3"]' - "$BASE"
    rm -rf "$r"
}

build() {
    index=""
    if [ -n "$WHEELS" ]; then  # a PEP 503 index of the folder: one page per project
        index=$WORK/index
        rm -rf "$index"
        for w in "$WHEELS"/*.whl; do
            p=$(basename "$w" | cut -d- -f1 | tr '_.' '--' | tr '[:upper:]' '[:lower:]')
            mkdir -p "$index/$p"
            cp -l "$w" "$index/$p/" 2>/dev/null || cp "$w" "$index/$p/"
            echo "<a href=\"$(basename "$w" | sed 's/+/%2B/g')\">$(basename "$w")</a>" \
                >>"$index/$p/index.html"
        done
    fi
    start=$(date +%s)
    # shellcheck disable=SC2086
    $LOW $PODMAN build --pull=never --format docker $ULIMITS -f docker/Dockerfile -t "$IMAGE" \
        ${index:+--volume "$index:/pip-index:ro" --build-arg PIP_EXTRA_INDEX_URL=file:///pip-index} .
    size=$($PODMAN image inspect --format '{{.Size}}' "$IMAGE")
    echo "built $IMAGE in $(($(date +%s) - start)) s, $size bytes"
}

healthy() {  # $1: container; its HEALTHCHECK, run by hand: podman runs it on a timer only under
    # systemd, which this VM lacks
    until $PODMAN healthcheck run "$1" >/dev/null 2>&1; do
        if [ "$($PODMAN inspect --format '{{.State.Running}}' "$1")" != true ]; then
            $PODMAN logs "$1" 2>&1 | tail -30
            echo "$1 exited" >&2
            exit 1
        fi
        if [ $(($(date +%s) - start)) -gt 1200 ]; then echo "$1: not healthy" >&2; exit 1; fi
        sleep 10
    done
}

requests() {  # $1: the server's URL, $2: the key, $3: how many chats; what both runs ask
    echo "without the key: $(curl -s -o /dev/null -w '%{http_code}' "$1/v1/models")"
    auth="authorization: Bearer $2"
    adapt=$(curl -sf "$1/v1/adapt" -H "$auth" -H 'content-type: application/json' -d '{
        "context": "Zorblat is a small planet orbiting the star Quenmar. Its capital is Velloran."}')
    echo "adapt: $adapt"
    id=$(echo "$adapt" | sed 's/.*"adapter_id": *"\([^"]*\)".*/\1/')
    for i in $(seq "$3"); do
        echo "chat $i: $(curl -sf "$1/v1/chat/completions" -H "$auth" \
            -H 'content-type: application/json' -d '{"model": "'"$id"'", "max_tokens": 32,
            "messages": [{"role": "user", "content": "What is the capital of Zorblat?"}]}' |
            sed 's/.*"content": *"\([^"]*\)".*/\1/')"
    done
}

smoke() {
    key=smoke-$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')
    url=http://127.0.0.1:$PORT
    $PODMAN rm -f "$NAME" >/dev/null 2>&1 || true
    # shellcheck disable=SC2086
    $LOW $PODMAN run -d --name "$NAME" $ULIMITS --shm-size=1g -p "127.0.0.1:$PORT:8000" \
        -e GENADAPTER_API_KEYS="smoke:$key" "$IMAGE" >/dev/null
    start=$(date +%s)
    healthy "$NAME"
    echo "healthy after $(($(date +%s) - start)) s: $(curl -s "$url/health")"
    echo "runs as: $($PODMAN top "$NAME" user,pid,args | head -3)"
    requests "$url" "$key" 1
    start=$(date +%s)
    $PODMAN stop -t 40 "$NAME" >/dev/null
    echo "stopped (SIGTERM) in $(($(date +%s) - start)) s, exit status" \
        "$($PODMAN inspect --format '{{.State.ExitCode}}' "$NAME")"
    $PODMAN logs "$NAME" >"$WORK/smoke.log" 2>&1
    $PODMAN rm "$NAME" >/dev/null
}

standins() {  # redis:7 and nginx:1.27, which compose.yaml names, from Debian 12's packages
    mkdir -p "$WORK/redis" "$WORK/nginx"
    # as the official image's entrypoint does for a redis-server without a config file
    printf '%s\n' '#!/bin/sh' \
        'if [ "$1" = redis-server ]; then shift; set -- redis-server --protected-mode no "$@"; fi' \
        'exec "$@"' >"$WORK/redis/entrypoint.sh"
    cat >"$WORK/redis/Containerfile" <<'END'
FROM python:3.11-slim-bookworm
RUN apt-get update && apt-get install -y --no-install-recommends redis-server redis-tools \
    && rm -rf /var/lib/apt/lists/*
COPY --chmod=755 entrypoint.sh /entrypoint.sh
ENTRYPOINT ["/entrypoint.sh"]
CMD ["redis-server"]
END
    cat >"$WORK/nginx/Containerfile" <<'END'
FROM python:3.11-slim-bookworm
RUN apt-get update && apt-get install -y --no-install-recommends nginx \
    && rm -rf /var/lib/apt/lists/* \
    && ln -sf /dev/stdout /var/log/nginx/access.log && ln -sf /dev/stderr /var/log/nginx/error.log
CMD ["nginx", "-g", "daemon off;"]
END
    for name in redis:7 nginx:1.27; do
        # shellcheck disable=SC2086
        $LOW $PODMAN build --pull=never --format docker $ULIMITS -t "docker.io/library/$name" \
            "$WORK/${name%%:*}"
    done
}

compose() {  # docker/compose.yaml with podman-compose: two replicas, Redis, nginx on :8000
    key=smoke-$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')
    url=http://127.0.0.1:8000
    pc="podman-compose --podman-args=--runtime=${RUNTIME:-runc} -p genadapter -f docker/compose.yaml"
    pc="$pc $(echo "$ULIMITS" | sed 's/--ulimit /--podman-run-args=--ulimit=/g')"
    export GENADAPTER_API_KEYS="smoke:$key"  # compose.yaml requires it for every command
    $LOW $pc up -d
    start=$(date +%s)
    healthy genadapter_server-1_1
    healthy genadapter_server-2_1
    echo "both replicas healthy after $(($(date +%s) - start)) s"
    echo "through nginx: /health $(curl -s "$url/health")"
    requests "$url" "$key" 4
    for s in server-1 server-2; do  # which replica answered what: its access log
        log=$($PODMAN logs "genadapter_${s}_1" 2>&1)
        echo "$s: $(echo "$log" | grep -c 'POST /v1/adapt .* 200') adapt(s)," \
            "$(echo "$log" | grep -c 'POST /v1/chat/completions .* 200') chat(s)"
    done
    $pc stop -t 40  # compose.yaml's stop_grace_period, which podman-compose 1.0.3 does not read
    for s in server-1 server-2; do
        echo "$s stopped, exit status" \
            "$($PODMAN inspect --format '{{.State.ExitCode}}' "genadapter_${s}_1")"
    done
    $pc down
}

case ${1:-all} in
base) base ;;
build) build ;;
smoke) smoke ;;
all) base && build && smoke ;;
standins) standins ;;
compose) compose ;;
*) echo "usage: $0 [base|build|smoke|all|standins|compose]" >&2; exit 2 ;;
esac
