"""Closed-form ridge calibration: statistics and solve (``ridge``), the streaming engine (``engine``,
``stream``), its report, and calibration-driven channel selection (OBS, activation-aware: ``selection``)."""
