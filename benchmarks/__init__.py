"""Performance benchmarks: scripts, not tests (README, "Performance"). Each prints a table with the
ratio of medsyn's way to a named baseline measured in the same run, at GPU or CPU scale."""
