"""The node's own facts and files: which vzdump job a phase belongs to, the per-job host records and
history, the ledger of outstanding markers, PVE facts read from files, and what goes outside the task log."""
