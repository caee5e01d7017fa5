"""btp-edge: zero-shot 3D anomaly detection with Point-Language Models (BTP) on the edge."""
__version__ = "0.1.0"
