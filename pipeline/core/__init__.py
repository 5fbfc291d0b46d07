"""The shared core: table schemas, the workspace layout, the commit protocol, runs, errors, logs."""
