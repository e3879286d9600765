"""QEMU guests: a minimal QMP client (qmp.py) and the early-resume watcher (watcher.py) that starts the
stacks once QEMU's backup job - the backup's point in time - has started (docs/design.md §1)."""
