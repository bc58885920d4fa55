"""Simulated Xen host (real xenstored under a shim, grant/event broker) and simulated guest."""
