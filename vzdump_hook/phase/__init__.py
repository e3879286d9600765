"""One vzdump phase, one process: runner.py is the entry (chained scripts, watchdog, exit status); each
step (job_start, preflight, quiesce, resume_point, finish) shares context.py's PhaseContext."""
