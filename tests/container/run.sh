#!/usr/bin/env bash
# Build the project's Dockerfile and run the image for real, with no Docker daemon and no image
# registry: podman builds, buildah runs (`podman run` cannot start containers on machines whose
# kernel refuses its setrlimit calls; `buildah run --isolation chroot` can).
#
#  1. A Debian base image with Python (debootstrap from the mirror apt already uses), reused when
#     it is already in local storage.
#  2. The image, from the working tree's Dockerfile, with a tiny checkpoint made here baked in (the
#     "directory in the build context" way), torch from the local CPU wheel that pip's find-links
#     configuration points at (else the CPU index), and pip's CA bundle (PIP_CERT) plus a
#     throw-away canary certificate as the pip_ca build secret.
#  3. Checks of the image: a non-root numeric user, port 50051, the summarizer entrypoint, a
#     health check; no wheel and no certificate of the build secret anywhere in its files.
#  4. The image's default command, started with buildah: SERVING from the host (and from the
#     image's own HEALTHCHECK command), one article summarised over gRPC, a server process
#     owned by the image's user, and a clean exit (status 0) on SIGTERM.
#
# Usage (as root, with podman, buildah, debootstrap and openssl installed, and the project
# installed in the active Python environment, for the `summarizer` client):
#   bash tests/container/run.sh
# Environment: BASE_IMAGE (default localhost/python-base:3.11; built when missing),
# KEEP_IMAGE=1 to keep the built image (it is kept anyway when a check fails).
set -euo pipefail

repo=$(cd "$(dirname "$0")/../.." && pwd)
suite=bookworm  # Debian 12: Python 3.11
base_image=${BASE_IMAGE:-localhost/python-base:3.11}
image=localhost/summarizer-test:$$
container_port=""
work=""
runner=""
containers=()
mounted=()
passed=0

say() { printf '==> %s\n' "$*"; }
fail() { printf 'container test: FAIL: %s\n' "$*" >&2; exit 1; }
seconds_since() { python3 -c 'import sys, time; print(f"{time.time() - float(sys.argv[1]):.1f}")' "$1"; }

cleanup() {
  if [ -n "$runner" ] && kill -0 "$runner" 2>/dev/null; then
    kill "$runner" 2>/dev/null || true
    wait "$runner" 2>/dev/null || true
  fi
  for name in "${containers[@]}"; do buildah rm "$name" >/dev/null 2>&1 || true; done
  for name in "${mounted[@]}"; do podman image unmount "$name" >/dev/null 2>&1 || true; done
  if [ "$passed" = 1 ] && [ "${KEEP_IMAGE:-0}" != 1 ]; then
    podman rmi "$image" >/dev/null 2>&1 || true
  elif podman image exists "$image" 2>/dev/null; then
    printf 'container test: kept the image %s (podman rmi %s)\n' "$image" "$image" >&2
  fi
  [ -z "$work" ] || rm -rf "$work"
}
trap cleanup EXIT

for tool in podman buildah debootstrap openssl git python3 summarizer; do
  command -v "$tool" >/dev/null || fail "$tool not found (apt-get install podman buildah \
debootstrap openssl; the project installed in the active Python environment for summarizer)"
done
work=$(mktemp -d)

# ---- 1. the base image ------------------------------------------------------------------------
base_seconds=""
if podman image exists "$base_image"; then
  say "base image $base_image: already in local storage"
else
  [ "$(id -u)" = 0 ] || fail "building the base image needs root (debootstrap)"
  # The mirror apt already uses (any deb source for a Debian release, not its -security or
  # -updates suites): no host is hard-coded.
  # shellcheck disable=SC2016  # apt's own $(FIELD) placeholders
  apt-get indextargets --format '$(TARGET_OF) $(RELEASE) $(REPO_URI)' > "$work/apt-sources"
  mirror=$(awk -v suite="$suite" '$1 == "deb" && $2 == suite { print $3; exit }' "$work/apt-sources")
  [ -n "$mirror" ] || mirror=$(awk '$1 == "deb" && $2 !~ /-/ { print $3; exit }' "$work/apt-sources")
  [ -n "$mirror" ] || fail "no Debian mirror in apt's sources to debootstrap $suite from"
  say "base image $base_image: debootstrap $suite from $mirror"
  started=$(date +%s.%N)
  debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates \
    "$suite" "$work/rootfs" "$mirror" > "$work/debootstrap.log" 2>&1 \
    || { tail -n 30 "$work/debootstrap.log" >&2; fail "debootstrap failed"; }
  rm -rf "$work"/rootfs/var/cache/apt/archives/*.deb "$work"/rootfs/var/lib/apt/lists/*
  tar -C "$work/rootfs" -c . | podman import --quiet - "$base_image" >/dev/null
  rm -rf "$work/rootfs"
  base_seconds=$(seconds_since "$started")
  say "base image built in ${base_seconds}s"
fi
probe=$(buildah from --pull=never "$base_image"); containers+=("$probe")
python_tag=$(buildah run --isolation chroot "$probe" -- python3 -c \
  'import sys; print("cp%d%d" % sys.version_info[:2])')

# ---- 2. the build context and the image -------------------------------------------------------
context=$work/context
mkdir -p "$context"
# The working tree as git sees it (tracked and untracked files, not ignored ones).
(cd "$repo" && git ls-files -z --cached --others --exclude-standard \
   | tar --null --files-from=- --ignore-failed-read -c) | tar -x -C "$context"
summarizer make-tiny-model "$context/tiny-model" > "$work/tiny-model.log" 2>&1 \
  || { cat "$work/tiny-model.log" >&2; fail "make-tiny-model failed"; }

# torch from the newest CPU wheel in the find-links directories of pip's configuration.
torch_wheel=""
find_links=$( (python3 -m pip config list 2>/dev/null || true) \
             | sed -n "s/^[^=]*find-links='\(.*\)'$/\1/p" | tr ' ' '\n' | sed 's|^file://||' | sort -u)
for dir in $find_links; do
  [ -d "$dir" ] || continue
  for wheel in "$dir"/torch-*+cpu-"$python_tag"-"$python_tag"-*linux*_"$(uname -m)".whl; do
    if [ -f "$wheel" ]; then printf '%s\n' "$wheel"; fi
  done
done | sort -V | tail -n 1 > "$work/torch-wheel"
torch_wheel=$(cat "$work/torch-wheel")
build_args=(--build-arg "BASE_IMAGE=$base_image" --build-arg "MODEL=tiny-model")
if [ -n "$torch_wheel" ]; then
  ln "$torch_wheel" "$context/wheels/" 2>/dev/null || cp "$torch_wheel" "$context/wheels/"
  build_args+=(--build-arg "TORCH_WHEEL=$(basename "$torch_wheel")")
  say "torch from $(basename "$torch_wheel") (pip's find-links)"
else
  say "no local $python_tag CPU torch wheel in pip's find-links: torch comes from the CPU index"
fi

# The build secret: pip's CA bundle here (if any) and a canary certificate made for this run, so
# the no-secrets check below always has something to look for.
openssl req -x509 -newkey rsa:2048 -nodes -keyout /dev/null -out "$work/canary.pem" -days 1 \
  -subj "/CN=summarizer container test canary $$" 2>/dev/null || fail "openssl req failed"
cat ${PIP_CERT:+"$PIP_CERT"} "$work/canary.pem" > "$work/pip-ca.pem"

say "building $image (the build log is shown if it fails)"
started=$(date +%s.%N)
# --format docker: the OCI image format has no HEALTHCHECK. --layers=false: no intermediate
# images left behind in local storage.
podman build --isolation chroot --network host --format docker --layers=false \
  "${build_args[@]}" --secret "id=pip_ca,src=$work/pip-ca.pem" \
  --tag "$image" --file "$context/Dockerfile" "$context" > "$work/build.log" 2>&1 \
  || { tail -n 60 "$work/build.log" >&2; fail "podman build failed"; }
build_seconds=$(seconds_since "$started")
size_bytes=$(podman image inspect --format '{{.Size}}' "$image")
say "built in ${build_seconds}s; image size $((size_bytes / 1000000)) MB"

# ---- 3. the image: configuration and files ----------------------------------------------------
podman image inspect "$image" > "$work/inspect.json"
# Prints the image's UID; writes the default command and the health check NUL-separated.
image_uid=$(python3 - "$work" <<'PY'
import json, pathlib, sys

work = pathlib.Path(sys.argv[1])
image = json.loads((work / "inspect.json").read_text())[0]
config = image["Config"]
problems = []
user = config.get("User") or ""
uid = user.split(":")[0]
if not uid.isdigit() or int(uid) == 0:
    problems.append(f"User is {user!r}: want a numeric non-root UID (Kubernetes runAsNonRoot)")
if "50051/tcp" not in (config.get("ExposedPorts") or {}):
    problems.append(f"ExposedPorts {config.get('ExposedPorts')} lacks 50051/tcp")
if config.get("Entrypoint") != ["summarizer"]:
    problems.append(f"Entrypoint is {config.get('Entrypoint')}, want ['summarizer']")
# Docker reports the health check in Config, podman next to it.
test = (config.get("Healthcheck") or image.get("Healthcheck") or {}).get("Test") or []
if test[:1] == ["CMD"] and len(test) > 1:
    health = test[1:]
elif test[:1] == ["CMD-SHELL"] and len(test) == 2:
    health = ["/bin/sh", "-c", test[1]]
else:
    health = []
    problems.append(f"no usable HEALTHCHECK (Test: {test})")
for problem in problems:
    print(f"image configuration: {problem}", file=sys.stderr)
if problems:
    sys.exit(1)
default_command = (config.get("Entrypoint") or []) + (config.get("Cmd") or [])
(work / "default-command").write_text("\0".join(default_command) + "\0")
(work / "health-command").write_text("\0".join(health) + "\0")
print(uid)
PY
) || fail "image configuration: see above"
mapfile -d '' default_command < "$work/default-command"
mapfile -d '' health_command < "$work/health-command"
say "image user $image_uid, port 50051, default command: ${default_command[*]}"

image_root=$(podman image mount "$image"); mounted+=("$image")
base_root=$(podman image mount "$base_image"); mounted+=("$base_image")
# No wheel the base image does not already have (the torch wheel, say).
new_wheels=$(comm -13 <(cd "$base_root" && find . -name '*.whl' | sort) \
                      <(cd "$image_root" && find . -name '*.whl' | sort))
[ -z "$new_wheels" ] || fail "wheels left in the image: $new_wheels"
# No certificate of the build secret that the image does not hold as a public CA anyway (the
# base's system bundle, certifi's): one base64 line of each is looked for in every file.
python3 - "$work/pip-ca.pem" "$base_root" "$image_root" > "$work/secret-lines" <<'PY'
import pathlib, sys

bundle, base_root, image_root = (pathlib.Path(arg) for arg in sys.argv[1:])
public = ""
for path in [base_root / "etc/ssl/certs/ca-certificates.crt", *image_root.rglob("cacert.pem")]:
    if path.is_file() and not path.is_symlink():
        public += path.read_text(errors="replace")
certificates = bundle.read_text().split("-----END CERTIFICATE-----")
for certificate in certificates:
    lines = [line.strip() for line in certificate.splitlines()]
    body = [line for line in lines if len(line) == 64 and not line.startswith("-----")]
    if len(body) >= 4:
        probe = body[len(body) // 2]  # past the common prefix of all certificates
        if probe not in public:
            print(probe)
PY
secret_count=$(wc -l < "$work/secret-lines")
[ "$secret_count" -ge 1 ] || fail "found no certificate to look for (not even the canary)"
status=0; grep -rlF -D skip -f "$work/secret-lines" "$image_root" > "$work/leaks" || status=$?
[ "$status" -le 1 ] || fail "grep failed while looking for the secret in the image's files"
[ ! -s "$work/leaks" ] \
  || fail "a certificate of the pip_ca build secret is in the image: $(sed "s|^$image_root||" "$work/leaks")"
say "no new wheels; none of the secret's $secret_count private certificates in the image's files"
podman image unmount "$image" "$base_image" >/dev/null; mounted=()

# ---- 4. run the image's default command --------------------------------------------------------
container_port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
server=$(buildah from --pull=never --name "summarizer-test-$$" "$image"); containers+=("$server")
# The host's network: listen on loopback only, on a free port.
buildah config --env SUMMARIZER_HOST=127.0.0.1 --env "SUMMARIZER_PORT=$container_port" "$server"
say "starting ${default_command[*]} on 127.0.0.1:$container_port"
started=$(date +%s.%N)
buildah run --isolation chroot --network host "$server" -- "${default_command[@]}" \
  > "$work/server.log" 2>&1 &
runner=$!
server_log() { printf -- '--- server log\n' >&2; cat "$work/server.log" >&2; }
deadline=$((SECONDS + 300))
until summarizer health --server "127.0.0.1:$container_port" --timeout 2 >/dev/null 2>&1; do
  kill -0 "$runner" 2>/dev/null || { server_log; fail "the container exited before SERVING"; }
  [ "$SECONDS" -lt "$deadline" ] || { server_log; fail "not SERVING after 300 s"; }
  sleep 0.5
done
serving_seconds=$(seconds_since "$started")
say "SERVING after ${serving_seconds}s (from the host)"

checker=$(buildah from --pull=never "$image"); containers+=("$checker")
buildah config --env "SUMMARIZER_PORT=$container_port" "$checker"
health_output=$(buildah run --isolation chroot --network host "$checker" -- "${health_command[@]}") \
  || fail "the image's HEALTHCHECK (${health_command[*]}) failed: $health_output"
[ "$health_output" = SERVING ] || fail "the image's HEALTHCHECK printed '$health_output'"
say "the image's HEALTHCHECK (${health_command[*]}) reports SERVING"

cat > "$work/article.txt" <<'EOF'
The city council voted on Tuesday to expand the bus network to the northern suburbs, after
months of talks over a budget of two million. Officials said the new routes would open in March
and serve the hospital, the university and two schools. Residents had asked for better links for
years; the council said prices would not rise.
EOF
summarizer summarize --server "127.0.0.1:$container_port" --timeout 120 "$work/article.txt" \
  > "$work/result.jsonl" || { server_log; fail "summarize over gRPC failed"; }
python3 - "$work/result.jsonl" <<'PY' || fail "unexpected Summarize result: $(cat "$work/result.jsonl")"
import json, sys

results = [json.loads(line) for line in open(sys.argv[1], encoding="utf-8") if line.strip()]
assert len(results) == 1, f"{len(results)} results for one article"
result = results[0]
assert result["id"] == "article", result["id"]
assert isinstance(result["summary"], str) and result["summary"].strip(), "empty summary"
assert isinstance(result["headline"], str) and result["headline"].strip(), "empty headline"
assert result["input_tokens"] > 0 and result["summary_tokens"] > 0 and result["headline_tokens"] > 0
PY
say "Summarize over gRPC returned a summary and a headline"

# The server: the first Python process under buildah run (its engine workers and
# multiprocessing's resource tracker are its children). All of them must run as the image's user.
descendants() { local child; for child in $(pgrep -P "$1"); do echo "$child"; descendants "$child"; done; }
server_pid=""
pythons=()
for pid in $(descendants "$runner"); do
  case $(ps -o comm= -p "$pid") in
    python*|summarizer) pythons+=("$pid"); [ -n "$server_pid" ] || server_pid=$pid ;;
  esac
done
[ -n "$server_pid" ] || fail "cannot find the server process under buildah run ($runner)"
for pid in "${pythons[@]}"; do
  uid=$(ps -o uid= -p "$pid" | tr -d ' ')
  if [ "$uid" != "$image_uid" ] || [ "$uid" = 0 ]; then
    fail "process $pid runs as UID $uid, want the image's $image_uid"
  fi
done
say "server process $server_pid and its ${#pythons[@]} python processes in all run as UID $image_uid"

# What `docker stop` does: SIGTERM to the container's command, then a clean exit.
kill -TERM "$server_pid"
for _ in $(seq 120); do kill -0 "$runner" 2>/dev/null || break; sleep 0.5; done
kill -0 "$runner" 2>/dev/null && { server_log; fail "still running 60 s after SIGTERM"; }
status=0; wait "$runner" || status=$?
runner=""
[ "$status" = 0 ] || { server_log; fail "exit status $status after SIGTERM, want 0"; }
grep -q "service.api.server: stopped" "$work/server.log" || { server_log; fail "no 'stopped' in the log"; }
for pid in "${pythons[@]}"; do  # a zombie (state Z) is gone; only its parent can reap it
  state=$(ps -o stat= -p "$pid" 2>/dev/null || true)
  [ -z "$state" ] || [ "${state#Z}" != "$state" ] || fail "process $pid outlived the server"
done
say "SIGTERM: drained and exited with status 0, its worker processes with it"

passed=1
printf '\ncontainer test: PASS\n'
if [ -n "$base_seconds" ]; then base_note="built in ${base_seconds}s"; else base_note=reused; fi
printf '  base image:        %s\n' "$base_note"
printf '  image build:       %ss\n' "$build_seconds"
printf '  image size:        %s MB\n' "$((size_bytes / 1000000))"
printf '  start to SERVING:  %ss\n' "$serving_seconds"
