"""The end-to-end demo (``make demo`` / ``python -m demo``) and the embedded S3 server it and the benchmarks use."""
