"""The admin commands (`vzdump-hook check`, `status`, `recover`, ...): cli.py is the click group and its
table of commands, one module per command; click is imported only here, never by a vzdump phase."""
