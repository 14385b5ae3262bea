"""The node catalogue: typed ports and params, each node a thin call into kernels/. No Qt."""
