"""Plain-numpy reference implementation of nf4lib's quantization: the test oracle."""
