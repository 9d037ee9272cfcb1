"""qlora-harness: benchmarks of 16-bit LoRA against QLoRA, run as pytest suites."""

__version__ = "0.1.0"
SCHEMA_VERSION = 1
