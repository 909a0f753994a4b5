"""Host-side launch paths shared by every kernel family: cheap repeat launches of Triton kernels (`fast`) and of
the Gluon kernels that take host TMA descriptors (`tma`)."""
