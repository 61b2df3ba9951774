"""Deployment and local tooling; not part of the installed library (`pip install` ships ramplus_core and workers)."""
