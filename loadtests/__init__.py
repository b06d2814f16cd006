"""The project's benchmark: load generators, the in-process ceiling, and reports."""
