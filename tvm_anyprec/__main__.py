"""``python -m tvm_anyprec ...`` is the ``tvm-anyprec`` command."""
import sys

from .cli import main

sys.exit(main())
