"""The user-facing commands' code: eval, analyze, compare, tune, speed, chat."""
