"""The test VM's disk image: a Debian 12 root made with mmdebstrap from Debian's packages only.

``python3 -m tests.infra.vm_image`` (run by scripts/setup-test-host.sh) builds it once and caches it in
/var/cache/vzdh-test/vm/vm-<key>/, keyed by the recipe below; later runs find it at once. The directory
holds ``disk.raw`` (ext4 made with ``mke2fs -d``, the root file system on the VM's virtio disk),
``vmlinuz`` and ``initrd.img`` (Debian's linux-image-amd64, given to QEMU directly), ``id_ed25519``
(root's login key) and ``known_hosts`` (the VM's ssh host key, for host name ``vzdh-vm``).

The VM runs systemd, sshd, qemu-guest-agent, a Docker engine (``--iptables=false``, no bridge, like the
host's) with compose v2 and the host's local images ``vzdh/busybox:test`` and ``vzdh/postgres:15``
(loaded at first boot by ``vzdh-images.service``), and PostgreSQL 15 (its service masked). Its
network comes from the kernel command line (``ip=``, read by systemd-network-generator).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from tests.infra.cache import CACHE_ROOT, cached

__all__ = ["VmImage", "image", "recipe"]

CACHE = CACHE_ROOT / "vm"
MIRROR = os.environ.get("VZDUMP_HOOK_DEBIAN_MIRROR", "http://deb.debian.org/debian")
SUITE = "bookworm"
RECIPE_VERSION = 1  # bump when the recipe changes in a way its text does not show
PACKAGES = (
    "systemd-sysv", "udev", "dbus", "openssh-server", "qemu-guest-agent", "docker.io", "postgresql-15",
    "linux-image-amd64", "iproute2", "e2fsprogs", "procps", "python3", "ca-certificates",
)
DOCKER_IMAGES = ("vzdh/busybox:test", "vzdh/postgres:15")
HASH_LABEL = "vzdh.content-hash"  # set by scripts/setup-test-host.sh on its images
COMPOSE_PLUGIN = Path("/usr/local/lib/docker/cli-plugins/docker-compose")
DISK_SIZE = "6G"
HOSTNAME = "vzdh-vm"
# Units that only cost boot time in a test VM.
MASKED = (
    "apt-daily.timer", "apt-daily-upgrade.timer", "e2scrub_all.timer", "e2scrub_reap.service",
    "fstrim.timer", "man-db.timer", "dpkg-db-backup.timer", "systemd-timesyncd.service",
    "postgresql.service", "postgresql@15-main.service", "logrotate.timer", "systemd-tmpfiles-clean.timer",
    "getty@tty1.service", "ssh.socket", "systemd-networkd-wait-online.service",
)
ENABLED = ("systemd-networkd.service", "systemd-network-generator.service", "ssh.service",
           "docker.service", "vzdh-images.service")
FILES: dict[str, str] = {
    "/etc/hostname": f"{HOSTNAME}\n",
    "/etc/hosts": f"127.0.0.1 localhost\n127.0.1.1 {HOSTNAME}\n",
    "/etc/fstab": "/dev/vda / ext4 rw,errors=remount-ro 0 1\n",
    "/etc/docker/daemon.json": '{"iptables": false, "ip6tables": false, "bridge": "none"}\n',
    "/etc/ssh/sshd_config.d/vzdh.conf": "PermitRootLogin prohibit-password\nUseDNS no\n",
    "/etc/systemd/journald.conf.d/vzdh.conf": "[Journal]\nStorage=volatile\n",
    "/etc/systemd/system/vzdh-images.service": (
        "[Unit]\nDescription=load the test images into docker (first boot)\n"
        "Requires=docker.service\nAfter=docker.service\nConditionPathExists=/var/lib/vzdh/images.tar\n\n"
        "[Service]\nType=oneshot\nExecStart=/usr/bin/docker load -i /var/lib/vzdh/images.tar\n"
        "ExecStartPost=/bin/rm -f /var/lib/vzdh/images.tar\n\n[Install]\nWantedBy=multi-user.target\n"
    ),
    # Debian's initramfs with the modules a virtio VM needs; smaller and faster to unpack than "most".
    "/etc/initramfs-tools/conf.d/vzdh.conf": "MODULES=list\nCOMPRESS=zstd\n",
    "/usr/share/initramfs-tools/modules.d/vzdh": "virtio_pci\nvirtio_blk\nvirtio_console\next4\n",
}


@dataclass(frozen=True)
class VmImage:
    """The files of one built image (see the module docstring)."""

    directory: Path

    @property
    def disk(self) -> Path:
        return self.directory / "disk.raw"

    @property
    def kernel(self) -> Path:
        return self.directory / "vmlinuz"

    @property
    def initrd(self) -> Path:
        return self.directory / "initrd.img"

    @property
    def identity(self) -> Path:
        return self.directory / "id_ed25519"

    @property
    def known_hosts(self) -> Path:
        return self.directory / "known_hosts"


def _docker_image_hash(tag: str) -> str:
    proc = subprocess.run(["docker", "image", "inspect", "-f", f'{{{{ index .Config.Labels "{HASH_LABEL}" }}}}', tag],
                          capture_output=True, text=True, timeout=60)
    if proc.returncode != 0 or not proc.stdout.strip():
        raise RuntimeError(f"docker image {tag} missing or unlabelled (run scripts/setup-test-host.sh): "
                           f"{proc.stderr.strip()}")
    return proc.stdout.strip()


def _file_hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def recipe() -> dict[str, object]:
    """Everything the image is made from. Raises RuntimeError when the host's docker images are missing."""
    return {
        "version": RECIPE_VERSION, "suite": SUITE, "mirror": MIRROR, "packages": PACKAGES,
        "masked": MASKED, "enabled": ENABLED, "files": FILES, "disk_size": DISK_SIZE,
        "docker_images": {tag: _docker_image_hash(tag) for tag in DOCKER_IMAGES},
        "compose_plugin": _file_hash(COMPOSE_PLUGIN), "provisioned": "first boot, docker load",
    }


def _run(argv: list[str], timeout: float = 1800, **kw: object) -> None:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, **kw)  # type: ignore[call-overload]
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: exit {proc.returncode}\n{(proc.stdout + proc.stderr)[-3000:]}")


def _write(root: Path, path: str, text: str, mode: int = 0o644) -> None:
    target = root / path.lstrip("/")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(text)
    target.chmod(mode)


def _build(out: Path) -> None:
    """Make the image directory ``out``. Raises RuntimeError with the failing command's output."""
    out.mkdir(parents=True)
    with tempfile.TemporaryDirectory(prefix="vzdh-vm-build.", dir="/var/tmp") as tmp:
        root = Path(tmp) / "root"
        setup = " && ".join(
            f"mkdir -p \"$1{os.path.dirname(p)}\" && printf '%s' '{t}' > \"$1{p}\""
            for p, t in FILES.items() if "initramfs-tools" in p
        )
        _run(["mmdebstrap", "--variant=minbase", f"--include={','.join(PACKAGES)}",
              f"--setup-hook={setup}", "--customize-hook=rm -f \"$1\"/etc/ssh/ssh_host_*_key*",
              SUITE, str(root), MIRROR])
        for path, text in FILES.items():
            _write(root, path, text)
        _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "vzdh-vm-host",
              "-f", str(root / "etc/ssh/ssh_host_ed25519_key")])
        _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "vzdh-vm-root", "-f", str(out / "id_ed25519")])
        _write(root, "/root/.ssh/authorized_keys", (out / "id_ed25519.pub").read_text(), 0o600)
        (root / "root/.ssh").chmod(0o700)
        host_pub = (root / "etc/ssh/ssh_host_ed25519_key.pub").read_text().split()
        (out / "known_hosts").write_text(f"{HOSTNAME} {host_pub[0]} {host_pub[1]}\n")
        (root / "usr/local/lib/docker/cli-plugins").mkdir(parents=True, exist_ok=True)
        shutil.copy2(COMPOSE_PLUGIN, root / "usr/local/lib/docker/cli-plugins/docker-compose")
        (root / "var/lib/vzdh").mkdir(parents=True, exist_ok=True)
        _run(["docker", "save", "-o", str(root / "var/lib/vzdh/images.tar"), *DOCKER_IMAGES])
        _run(["chroot", str(root), "systemctl", "mask", *MASKED])
        _run(["chroot", str(root), "systemctl", "enable", *ENABLED])
        (root / "etc/machine-id").write_text("")  # a fresh one at first boot
        kernels = sorted((root / "boot").glob("vmlinuz-*"))
        initrds = sorted((root / "boot").glob("initrd.img-*"))
        if not kernels or not initrds:
            raise RuntimeError("linux-image-amd64 left no /boot/vmlinuz-* and initrd.img-*")
        shutil.copy2(kernels[-1], out / "vmlinuz")
        shutil.copy2(initrds[-1], out / "initrd.img")
        _run(["mke2fs", "-q", "-t", "ext4", "-L", "vzdh-root", "-d", str(root), str(out / "disk.raw"), DISK_SIZE])
    _provision(VmImage(out))


def _provision(img: VmImage) -> None:
    """First boot, at build time: docker loads the images (minutes under TCG), systemd makes the
    machine id; then a clean power-off. Tests boot the provisioned disk. Raises VmError."""
    from tests.infra.vm import TestVm  # the runner imports this module

    with tempfile.TemporaryDirectory(prefix="vzdh-vm-provision.") as qmp_dir:
        vm = TestVm(img, 9000, Path(qmp_dir), overlay=False)
        try:
            vm.start(timeout=900)
            vm.ok("test ! -e /var/lib/vzdh/images.tar && systemctl is-system-running --wait; "
                  "systemctl --failed --no-legend | grep . >&2 && exit 1; journalctl --rotate >/dev/null; sync")
            vm.poweroff()
        finally:
            vm.close()


def image() -> VmImage:
    """The cached image, built first (several minutes, from Debian's mirror) when its recipe changed.

    Raises RuntimeError when building fails or the host lacks the docker images it bundles.
    """
    return VmImage(cached(CACHE, "vm", "", recipe(), _build))


if __name__ == "__main__":
    img = image()
    print(img.directory)
    sys.exit(0)
