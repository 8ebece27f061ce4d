"""Triton kernels for MQSP's local partial attention (installed as ``lightning_mqsp.kernels``)."""
