"""Calibration/quantization jobs described by a YAML file (the ``defuser-quant run`` command)."""

from .config import JobConfig, JobConfigError, load_job_config

__all__ = ["JobConfig", "JobConfigError", "load_job_config"]
