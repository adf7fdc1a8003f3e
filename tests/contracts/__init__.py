"""Shared contract tests: subclass `ForwarderContract` or `SourceContract` for a broker.

Each suite is a pytest class with abstract fixtures; a subclass named ``Test...``
provides them for one implementation and gets the whole checklist.
"""
