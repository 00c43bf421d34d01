"""The device runtime: loads a bundle with onnxruntime and trains it by perturbed inference.

numpy + onnxruntime (+ grpcio for the protocol client) only; torch is never imported here.
"""
