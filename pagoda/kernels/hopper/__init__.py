"""Gluon attention kernels for Hopper (sm_90): warp-specialised dense prefill (`ws`, persistent `pws`), paged
prefill (`paged`), their host launch (`attention`), launch configurations (`configs`) and ahead-of-time
compilation for the compile tests (`aot`). Importable without a GPU; without Gluon the kernels are absent."""
