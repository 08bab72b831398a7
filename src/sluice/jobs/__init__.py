"""Batch jobs: ``@sluice.job``, workflows, schedules, the run log, alerters."""
