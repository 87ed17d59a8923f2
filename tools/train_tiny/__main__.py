import sys
from pathlib import Path

if __package__ in (None, ""):          # ``python tools/train_tiny`` as well as ``python -m tools.train_tiny``
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tools.train_tiny.cli import main  # noqa: E402

raise SystemExit(main())
