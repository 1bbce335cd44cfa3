"""Kernel selection and custom operators under the network: CPU linear layouts (`cpu`), the grouped GEMM
custom op and the choice of expert backend (`grouped_gemm`). The network calls these; they never call it."""
