#!/usr/bin/env bash
# `make image`: build the CPU image from the project's one Dockerfile with podman, as a user would with
# Docker, plus the build arguments this machine needs (no Docker Hub, no PyTorch index):
#   - the base: Debian bookworm made by debootstrap, imported as localhost/debian-base:bookworm
#     (GEARSHIFT_BASE_IMAGE=python:3.11-slim builds exactly the Docker default where a registry answers);
#   - pip: the host's own settings (index, find-links, CA bundle, constraints) as PIP_* build arguments,
#     the folders they name mounted read-only at the same paths; torch from them (TORCH_INDEX_CPU="").
# Cached by a hash of its inputs (the build context the Dockerfile copies, the build arguments, the base):
# an unchanged tree builds nothing. Prints the image name (also tagged as the manifests' image) on stdout.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/../.." && pwd)
cd "$REPO"
log() { echo "[image] $*" >&2; }
BASE=${GEARSHIFT_BASE_IMAGE:-localhost/debian-base:bookworm}
MIRROR=${GEARSHIFT_DEBIAN_MIRROR:-http://deb.debian.org/debian}
# The image the manifests name (operator.yaml): the local build is tagged with it, so `kubectl apply -k
# manifests/` runs this build with imagePullPolicy IfNotPresent, as the README tells users.
MANIFEST_IMAGE=$(awk '/^ *image:/{print $2; exit}' manifests/operator.yaml)

ensure_tools() {
    local missing=()
    for p in podman debootstrap runc; do command -v "$p" >/dev/null || missing+=("$p"); done
    ((${#missing[@]} == 0)) && return 0
    log "apt-get install ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >&2
}

# podman on this VM: crun refuses hybrid cgroups (runc instead), and CRI-less containers may not raise
# rlimits without CAP_SYS_RESOURCE (no default ulimits).
ensure_podman_conf() {
    local f=/etc/containers/containers.conf
    grep -q 'gearshift' "$f" 2>/dev/null && return 0
    [[ -s $f ]] && { log "$f exists and is not ours; leaving it (podman runs with --runtime runc)"; return 0; }
    mkdir -p /etc/containers
    printf '# gearshift e2e/image/build.sh: hybrid cgroups need runc; no CAP_SYS_RESOURCE for ulimits\n[containers]\ndefault_ulimits = []\n[engine]\nruntime = "runc"\n' > "$f"
}

ensure_base() {
    [[ $BASE != localhost/debian-base:bookworm ]] && return 0
    podman image exists "$BASE" && return 0
    local dir; dir=$(mktemp -d /var/tmp/gearshift-debootstrap.XXXXXX)
    log "debootstrap --variant=minbase bookworm from $MIRROR (about a minute)"
    debootstrap --variant=minbase bookworm "$dir" "$MIRROR" >&2
    tar -C "$dir" -c . | podman import - "$BASE" >&2
    rm -rf "$dir"
}

# pip's settings on this host -> PIP_* build arguments and read-only mounts of the paths they name. The CA
# bundle is mounted beside, not over, the image's own (the runtime stage installs ca-certificates there).
declare -A SEEN=()
pip_args() {
    local py=${PY:-python3} key val var word path
    while IFS='=' read -r key val; do
        val=${val#\'}; val=${val%\'}
        case ${key##*.} in
            index-url) var=PIP_INDEX_URL ;; extra-index-url) var=PIP_EXTRA_INDEX_URL ;;
            find-links) var=PIP_FIND_LINKS ;; cert) var=PIP_CERT ;; constraint) var=PIP_CONSTRAINT ;;
            *) continue ;;
        esac
        [[ -n ${SEEN[$var]:-} ]] && continue
        SEEN[$var]=1
        if [[ $var == PIP_CERT ]]; then
            ARGS+=(--build-arg "PIP_CERT=/run/gearshift-pip-ca.crt")
            MOUNTS+=(-v "$val:/run/gearshift-pip-ca.crt:ro")
            continue
        fi
        ARGS+=(--build-arg "$var=$val")
        for word in $val; do
            path=${word#file://}
            path=${path%/simple}
            [[ $path == /* && -e $path && -z ${SEEN[$path]:-} ]] || continue
            SEEN[$path]=1
            MOUNTS+=(-v "$path:$path:ro")
        done
    done < <("$py" -m pip config list 2>/dev/null)
}

ensure_tools
ensure_podman_conf
ensure_base
ARGS=(--build-arg "BASE_IMAGE=$BASE")
MOUNTS=()
if [[ -z ${GEARSHIFT_IMAGE_DEFAULT_PIP:-} ]]; then
    ARGS+=(--build-arg TORCH_INDEX_CPU=)
    pip_args
fi
# Inputs: what the Dockerfile copies (tracked and untracked, not ignored), the arguments, the base's ID.
inputs=$( { printf '%s\n' "${ARGS[@]}" "$(podman image inspect --format '{{.Id}}' "$BASE" 2>/dev/null || echo "$BASE")";
            git ls-files -co --exclude-standard -- Dockerfile .dockerignore pyproject.toml README.md engine operator \
              | sort | xargs sha256sum; } | sha256sum | cut -c1-12)
TAG=localhost/gearshift:cpu-$inputs
# What each build leaves behind (its tag, its untagged build stages: ~6 GB a build) is listed here, so
# that the next build removes exactly those, never an image this script did not make. Stages the new build
# used as its cache (their IDs are in its log) are kept.
LEFTOVERS=${XDG_CACHE_HOME:-$HOME/.cache}/gearshift/image-leftovers
drop_older_builds() { # new-tag build-log new-stage-ids...
    local tag=$1 buildlog=$2 item keep=(); shift 2
    [[ -f $LEFTOVERS ]] && while read -r item; do
        [[ -z $item || $item == "$tag" ]] && continue
        if [[ $item != *:* ]] && grep -q "${item:0:12}" "$buildlog"; then keep+=("$item"); continue; fi
        podman rmi "$item" >/dev/null 2>&1 && log "removed $item (an older build)"
    done <"$LEFTOVERS"
    mkdir -p "$(dirname "$LEFTOVERS")"
    printf '%s\n' "$tag" "${keep[@]}" "$@" | sort -u >"$LEFTOVERS"
}
if podman image exists "$TAG"; then
    log "cached: $TAG (inputs unchanged)"
else
    log "podman build -> $TAG"
    start=$(date +%s)
    before=$(podman images -q --filter dangling=true | sort -u)
    buildlog=$(mktemp)
    nice -n 10 podman build --runtime runc --network host "${MOUNTS[@]}" "${ARGS[@]}" -t "$TAG" -f Dockerfile . \
        2>&1 | tee "$buildlog" >&2
    log "built $TAG in $(( $(date +%s) - start ))s"
    drop_older_builds "$TAG" "$buildlog" \
        $(comm -13 <(echo "$before") <(podman images -q --filter dangling=true | sort -u))
    rm -f "$buildlog"
fi
podman tag "$TAG" "$MANIFEST_IMAGE"
echo "$TAG"
