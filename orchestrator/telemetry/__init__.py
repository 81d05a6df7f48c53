"""GPU health, the Prometheus exporter and the watchdog policy."""
