"""Benchmarks as a record: timing, FLOP counting and MFU, the SD-1.5 networks of both sides, the JSONL rows."""
