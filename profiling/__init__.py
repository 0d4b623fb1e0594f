"""Profiling tools: ``python -m profiling.profile_step`` (see ``docs/profiling.md``)."""
