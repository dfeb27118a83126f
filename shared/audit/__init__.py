"""Privacy audits: re-verify the ledgers, re-account every epsilon, report, audit empirically with canaries.

``verify``: chains, signatures, attestations, epsilon recomputation. ``accounting``: an independent epsilon
from Google's dp-accounting (PLD). ``canary``: the one-run empirical lower bound. ``report``: HTML and JSON.
``cli``: ``privatune audit``.
"""
