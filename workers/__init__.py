"""The streaming system around ramplus_core: CLI, settings, sources, sinks, fleet."""
