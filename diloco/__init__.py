"""diloco: DiLoCo training over Redis (coordination) and S3-compatible object storage (tensors)."""

__version__ = "0.1.0"
