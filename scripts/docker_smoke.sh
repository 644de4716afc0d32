#!/usr/bin/env bash
# The container, built and run for real (`make docker-smoke`; issue 13). No Docker engine, no registry and no
# GPU are needed: podman builds Dockerfile.cuda, unchanged, on a local Debian 12 base (so torch is the CPU
# build), and podman-compose runs docker-compose.training.yml's own services (its mounts, image user,
# read-only root, tmpfs, stop signal and grace period) on the tiny model:
#   1. `training` profile: the demo config trains, exports and verifies under the read-only root; the GGUFs
#      land in the gguf volume and another UID can read them;
#   2. SIGTERM mid-training (`stop`): exit 143 within stop_grace_period, a committed checkpoint in the volume;
#      the next `up` resumes and ends with the adapter of the uninterrupted run, byte for byte;
#   3. `training-dev` profile: an edit to a bind-mounted source file applies without a rebuild;
#   4. the GGUF comes out of the volume and out of the stopped container the way docs/docker.md says.
# It prints each check and how long each step took; docs/docker.md ("Checked with podman") has the numbers.
#
# Needs: root, podman + runc (+ debootstrap for the first base image), network to PyPI and Debian's archive.
# The cache (base rootfs, podman-compose, the CPU torch wheel) lives in DOCKER_SMOKE_CACHE; the llama.cpp
# compile is cached by podman's layer cache (the builder stage changes only with the llama-cpp-python pin and
# the two llama.cpp scripts).
# The compose file's named volumes are emptied first, but only volumes this script created: anything else
# with those names may hold real weights or runs, and the script stops instead of touching it.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
HERE=$ROOT/scripts/docker
CACHE=${DOCKER_SMOKE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/gemma-lora-docker-smoke}
TREE=$CACHE/run/tree     # the work tree as a fresh clone would have it: tracked + untracked, nothing ignored
LOGS=$CACHE/run/logs
export CONTAINERS_CONF=$HERE/containers.conf
BASE_IMAGE=localhost/gemma-lora-smoke-base:bookworm
BASE_PYTHON=3.11              # Debian 12's python3, the interpreter the CPU torch wheel is built for
PODMAN_COMPOSE=podman-compose==1.6.0
SMOKE_LABEL=gemma-lora.docker-smoke=1
OTHER_UID=4242                # "another user" reading the GGUFs
SIGTERM_AT_STEP=30            # of the demo's 160 steps, before the first save_steps checkpoint (80)

# --- output helpers ----------------------------------------------------------------------------------------
declare -a SUMMARY=()
LOG_COUNT=0
T_START=$(date +%s)

now() { date +%s; }
say() { printf '\n== %s\n' "$*"; }
fail() {
    printf '\nFAILED: %s\n' "$*" >&2
    printf '  logs: %s\n' "$LOGS" >&2
    exit 1
}
# timed NAME CMD...: run CMD with its output in $LOGS/NN.log (LAST_LOG), and note how long it took.
timed() {
    local name=$1 start rc=0
    shift
    LOG_COUNT=$((LOG_COUNT + 1))
    LAST_LOG=$LOGS/$(printf '%02d' "$LOG_COUNT").log
    start=$(now)
    "$@" > "$LAST_LOG" 2>&1 || rc=$?
    LAST_SECONDS=$(($(now) - start))
    printf '   %-58s %4d s%s\n' "$name" "$LAST_SECONDS" "$([ "$rc" = 0 ] || echo "  (exit $rc, $LAST_LOG)")"
    SUMMARY+=("$(printf '%-62s %4d s' "$name" "$LAST_SECONDS")")
    return "$rc"
}
# ok TEXT: a check that held.
ok() {
    printf '   ok  %s\n' "$*"
    SUMMARY+=("  ok  $*")
}

# --- podman, podman-compose and the compose file --------------------------------------------------------------
compose() {
    # --in-pod false: plain containers, as Docker Compose makes them. --read-only-tmpfs=false: podman's
    # --read-only otherwise adds writable tmpfs on /run, /tmp and /var/tmp, which Docker's read_only does
    # not; without it the read-only check would be weaker than production.
    (cd "$TREE" && "$CACHE/tools/bin/podman-compose" --in-pod false \
        -f docker-compose.training.yml -f "$HERE/smoke.override.yml" \
        --podman-run-args=--read-only-tmpfs=false "$@")
}
# compose_value PYTHON-EXPR: a value from the merged config (`c` is the parsed `podman-compose config`).
compose_value() {
    compose --profile training --profile training-dev config 2> /dev/null \
        | "$CACHE/tools/bin/python" -c "import sys, yaml; c = yaml.safe_load(sys.stdin); print($1)"
}
container_of() {
    podman ps -a --filter "label=com.docker.compose.service=$1" --format '{{.Names}}' | head -n1
}
volume_dir() { podman volume inspect --format '{{.Mountpoint}}' "$1"; }
seconds_of() {  # a compose duration (1h2m3s, 5m, 90s) in seconds
    local d=$1 total=0 n unit
    while [[ $d =~ ^([0-9]+)([hms])(.*)$ ]]; do
        n=${BASH_REMATCH[1]} unit=${BASH_REMATCH[2]} d=${BASH_REMATCH[3]}
        case $unit in h) total=$((total + n * 3600)) ;; m) total=$((total + n * 60)) ;; s) total=$((total + n)) ;; esac
    done
    echo "$total"
}

preflight() {
    [ "$(id -u)" = 0 ] || fail "run as root: podman here runs rootful (runc, cgroupfs)"
    command -v podman > /dev/null || fail "podman not found: apt-get install podman runc debootstrap"
    command -v runc > /dev/null || fail "runc not found: apt-get install runc"
    mkdir -p "$CACHE" "$LOGS"
    rm -f "$LOGS"/*.log
}
tools() {
    if "$CACHE/tools/bin/podman-compose" --version 2> /dev/null | grep -q "${PODMAN_COMPOSE#*==}"; then
        echo "$PODMAN_COMPOSE already in $CACHE/tools"
        return
    fi
    python3 -m venv "$CACHE/tools"
    "$CACHE/tools/bin/pip" install "$PODMAN_COMPOSE"
}

# A Debian 12 root filesystem as a local image: no registry is reachable, so nothing can be pulled.
# The host's own CA additions (here a TLS-inspecting egress proxy) are trusted inside it, by apt through the
# system store and by pip through /etc/pip.conf (pip otherwise uses its bundled certifi).
base_image() {
    if podman image exists "$BASE_IMAGE"; then
        echo "$BASE_IMAGE already there"
        return
    fi
    command -v debootstrap > /dev/null || { echo "debootstrap not found: apt-get install debootstrap"; return 1; }
    local rootfs=$CACHE/rootfs
    rm -rf "$rootfs"
    debootstrap --variant=minbase --include=ca-certificates bookworm "$rootfs" http://deb.debian.org/debian
    find /usr/local/share/ca-certificates -name '*.crt' -exec cp {} "$rootfs/usr/local/share/ca-certificates/" \;
    chroot "$rootfs" update-ca-certificates
    printf '[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n' > "$rootfs/etc/pip.conf"
    tar -C "$rootfs" -c . | podman import --message "debootstrap bookworm minbase (docker_smoke.sh)" - "$BASE_IMAGE"
    rm -rf "$rootfs"
}

snapshot_tree() {
    rm -rf "$TREE"
    mkdir -p "$TREE"
    # Files git would hand to a fresh clone plus uncommitted ones; deleted-but-staged paths and .env skipped.
    git -C "$ROOT" ls-files -z --cached --others --exclude-standard \
        | (cd "$ROOT" && while IFS= read -r -d '' f; do
            [ -f "$f" ] && [ "$f" != .env ] && printf '%s\0' "$f"
        done) \
        | tar -C "$ROOT" --null -T - -cf - | tar -C "$TREE" -xf -
}

# The CPU torch wheel for the build (Dockerfile.cuda installs it from /torch-wheels on a base without CUDA).
# pip finds it on PyTorch's CPU index, or wherever the host's pip config points (here a local wheel folder).
torch_wheel() {
    local version
    version=$(sed -n 's/^torch==//p' "$TREE/constraints.txt")
    mkdir -p "$CACHE/torch-wheels"
    if compgen -G "$CACHE/torch-wheels/torch-$version+cpu-*.whl" > /dev/null; then
        echo "torch $version+cpu already in $CACHE/torch-wheels"
        return
    fi
    "$CACHE/tools/bin/pip" download --no-deps --only-binary :all: --platform manylinux_2_28_x86_64 \
        --python-version "$BASE_PYTHON" --extra-index-url https://download.pytorch.org/whl/cpu \
        -d "$CACHE/torch-wheels" "torch==$version+cpu"
}

build_image() {
    # --force-rm: podman 4.3 here leaves a working container behind for each step of a failed build otherwise.
    podman build --format docker --network host --force-rm \
        --volume "$CACHE/torch-wheels:/torch-wheels:ro" \
        --build-arg BASE_IMAGE="$BASE_IMAGE" \
        -f "$TREE/Dockerfile.cuda" --target runtime -t "$IMAGE" "$TREE"
}

# The compose file's volumes, empty, labelled as ours. A volume we did not create is left alone.
reset_volumes() {
    compose --profile training --profile training-dev down > /dev/null 2>&1 || true
    local v
    for v in $VOLUMES; do
        if podman volume exists "$v"; then
            if [ -z "$(podman volume ls --quiet --filter "name=^$v\$" --filter "label=$SMOKE_LABEL")" ]; then
                echo "volume $v exists and was not made by this script: it may hold real weights or runs."
                echo "Move it aside yourself (podman volume export/rm $v), then rerun."
                return 1
            fi
            podman volume rm --force "$v"
        fi
        podman volume create --label "$SMOKE_LABEL" "$v"
    done
}

# A copy of configs/demo.yaml under another run name, with full determinism (bit-exact resume, operations.md).
demo_config() {
    local run=$1 out=$CACHE/run/$1.yaml
    sed -e "s/^run_name: .*/run_name: $run/" -e 's/^training:$/training:\n  full_determinism: true/' \
        "$TREE/configs/demo.yaml" > "$out"
    grep -q "full_determinism: true" "$out" || fail "could not derive $out from configs/demo.yaml"
    echo "$out"
}
manifest_status() {
    "$CACHE/tools/bin/python" -c 'import json, sys; print(json.load(open(sys.argv[1]))["status"])' "$1/manifest.json"
}
last_logged_step() {
    grep -o '"step": [0-9]*' "$1/metrics.jsonl" 2> /dev/null | tail -n1 | grep -o '[0-9]*$' || echo 0
}

# --- the run ---------------------------------------------------------------------------------------------------
say "set-up (cache: $CACHE)"
preflight
timed "$PODMAN_COMPOSE (PyPI)" tools || fail "podman-compose"
timed "base image $BASE_IMAGE" base_image || fail "base image"
timed "snapshot of the work tree" snapshot_tree || fail "snapshot"
IMAGE=$(compose_value 'c["services"]["training"]["image"]')
VOLUMES=$(compose_value '" ".join(v["name"] for v in c["volumes"].values())')
GRACE=$(seconds_of "$(compose_value 'c["services"]["training"]["stop_grace_period"]')")
timed "CPU torch wheel" torch_wheel || fail "torch wheel"
timed "build $IMAGE" build_image || fail "podman build"
cached=$(grep -c -- '--> Using cache' "$LAST_LOG" || true)
printf '   (%s build steps from the layer cache)\n' "$cached"
timed "fresh volumes: $VOLUMES" reset_volumes || fail "volumes"
GGUF_DIR=$(volume_dir training_models_gguf)
OUT_DIR=$(volume_dir training_checkpoints)

say "1. training profile: the demo trains, exports and verifies under a read-only root"
export TRAIN_DATA_DIR=./data
timed "tiny model into the cache volume (training-dev run)" \
    compose --profile training-dev run --rm training-dev python -m scripts.tiny_model || fail "scripts.tiny_model"
full_config=$(demo_config smoke-full)
TRAIN_CONFIG=$full_config timed "training up (train, export, verify)" \
    compose --profile training up --no-build || true
training=$(container_of training)
code=$(podman inspect --format '{{.State.ExitCode}}' "$training")
[ "$code" = 0 ] || fail "training exited $code (podman logs $training)"
[ "$(podman inspect --format '{{.HostConfig.ReadonlyRootfs}}' "$training")" = true ] || fail "root not read-only"
[ "$(manifest_status "$OUT_DIR/smoke-full")" = complete ] || fail "manifest of smoke-full is not complete"
ok "exit 0 with a read-only root (only /tmp and the volumes writable); manifest status complete"
[ -f "$GGUF_DIR/gemma_2b_finetuned.gguf" ] || fail "no gemma_2b_finetuned.gguf in the gguf volume"
ggufs=$(cd "$GGUF_DIR" && ls ./*.gguf | xargs -n1 basename | tr '\n' ' ')
owner=$(stat -c %u "$GGUF_DIR/gemma_2b_finetuned.gguf")
ok "in training_models_gguf, owned by UID $owner: $ggufs"
timed "UID $OTHER_UID reads every GGUF, convert info" podman run --rm --user "$OTHER_UID:$OTHER_UID" \
    -v training_models_gguf:/gguf:ro "$IMAGE" \
    bash -c 'cat /gguf/*.gguf > /dev/null && python -m convert info /gguf/gemma_2b_finetuned.gguf' \
    || fail "another UID cannot read the GGUFs"
ok "UID $OTHER_UID reads them all; convert info parses gemma_2b_finetuned.gguf"

say "2. SIGTERM mid-training: exit 143 within stop_grace_period (${GRACE} s), then resume"
resumed_config=$(demo_config smoke-resumed)
TRAIN_CONFIG=$resumed_config timed "training up -d" compose --profile training up --no-build -d || fail "up -d"
deadline=$(($(now) + 900))
until [ "$(last_logged_step "$OUT_DIR/smoke-resumed")" -ge "$SIGTERM_AT_STEP" ]; do
    [ "$(now)" -lt "$deadline" ] || fail "no step $SIGTERM_AT_STEP logged within 15 min"
    sleep 1
done
TRAIN_CONFIG=$resumed_config timed "stop (SIGTERM through tini) at step $(last_logged_step "$OUT_DIR/smoke-resumed")" \
    compose --profile training stop training || fail "stop"
stop_seconds=$LAST_SECONDS
training=$(container_of training)
code=$(podman inspect --format '{{.State.ExitCode}}' "$training")
[ "$code" = 143 ] || fail "exit $code after SIGTERM, expected 143 (podman logs $training)"
[ "$stop_seconds" -lt "$GRACE" ] || fail "stop took $stop_seconds s, not under the $GRACE s grace period"
[ "$(manifest_status "$OUT_DIR/smoke-resumed")" = interrupted ] || fail "manifest not 'interrupted'"
committed=$(cd "$OUT_DIR/smoke-resumed/checkpoints" && ls -d checkpoint-*/COMMITTED.json 2> /dev/null | head -n1)
[ -n "$committed" ] || fail "no committed checkpoint in training_checkpoints/smoke-resumed"
ok "exit 143 after $stop_seconds s; committed ${committed%/*}; manifest interrupted"
TRAIN_CONFIG=$resumed_config timed "training up again (resume, export, verify)" \
    compose --profile training up --no-build || true
training=$(container_of training)
code=$(podman inspect --format '{{.State.ExitCode}}' "$training")
[ "$code" = 0 ] || fail "the resumed run exited $code (podman logs $training)"
grep -q "resuming from ${committed%/*}" "$LAST_LOG" || fail "the second up did not resume from ${committed%/*}"
full=$(sha256sum < "$OUT_DIR/smoke-full/adapter/adapter_model.safetensors")
resumed=$(sha256sum < "$OUT_DIR/smoke-resumed/adapter/adapter_model.safetensors")
[ "$full" = "$resumed" ] || fail "adapter differs from the uninterrupted run's: $resumed vs $full"
ok "resumed from ${committed%/*}; adapter sha256 ${full:0:16}... = the uninterrupted run's"

say "3. training-dev profile: a source edit applies without a rebuild"
image_before=$(podman image inspect --format '{{.Id}}' "$IMAGE")
mark="edited-$(now)"
echo "DOCKER_SMOKE_MARK = \"$mark\"  # appended by scripts/docker_smoke.sh to its own copy" >> "$TREE/train/__init__.py"
probe='import train; print("mark:", getattr(train, "DOCKER_SMOKE_MARK", "absent"))'
timed "training-dev run: python -c 'import train'" \
    compose --profile training-dev run --rm training-dev python -c "$probe" || fail "training-dev run"
grep -q "mark: $mark" "$LAST_LOG" || fail "the dev container ran the image's code"
timed "training run: python -c 'import train'" \
    compose --profile training run --rm training python -c "$probe" || fail "training run"
grep -q "mark: absent" "$LAST_LOG" || fail "production saw the work tree"
[ "$(podman image inspect --format '{{.Id}}' "$IMAGE")" = "$image_before" ] || fail "the image changed"
ok "training-dev sees the edit, training keeps the image's code, same image id"

say "4. the GGUF out, as docs/docker.md says"
mkdir -p "$TREE/models/gguf"
rm -f "$TREE/models/gguf/gemma_2b_finetuned.gguf"
want=$(sha256sum < "$GGUF_DIR/gemma_2b_finetuned.gguf")
timed "from the volume (run --user \$(id -u), cp)" \
    podman run --rm --user "$(id -u):$(id -g)" -v training_models_gguf:/gguf:ro -v "$TREE/models/gguf:/out" \
    "$IMAGE" cp /gguf/gemma_2b_finetuned.gguf /out/ || fail "copy from the volume"
[ "$(sha256sum < "$TREE/models/gguf/gemma_2b_finetuned.gguf")" = "$want" ] || fail "copied GGUF differs"
rm "$TREE/models/gguf/gemma_2b_finetuned.gguf"
timed "from the stopped container (podman cp)" \
    podman cp "$training:/app/models/gguf/gemma_2b_finetuned.gguf" "$TREE/models/gguf/" || fail "podman cp"
[ "$(sha256sum < "$TREE/models/gguf/gemma_2b_finetuned.gguf")" = "$want" ] || fail "podman cp GGUF differs"
ok "both routes give gemma_2b_finetuned.gguf, sha256 ${want:0:16}..."

say "summary ($(($(now) - T_START)) s in all)"
printf '%s\n' "${SUMMARY[@]}"
echo "PASSED: the image builds and every check held (logs: $LOGS)"
