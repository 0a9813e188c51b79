"""Offline tools for a stopped server's store: inspection, verification and compaction.

The command line is in :mod:`kvtier.cli.tools`; these modules hold the logic and return plain data
(what ``--json`` prints), with separate functions that render it as text.
"""
