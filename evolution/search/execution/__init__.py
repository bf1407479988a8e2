"""Where a generation's candidates train: jobs, devices, and in-process or Ray executors."""
