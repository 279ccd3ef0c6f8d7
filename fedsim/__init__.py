"""fedsim: federated learning simulation with differential privacy on Ray."""

__version__ = "0.1.0"
