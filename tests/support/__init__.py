"""Test infrastructure: live Label Studio and Redis, a scripted JSON server, the shipped label
configs and random stores with their tasks. Benchmarks may import it too."""
