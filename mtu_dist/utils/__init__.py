"""Small shared helpers: atomic files, inter-process locks, how a command ends on a signal."""
