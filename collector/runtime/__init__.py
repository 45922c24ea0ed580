"""The runtime: the only code that knows about threads, retries, timers and disks.

Plugins (sources, transforms, sinks) and the CLI commands never import threads or touch the data
dir themselves; they get what they need through ``collector.plugin.Context``.
"""
