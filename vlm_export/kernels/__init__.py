"""Native CPU kernels that ONNX Runtime's own do not match, built as an ORT custom-op library.

`Int4MatMul` (domain `vlm_export.cpu`): the int4 weight-only matmul of the cpu target's int4
variant, for x86-64 CPUs with AVX-512 VNNI. library.py compiles it with the system C compiler when
a variant is built and the library ships inside the variant (listed in its manifest with a checksum),
so running the variant needs no compiler.
"""
