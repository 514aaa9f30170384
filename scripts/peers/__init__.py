"""Adapters that run published CP implementations ("peers") inside scripts.bench_cp; see scripts.bench_peers."""
