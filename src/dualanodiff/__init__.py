"""dualanodiff: few-shot anomaly image-mask pair generation (DualAnoDiff) on stock diffusers."""

__version__ = "0.1.0"
