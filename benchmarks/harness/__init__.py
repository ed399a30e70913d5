"""The load-test harness: `promptmux bench` (scenarios, workloads, targets, reports)."""
