"""Private Triton kernels, one family per file. Only `pagoda.ops` imports from here."""
