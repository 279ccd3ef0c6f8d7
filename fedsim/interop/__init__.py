"""TensorFlow Federated interop: TFF aggregation factories inside fedsim, and fedsim's
parity with TFF.
"""
