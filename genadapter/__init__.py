"""`genadapter`: the command line, on top of the generator, its training, the server and the
benchmarks."""
