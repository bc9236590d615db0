"""Calibration-time transforms: calibration data, block I/O capture, block tuning, smoothing,
SmoothAttention and rotation."""
