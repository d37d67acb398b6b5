"""The benchmark of scripts/bench.py: pyunionfs against kernel overlayfs and fuse-overlayfs
(docs/benchmarks.md).  common <- mounts <- layers <- workloads <- report <- runner."""
