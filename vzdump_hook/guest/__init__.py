"""One guest seen from the node: the session (preflight, quiesce, resume), the marker inside the guest,
the one resume path, leftover markers, readiness, and deploying the guest side."""
