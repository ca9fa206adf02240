"""A stand-in for the `safetensors` package (Debian has none), for tests/test_checkpoint.cpp:
it runs the conversion command devpipe's error message suggests. Only save_file, with the real
one's signature and its refusals (tensors that share memory, non-contiguous tensors)."""
