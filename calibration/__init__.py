"""Calibration data, routing modes, per-expert capture and coverage reports."""
