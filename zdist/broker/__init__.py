"""The ROUTER broker: task graph, scheduling state machine, poll loop, CLI."""
