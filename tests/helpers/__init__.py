"""Helpers shared by the test suite: `ranks` (spawned gloo ranks), `launch` (real `dtrain train` processes),
`models` (the toy model and its batches), `oracles` (the exact references the tests compare against),
`probes` (a dispatch mode that measures the largest tensor)."""
