"""The demo model's trainer (``assets/tiny-chat``): ``python -m tools.train_tiny --help``. Not part of the runtime."""
