"""podterm: a high-availability terminal gateway for Kubernetes pods."""

__version__ = "0.1.0"

__all__ = ["__version__"]
