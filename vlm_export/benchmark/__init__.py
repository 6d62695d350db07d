"""Benchmarks: side-by-side timings of artifacts and peers (llama.cpp), with the machine's own limits."""
