"""Plain-PyTorch implementations of every pagoda op: the CPU path and the test oracle."""
