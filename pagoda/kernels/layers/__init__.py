"""Fused per-token layer kernels of the model forward: RMSNorm with and without the residual add (`norm`) and
the gated activations of the MLP (`activation`). Memory-bound: each reads and writes every element once."""
