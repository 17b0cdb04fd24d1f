"""Private compute backends, one module per backend (see `fastlstm._backends`)."""
