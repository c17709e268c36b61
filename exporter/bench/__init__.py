"""Benchmarks: latency, quality, alignment and the GPU check. They measure the product; nothing in it imports them."""
