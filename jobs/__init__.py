"""Ray job entry points (`ray job submit ... python jobs/<name>.py`): thin drivers over `workers`."""
