"""Shared plumbing: user errors, atomic files, the content-addressed cache, folder locks,
config field rules."""
