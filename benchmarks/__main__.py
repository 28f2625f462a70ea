"""``python -m benchmarks [--quick] [...]``: pin the thread counts first, then run (see benchmarks/run.py)."""
import sys

from benchmarks.common import pin_threads, threads_from_argv

pin_threads(threads_from_argv(sys.argv[1:]))

from benchmarks.run import main  # noqa: E402  (after the thread environment is set)

sys.exit(main())
