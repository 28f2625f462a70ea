"""Tuning, split by concern (as MetaSchedule itself is):

  records   the JSON record database and the variant table (open, repair, query, count)
  measure   builders and runners per kind of device (local, RPC, cross-export, WGSL) and the RPC spec
  board     the emulated aarch64 board as a tuning device
  driver    tune_kernels: progress, resume, the hand-schedule baseline
  variants  the ARM integer-GEMM variant choice
  bitplane  the CPU bitplane kernel's rows per task per bit-width, measured on this CPU

Sources (artifacts, ONNX graphs, model names) are resolved by ``api.tune``; this package takes kernel specs.
"""
from __future__ import annotations

from .driver import TuneConfig, commit_hand_baseline, hand_schedule, tune_kernel, tune_kernels  # noqa: F401
from .measure import RPC  # noqa: F401
from .records import (DB_FILES, VARIANTS_FILE, best_seconds, count_records, default_log_dir,  # noqa: F401
                      load_database, load_variant_choices, open_database, query_database, repair_log, workload)
