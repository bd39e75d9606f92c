"""Shared plumbing: user errors, atomic files, folder locks, config field rules."""
