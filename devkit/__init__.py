"""The kit shared by the benchmarks (bench/) and the tests (tests/), never by the product.

- ``assets``: the offline model folders (through ``export.models``) and exports cached under one
  staleness rule;
- ``memory``: a process's peak RSS, and resetting it;
- ``docsection``: the one way a benchmark writes its section of docs/benchmarks.md.
- ``image``: the aggregator image built with buildah from a debootstrapped Debian and run as a
  pod runs it; a clean Debian root file system for the device, without network.

No product package imports it (tests/test_architecture.py), and it ships in no distribution:
bench scripts put the repository root on ``sys.path``, tests run from it.
"""
