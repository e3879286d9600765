"""The fuzzers use the guest-side fixtures (a busybox applet directory)."""

from tests.guest_sh.conftest import busybox_bin

__all__ = ["busybox_bin"]
